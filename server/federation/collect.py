"""Server side of the federation: send E1, key and parameters; collect sealed chunks; validate; pool.

Protocol (Flower Message API, message type `query.encode`): the server asks every node for chunk 0,
learns each node's chunk count from its first envelope, then asks for the next chunk of every node
still pending, until all are in. A node that misses a round's wait is asked again (bounded, with
backoff); its earlier requests stay outstanding, and a late reply to any of them that carries the chunk
the node still owes is accepted (a SuperNode restarted mid-collection answers the request its killed
process had taken, late); replies to superseded requests are ignored. A node whose reply carries an
error, is a refusal of the device's policy, or fails validation, or that stays silent past its retries,
is dropped and whatever it staged is discarded; the others go on. Whatever a node sends, `collect` does not raise: each bad reply becomes a rejection
code and a drop. Memory staged per node and in total is capped, and the collection ends by an
overall deadline.
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import asdict

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode

from client.policy import encoder_sha256
from server.federation.pool import LatentPool
from shared.accounting import ImageRelease
from shared.config import DataConfig, FederationConfig
from shared.durable import write_json
from shared.models.first_encoder import FirstEncoder
from shared.release import ENCODER_MISSING, REFUSAL_FIELDS, REPLY_FIELDS
from shared.sealing import Limits, Opener, SubmissionRejected, raw_public

log = logging.getLogger("fedcondense.federation")
# Errors the SuperLink itself writes for a node it cannot reach (Flower's ErrorCode): the node may come back,
# so they count as a missed round (retried within `retries`), not as the node's own error
LINK_UNAVAILABLE = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}


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


def mechanism_request(release: ImageRelease) -> dict:
    return {"clip_norm": float(release.clip_norm), "noise_multiplier": float(release.noise_multiplier),
            "delta": float(release.delta), "label_mechanism": release.label_mechanism,
            "label_epsilon": float(release.label_epsilon or 0.0), "group_size": int(release.group_size)}


def encoder_records(e1: FirstEncoder) -> dict:
    """E1 as the records of a request (built once per collection, shared by every request that carries it)."""
    return {"first_encoder": ArrayRecord(e1.state_dict()),
            "first_encoder_config": ConfigRecord({"json": json.dumps(public_config(e1))})}


def request(e1: FirstEncoder, data_cfg: DataConfig, fed: FederationConfig, release: ImageRelease, run_id: str,
            server_public: bytes, node_id: int, round_: int, chunk: int, num_classes: int,
            native_shape: tuple[int, int], encoder: dict | None = None, e1_hash: str = "") -> RecordDict:
    """One node's request for one chunk. `encoder`: E1's records (`encoder_records`) for a node that does not
    hold them yet this run; without them, the node uses its copy, named by `e1_hash`."""
    side = data_cfg.image_size // 2 ** len(e1.config.channels)
    cfg = ConfigRecord({
        "run_id": run_id, "node_id": int(node_id), "round": round_, "chunk": chunk, "chunk_size": fed.chunk_size,
        "server_public": server_public, "data_config": json.dumps(asdict(data_cfg)), "iid": fed.iid,
        "alpha": float(fed.alpha), "partition_seed": fed.partition_seed, "threads": fed.client_threads,
        "num_classes": num_classes, "native_shape": list(native_shape), "encoder_sha256": e1_hash,
        "latent_shape": [e1.config.latent_channels, side, side], **mechanism_request(release)})
    return RecordDict({"config": cfg, **(encoder or {})})


def record_bytes(content: RecordDict) -> int:
    """Size of a message's records as Flower serialises them for the wire (protobuf, before gRPC framing)."""
    from flwr.common.serde import recorddict_to_proto
    return recorddict_to_proto(content).ByteSize()


def public_config(model) -> dict:
    """A diffusers config without its private bookkeeping keys (`_name_or_path`, versions)."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def _typed(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def check_reply(content: RecordDict) -> tuple[str, dict, dict]:
    """('refusal', fields, {}) or ('envelope', envelope, mechanism), every record and field exactly as
    shared/release.py declares it; anything else raises SubmissionRejected('malformed')."""
    try:
        names = set(content.keys())
    except Exception:
        raise SubmissionRejected("malformed", "the reply is not a record dict") from None
    expected = {"refusal"} if names == {"refusal"} else set(REPLY_FIELDS)
    if names != expected:
        raise SubmissionRejected("malformed", f"reply records {sorted(names)}, expected {sorted(REPLY_FIELDS)} "
                                              f"or ['refusal']")
    schema = {"refusal": REFUSAL_FIELDS} if names == {"refusal"} else REPLY_FIELDS
    records = {}
    for rec, fields in schema.items():
        if not isinstance(content[rec], ConfigRecord):
            raise SubmissionRejected("malformed", f"record '{rec}' is not a ConfigRecord")
        got = dict(content[rec])
        if set(got) != set(fields):
            raise SubmissionRejected("malformed", f"record '{rec}' has fields {sorted(got)}, expected {sorted(fields)}"
                                                  " (a field outside shared/release.py would leave the ledger)")
        wrong = [k for k, (types, _, _) in fields.items() if not _typed(got[k], types)]
        if wrong:
            raise SubmissionRejected("malformed", f"record '{rec}': fields {wrong} have the wrong type")
        records[rec] = got
    if names == {"refusal"}:
        return "refusal", records["refusal"], {}
    return "envelope", records["envelope"], records["mechanism"]


class Collection:
    """Book-keeping of one collection round: per-node progress, drops, rejections, traffic, staged bytes."""

    def __init__(self, pool: LatentPool, opener: Opener, round_: int, expected: dict, fed: FederationConfig):
        self.pool, self.opener, self.round, self.expected, self.fed = pool, opener, round_, expected, fed
        self.next_chunk: dict[int, int] = {}
        self.num_chunks: dict[int, int] = {}
        self.stats: dict[int, dict] = {}
        self.staged_bytes: dict[int, int] = {}
        self.dropped: dict[int, str] = {}
        self.rejections: list[dict] = []
        self.refusals: dict[int, dict] = {}
        self.bytes_received = 0
        self.holds_encoder: set[int] = set()        # nodes that replied to a request carrying E1 this run
        self.encoder_resends: dict[int, int] = {}   # E1 sent again to a node that had lost it
        self.outstanding: dict[str, tuple[int, int]] = {}   # message id -> (node, chunk asked), across rounds
        self.latest: dict[int, str] = {}            # node -> its newest request's message id
        self.late_replies: list[dict] = []          # replies accepted to a request of an earlier round

    def drop(self, node: int, reason: str) -> None:
        discarded = self.pool.discard(node)
        self.staged_bytes.pop(node, None)
        self.next_chunk.pop(node, None)
        self.dropped[node] = reason
        log.warning("node %s dropped: %s (%d staged chunks discarded)", node, reason, discarded)

    def reject(self, node: int, code: str, detail: str) -> None:
        self.rejections.append({"node_id": node, "code": code, "detail": detail[:500]})
        log.warning("rejected the reply of node %s: %s: %s", node, code, detail[:500])
        self.drop(node, f"rejected: {code}")

    def handle(self, node: int, reply: Message) -> None:
        """One reply; never raises: every failure is a rejection code and a drop."""
        try:
            if reply.has_error():
                self.drop(node, f"client error: {str(reply.error.reason)[:300]}")
                return
            kind, fields, mechanism = check_reply(reply.content)
            if kind == "refusal" and fields["code"] == ENCODER_MISSING:
                self.encoder_missing(node, fields["reason"])
                return
            if kind == "refusal":
                self.refusals[node] = fields
                log.warning("node %s refused by its device policy: %s: %s", node, fields["code"], fields["reason"])
                self.drop(node, f"refused by the device's policy: {fields['code']}: {fields['reason'][:300]}")
                return
            self.accept(node, fields, mechanism)
        except SubmissionRejected as exc:
            self.reject(node, exc.code, exc.detail)
        except Exception as exc:             # a reply must never end the collection
            self.reject(node, "invalid", f"{type(exc).__name__}: {exc}")

    def encoder_missing(self, node: int, reason: str) -> None:
        """A node without E1 (restarted since it got it) is sent it again, at most `retries` times."""
        self.holds_encoder.discard(node)
        self.encoder_resends[node] = self.encoder_resends.get(node, 0) + 1
        if self.encoder_resends[node] > self.fed.retries:
            self.drop(node, f"lost the first encoder {self.encoder_resends[node]} times: {reason[:200]}")
        else:
            log.info("node %s holds no first encoder (%s); sending it again", node, reason[:200])

    def accept(self, node: int, env: dict, mechanism: dict) -> None:
        applied = {k: mechanism[k] for k in self.expected}
        if applied != self.expected:
            raise SubmissionRejected("mechanism", f"the device applied {applied}, the server asked for {self.expected}")
        self.bytes_received += len(env["ciphertext"])
        chunk = self.next_chunk[node]
        if env["chunk"] != chunk:
            raise SubmissionRejected("order", f"expected chunk {chunk}, got {env['chunk']}")
        max_chunks = max(1, math.ceil(self.fed.max_node_records / self.fed.chunk_size))
        if not 0 < env["num_chunks"] <= max_chunks or self.num_chunks.get(node, env["num_chunks"]) != env["num_chunks"]:
            raise SubmissionRejected("oversized", f"{env['num_chunks']} chunks declared (at most {max_chunks}, "
                                                  f"constant over a node's chunks)")
        latents, labels = self.opener.open(env, node, self.round)
        self.holds_encoder.add(node)
        size = latents.numel() * 2 + labels.numel()
        if sum(self.staged_bytes.values()) + size > self.fed.max_staged_mb * 2**20:
            raise SubmissionRejected("staging_cap", f"staging {size} more bytes would pass the server's cap of "
                                                    f"{self.fed.max_staged_mb:.0f} MB")
        self.pool.stage(node, chunk, latents.half(), labels)
        self.staged_bytes[node] = self.staged_bytes.get(node, 0) + size
        self.num_chunks[node] = env["num_chunks"]
        st = self.stats.setdefault(node, {"ciphertext_bytes": 0, "latents": 0, "chunks": 0})
        st["ciphertext_bytes"] += len(env["ciphertext"])
        st["latents"] += len(labels)
        st["chunks"] += 1
        st["mechanism"] = {**mechanism, "epsilon": mechanism["epsilon"] if math.isfinite(mechanism["epsilon"]) else "inf"}
        self.next_chunk[node] = chunk + 1
        if self.next_chunk[node] == self.num_chunks[node]:
            del self.next_chunk[node]
            self.staged_bytes.pop(node, None)
            self.pool.commit(node, self.num_chunks[node], {"num_classes": self.opener.limits.num_classes,
                                                           "round": self.round, **st})


def check_resume(pool: LatentPool, expected: dict, e1_hash: str) -> set[int]:
    """The nodes an earlier run of this output folder committed, if it asked for the same mechanisms and
    encoder; a pool collected under other settings is refused, never mixed."""
    done = set()
    for entry in pool.provenance():
        mech = entry.get("mechanism") or {}
        asked = {k: mech.get(k, 1 if k == "group_size" else None) for k in expected}   # group_size: 1 before it existed
        if asked != expected or mech.get("encoder_sha256") != e1_hash:
            raise RuntimeError(f"the pool in {pool.root} holds node {entry.get('node_id')}'s latents collected under "
                               f"{asked} with encoder {str(mech.get('encoder_sha256'))[:12]}; this run asks for "
                               f"{expected} with encoder {e1_hash[:12]}. Use a new output folder (--out), or the "
                               f"same settings to resume")
        done.add(entry["node_id"])
    return done


def collect(grid, e1: FirstEncoder, data_cfg: DataConfig, fed: FederationConfig, release: ImageRelease,
            pool: LatentPool, num_classes: int, native_shape: tuple[int, int], round_: int = 0) -> dict:
    """Runs the collection; returns the federation section of the report.

    Nodes are asked in waves of at most `fed.wave` (nodes already under way first), which bounds the
    requests in flight and the server's memory. After every request round `pool.root/../collect_status.json`
    tells operators (and tests) where the collection stands.
    """
    key = X25519PrivateKey.generate()
    run_id = uuid.uuid4().hex
    side = data_cfg.image_size // 2 ** len(e1.config.channels)
    opener = Opener(key, run_id, Limits((e1.config.latent_channels, side, side), num_classes,
                                        max_chunk_latents=fed.chunk_size,
                                        max_chunks=max(1, math.ceil(fed.max_node_records / fed.chunk_size))))
    expected = mechanism_request(release)
    e1_hash = encoder_sha256(e1.state_dict())
    done_before = check_resume(pool, expected, e1_hash)
    nodes = wait_for_nodes(grid, fed.clients, fed.connect_timeout)
    col = Collection(pool, opener, round_, expected, fed)
    col.next_chunk = {n: 0 for n in nodes if n not in done_before}
    ask = lambda n, c: request(e1, data_cfg, fed, release, run_id, raw_public(key.public_key()), n, round_, c,
                               num_classes, native_shape, None if n in col.holds_encoder else encoder, e1_hash)
    encoder = encoder_records(e1)
    traffic = {"request_bytes": 0, "reply_bytes": 0, "encoder_sends": 0, "encoder_bytes": record_bytes(RecordDict(encoder))}
    start, requests, missed, retries = time.time(), 0, {}, []
    while col.next_chunk:
        left = fed.deadline - (time.time() - start)
        if left <= 0:
            for node in list(col.next_chunk):
                col.drop(node, f"the collection's deadline of {fed.deadline:.0f}s passed")
            break
        wave = dict(list(col.next_chunk.items())[:max(1, fed.wave)])
        attempt = max(missed.get(n, 0) for n in wave)
        wait = min(fed.timeout * fed.retry_backoff ** attempt + (fed.startup_grace if requests == 0 else 0.0), left)
        replied = exchange(grid, [(n, ask(n, c)) for n, c in wave.items()], wait, col, round_, traffic)
        for node in [n for n in wave if n not in replied and n in col.next_chunk]:
            missed[node] = missed.get(node, 0) + 1
            if missed[node] > fed.retries:
                col.drop(node, f"no reply within {wait:.0f}s, after {fed.retries} retries")
            else:
                retries.append({"node_id": node, "chunk": col.next_chunk[node], "attempt": missed[node]})
                log.warning("node %s: no reply within %.0fs; asking again (%d of %d)", node, wait, missed[node],
                            fed.retries)
        for node in replied:
            missed.pop(node, None)
        requests += 1
        status = {"requests": requests, "pending": {str(n): c for n, c in col.next_chunk.items()}, "retries": retries,
                  "committed": sorted(pool.committed_nodes()), "dropped": {str(n): r for n, r in col.dropped.items()}}
        write_json(pool.root.parent / "collect_status.json", status)
    return {"run_id": run_id, "nodes": nodes, "resumed_nodes": sorted(done_before),
            "accepted_nodes": sorted(pool.committed_nodes()), "dropped_nodes": col.dropped,
            "rejections": col.rejections, "refusals": {str(n): r for n, r in col.refusals.items()}, "retries": retries,
            "encoder_resends": {str(n): k for n, k in col.encoder_resends.items()}, "late_replies": col.late_replies,
            "bytes_received": col.bytes_received, "traffic": {**traffic, "request_rounds": requests},
            "collect_seconds": time.time() - start, "encoder_sha256": e1_hash, "requested_mechanism": expected,
            "clients": {str(n): s for n, s in col.stats.items()}}


def exchange(grid, requests: list[tuple[int, RecordDict]], wait: float, col: Collection, round_: int,
             traffic: dict, poll: float = 0.5) -> set[int]:
    """Push one wave of requests, then pull replies to every outstanding request (this round's and earlier
    ones') until each node of the wave has answered or `wait` has passed; returns the nodes answered."""
    msgs = []
    for node, content in requests:                 # E1's size is measured once, not serialised per request
        carries = "first_encoder" in content
        traffic["request_bytes"] += record_bytes(RecordDict({"config": content["config"]})) + \
            carries * traffic["encoder_bytes"]
        traffic["encoder_sends"] += carries
        msgs.append(Message(content, dst_node_id=node, message_type="query.encode", group_id=f"collect-{round_}"))
    pushed = set(grid.push_messages(msgs))        # a message the link did not take counts as unanswered
    for (node, content), msg in zip(requests, msgs):
        if msg.metadata.message_id in pushed:
            col.outstanding[msg.metadata.message_id] = (node, int(content["config"]["chunk"]))
            col.latest[node] = msg.metadata.message_id
    wave, replied, end = {node for node, _ in requests}, set(), time.time() + wait
    while True:
        for reply in (grid.pull_messages(list(col.outstanding)) if col.outstanding else ()):
            answered = take_reply(reply, col, replied, traffic)
            replied |= {answered} if answered is not None else set()
        if not {n for n in wave if n in col.next_chunk} - replied or time.time() >= end:
            break
        time.sleep(min(poll, max(0.0, end - time.time())))
    col.outstanding = {m: (n, c) for m, (n, c) in col.outstanding.items() if n in col.next_chunk}
    return replied


def take_reply(reply: Message, col: Collection, replied: set[int], traffic: dict) -> int | None:
    """Hand `reply` to `col` if it answers a request for the chunk its node still owes (the node's newest
    request, or an earlier one answered late without an error); the node, or None for a superseded reply."""
    mid = reply.metadata.reply_to_message_id
    node, chunk = col.outstanding.pop(mid, (None, None))
    if node is None or node not in col.next_chunk or node in replied or col.next_chunk[node] != chunk:
        return None
    newest = col.latest.get(node) == mid
    if reply.has_error() and getattr(reply.error, "code", None) in LINK_UNAVAILABLE:
        log.info("node %s: the link reports it unavailable (%s); it is asked again", node, str(reply.error.reason)[:200])
        return None                                # a node between sessions (restarting): a missed round, not a drop
    if not newest and reply.has_error():
        return None                                # e.g. an earlier request expiring: the newest still stands
    if not newest:
        col.late_replies.append({"node_id": node, "chunk": chunk})
        log.info("node %s: accepted a late reply to an earlier request for chunk %d", node, chunk)
    if not reply.has_error():
        try:
            traffic["reply_bytes"] += record_bytes(reply.content)
        except Exception:          # not serialisable: `handle` rejects it, with its reason
            pass
    col.handle(node, reply)
    return node
