"""`fedcondense gateway`: the only port of a deployment that edge devices reach (deploy/README.md).

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), Control API (`flwr run`, `flwr supernode
register`) and Runtime API (ServerApp processes) on one HTTP port, and the open-source distribution has
no account authentication for the Control API. Whoever reaches that port could start a run, that is,
push code to every device that holds data. So the SuperLink binds 127.0.0.1 on the server host, where
only its operator reaches it, and this gateway listens on the public address with TLS and forwards
the Fleet routes (`/v1/fleet/...`) alone; every other path gets 403 and a line in the log.
Node authentication is unchanged: the SuperNodes' signed headers pass through as they are.
"""
from __future__ import annotations

import logging
import ssl

import httpx

log = logging.getLogger("fedcondense.gateway")
ALLOWED_PREFIX = "/v1/fleet/"
HOP_BY_HOP = {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade",
              b"proxy-connection", b"te", b"trailer"}
MAX_BODY = 256 * 2**20


class FleetGateway:
    """ASGI app: POST /v1/fleet/* -> the SuperLink at `upstream` (https, verified against `ca`)."""

    def __init__(self, upstream: str, ca: str | None, timeout: float = 120.0):
        verify = ssl.create_default_context(cafile=ca) if ca else True
        self.upstream = upstream.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.upstream, verify=verify, timeout=timeout)

    async def _respond(self, send, status: int, body: bytes, headers=()) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, client = scope["path"], scope.get("client")
        if scope["method"] != "POST" or not path.startswith(ALLOWED_PREFIX) or ".." in path:
            log.warning("refused %s %s from %s: only the Fleet API passes this gateway", scope["method"], path, client)
            await self._respond(send, 403, b'{"detail": "forbidden: this address serves the Fleet API only; '
                                           b'the Control API is reachable on the server host alone"}',
                                [(b"content-type", b"application/json")])
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await self._respond(send, 413, b'{"detail": "request too large"}')
                return
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        try:
            upstream = await self.client.post(path, content=bytes(body), headers=headers)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s: %s", path, exc)
            await self._respond(send, 502, b'{"detail": "the SuperLink behind this gateway is unreachable"}')
            return
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in upstream.headers.items()
               if k.lower().encode() not in HOP_BY_HOP and k.lower() != "content-encoding"]
        await self._respond(send, upstream.status_code, upstream.content, out)


def serve(listen: str, upstream: str, certfile: str, keyfile: str, ca: str | None) -> None:
    """Run the gateway until interrupted: TLS on `listen` (HOST:PORT), forwarding to `upstream` (https URL)."""
    import uvicorn
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen takes HOST:PORT, got '{listen}'")
    uvicorn.run(FleetGateway(upstream, ca), host=host.strip("[]"), port=int(port), ssl_certfile=certfile,
                ssl_keyfile=keyfile, log_level="warning", lifespan="on")
