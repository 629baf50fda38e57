"""Start a real deployment on 127.0.0.1 for tests: a SuperLink with TLS and node authentication bound to
loopback, the fleet-only gateway in front of it, and SuperNodes that connect through the gateway.

`fed` in FLWR_HOME's config is the operator's federation (the SuperLink itself); `remote` is what a
stranger on the network reaches (the gateway). Every process is started in its own session and stopped
by PID (its whole process group), also when the test fails.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_cluster(root: Path, node_configs: list[str], spare_keys: int = 0):
    """Certificates, the SuperLink, the gateway, and one registered SuperNode per node config (node i has
    `node_configs[i]`); `spare_keys` more node keys, unregistered. Everything is stopped at the end."""
    from server.federation.certs import make_certificates
    certs = make_certificates(root / "certs", ["localhost", "127.0.0.1"], nodes=len(node_configs) + spare_keys)
    cl = Cluster(root, certs)
    try:
        cl.start_superlink()
        cl.start_gateway()
        for i, node_config in enumerate(node_configs):
            cl.register(i)
            cl.start_supernode(i, node_config)
        yield cl
    finally:
        cl.stop_all()


class Cluster:
    def __init__(self, root: Path, certs: dict):
        self.root, self.certs = root, certs
        self.procs: dict[str, subprocess.Popen] = {}
        self.port, self.gateway_port = free_port(), free_port()
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr_home"), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                    "FEDCONDENSE_PROGRESS": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                    "PYTHONPATH": str(REPO)}
        home = root / "flwr_home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink.fed]\naddress = "127.0.0.1:{self.port}"\nroot-certificates = "{certs["ca"]}"\n'
            f'[superlink.remote]\naddress = "127.0.0.1:{self.gateway_port}"\nroot-certificates = "{certs["ca"]}"\n')

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start_superlink(self) -> None:
        c = self.certs
        self.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", c["ca"], "--ssl-certfile",
                                 c["server_cert"], "--ssl-keyfile", c["server_key"], "--enable-supernode-auth",
                                 "--disable-runtime-dependency-installation", "--database",
                                 str(self.root / "state.db"), "--host", "127.0.0.1", "--port", str(self.port)])
        self._wait_port("superlink", self.port)

    def start_gateway(self) -> None:
        c = self.certs
        self.start("gateway", [str(BIN / "fedcondense"), "gateway", "--listen", f"127.0.0.1:{self.gateway_port}",
                               "--superlink", f"https://127.0.0.1:{self.port}", "--ssl-certfile", c["server_cert"],
                               "--ssl-keyfile", c["server_key"], "--ca", c["ca"]])
        self._wait_port("gateway", self.gateway_port)

    def _wait_port(self, name: str, port: int) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n" + self.log(name))
            time.sleep(0.5)
        raise TimeoutError(f"{name} did not open its port:\n" + self.log(name))

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, node: int) -> None:
        res = self.flwr("supernode", "register", self.certs["nodes"][node]["public"], "fed", "--name", f"node{node}")
        if res.returncode != 0:
            raise RuntimeError(f"register node {node} failed: {res.stdout}\n{res.stderr}")

    def start_supernode(self, node: int, node_config: str) -> subprocess.Popen:
        """A SuperNode that reaches the SuperLink through the gateway, as a device on the network would."""
        return self.start(f"node{node}", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.gateway_port}",
            "--root-certificates", self.certs["ca"],
            "--auth-supernode-private-key", self.certs["nodes"][node]["private"],
            "--node-config", node_config,
            "--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "3", "--max-wait-time", "20"])

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)
