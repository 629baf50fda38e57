"""Server side of the federation: distribute E1 + key, collect sealed chunks, validate, pool (issue 3 §2).

Protocol (Flower Message API, message type `query.encode`): the server asks every node for chunk 0,
learns each node's chunk count from its first envelope, then asks for the next chunk of every node
still pending, until all are in. A node whose reply is missing (timeout), carries an error, or fails
validation is dropped and whatever it staged is discarded; the others go on.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from server.pool import LatentPool
from shared.config import DataConfig, FederationConfig
from shared.models.first_encoder import FirstEncoder
from shared.sealing import Limits, Opener, SubmissionRejected, raw_public

log = logging.getLogger("fedcondense.federation")


def wait_for_nodes(grid, expected: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.time() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {timeout:.0f}s: start them with `flower-supernode` "
                           "(see deploy/README.md) or check the SuperLink address")
    return sorted(nodes)


def request(e1: FirstEncoder, data_cfg: DataConfig, fed: FederationConfig, run_id: str, server_public: bytes,
            node_id: int, round_: int, chunk: int, num_classes: int) -> RecordDict:
    cfg = ConfigRecord({
        "run_id": run_id, "node_id": int(node_id), "round": round_, "chunk": chunk, "chunk_size": fed.chunk_size,
        "server_public": server_public, "data_config": json.dumps(asdict(data_cfg)), "iid": fed.iid,
        "alpha": float(fed.alpha), "partition_seed": fed.partition_seed, "clip_norm": float(fed.clip_norm),
        "noise_multiplier": float(fed.noise_multiplier), "noise_seed": fed.partition_seed,
        "threads": fed.client_threads, "num_classes": num_classes,
        "latent_shape": [e1.config.latent_channels, data_cfg.image_size // 2 ** len(e1.config.channels),
                         data_cfg.image_size // 2 ** len(e1.config.channels)]})
    return RecordDict({"config": cfg, "first_encoder": ArrayRecord(e1.state_dict()),
                       "first_encoder_config": ConfigRecord({"json": json.dumps(public_config(e1))})})


def public_config(model) -> dict:
    """A diffusers config without its private bookkeeping keys (`_name_or_path`, versions)."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


class Collection:
    """Book-keeping of one collection round: per-node progress, drops, rejections, traffic."""

    def __init__(self, pool: LatentPool, opener: Opener, round_: int):
        self.pool, self.opener, self.round = pool, opener, round_
        self.next_chunk: dict[int, int] = {}
        self.num_chunks: dict[int, int] = {}
        self.stats: dict[int, dict] = {}
        self.dropped: dict[int, str] = {}
        self.rejections: list[dict] = []
        self.bytes_received = 0

    def drop(self, node: int, reason: str) -> None:
        discarded = self.pool.discard(node)
        self.next_chunk.pop(node, None)
        self.dropped[node] = reason
        log.warning("node %s dropped: %s (%d staged chunks discarded)", node, reason, discarded)

    def accept(self, node: int, content: RecordDict, num_classes: int) -> None:
        env = dict(content["envelope"])
        ct = env.get("ciphertext")
        self.bytes_received += len(ct) if isinstance(ct, (bytes, bytearray)) else 0
        chunk = self.next_chunk[node]
        if int(env.get("chunk", -1)) != chunk:
            raise SubmissionRejected("order", f"expected chunk {chunk}, got {env.get('chunk')}")
        latents, labels = self.opener.open(env, node, self.round)
        self.pool.stage(node, chunk, latents, labels)
        self.num_chunks[node] = int(env["num_chunks"])
        st = self.stats.setdefault(node, {"encode_seconds": 0.0, "ciphertext_bytes": 0, "raw_image_bytes": 0,
                                          "latents": 0, "peak_rss_mb": 0.0})
        m = dict(content["stats"])
        st["partition_id"] = int(m["partition_id"])
        st["encode_seconds"] += float(m["encode_seconds"])
        st["ciphertext_bytes"] += int(m["ciphertext_bytes"])
        st["raw_image_bytes"] += int(m["raw_image_bytes"])
        st["latents"] += len(labels)
        st["peak_rss_mb"] = max(st["peak_rss_mb"], float(m["peak_rss_mb"]))
        self.next_chunk[node] = chunk + 1
        if self.next_chunk[node] == self.num_chunks[node]:
            del self.next_chunk[node]
            self.pool.commit(node, self.num_chunks[node], {"num_classes": num_classes, "round": self.round, **st})


def collect(grid, e1: FirstEncoder, data_cfg: DataConfig, fed: FederationConfig, pool: LatentPool,
            num_classes: int, round_: int = 0) -> dict:
    """Runs the collection; returns the federation section of the report.

    After every request round `pool.root/../collect_status.json` tells operators (and tests) where
    the collection stands.
    """
    key = X25519PrivateKey.generate()
    run_id = uuid.uuid4().hex
    latent_side = data_cfg.image_size // 2 ** len(e1.config.channels)
    opener = Opener(key, run_id, Limits((e1.config.latent_channels, latent_side, latent_side), num_classes,
                                        max_chunk_latents=fed.chunk_size))
    nodes = wait_for_nodes(grid, fed.clients, fed.connect_timeout)
    done_before = pool.committed_nodes()
    col = Collection(pool, opener, round_)
    col.next_chunk = {n: 0 for n in nodes if n not in done_before}
    start, requests = time.time(), 0
    while col.next_chunk:
        msgs = [Message(request(e1, data_cfg, fed, run_id, raw_public(key.public_key()), n, round_, c, num_classes),
                        dst_node_id=n, message_type="query.encode", group_id=f"collect-{round_}")
                for n, c in col.next_chunk.items()]
        replied = set()
        wait = fed.timeout + (fed.startup_grace if requests == 0 else 0.0)
        for reply in grid.send_and_receive(msgs, timeout=wait):
            node = reply.metadata.src_node_id
            replied.add(node)
            if node not in col.next_chunk:
                continue
            if reply.has_error():
                col.drop(node, f"client error: {reply.error.reason}")
                continue
            try:
                col.accept(node, reply.content, num_classes)
            except SubmissionRejected as exc:
                col.rejections.append({"node_id": node, "code": exc.code, "detail": exc.detail})
                log.warning("rejected submission of node %s: %s", node, exc)
                col.drop(node, f"rejected: {exc.code}")
        for node in [n for n in col.next_chunk if n not in replied]:
            col.drop(node, f"no reply within {wait:.0f}s")
        requests += 1
        status = {"requests": requests, "pending": {str(n): c for n, c in col.next_chunk.items()},
                  "committed": sorted(pool.committed_nodes()), "dropped": {str(n): r for n, r in col.dropped.items()}}
        (pool.root.parent / "collect_status.json").write_text(json.dumps(status))
    return {"run_id": run_id, "nodes": nodes, "resumed_nodes": sorted(done_before & set(nodes)),
            "accepted_nodes": sorted(pool.committed_nodes()), "dropped_nodes": col.dropped,
            "rejections": col.rejections, "bytes_received": col.bytes_received, "collect_seconds": time.time() - start,
            "clients": {str(n): s for n, s in col.stats.items()}}
