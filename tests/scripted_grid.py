"""A Flower grid whose nodes are scripted: honest ones run the real device code (client/app.py) on the
real request, malicious ones change or replace its reply. For the server's intake tests."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client.app import EncoderMissing, encode_chunk
from client.policy import PolicyRefusal
from shared.accounting import ImageRelease
from shared.config import DataConfig, FederationConfig
from shared.models.first_encoder import FirstEncoder
from shared.release import ENCODER_MISSING

DATA = DataConfig(train_limit=300, test_limit=100)


def tiny_encoder() -> FirstEncoder:
    torch.manual_seed(0)
    return FirstEncoder(1, 4, (16, 32)).eval()


def device_context(node: int, node_config: dict) -> Context:
    return Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})


def honest(content: RecordDict, node: int, node_config: dict, context: Context | None = None) -> RecordDict:
    """The real device: policy, encoding, mechanisms, sealing. `context`: the node's run state (Flower keeps
    one per node and run); a fresh one is a node that has just started."""
    try:
        env, mechanism = encode_chunk(content, context or device_context(node, node_config))
    except PolicyRefusal as refusal:
        return RecordDict({"refusal": ConfigRecord({"code": refusal.code, "reason": refusal.reason})})
    except EncoderMissing as missing:
        return RecordDict({"refusal": ConfigRecord({"code": ENCODER_MISSING, "reason": str(missing)})})
    return RecordDict({"envelope": ConfigRecord(env), "mechanism": ConfigRecord(mechanism)})


@dataclass
class Node:
    node_config: dict
    mutate: Optional[Callable] = None        # (honest reply content, request content) -> content, or None: no reply
    delay: float | Callable = 0.0             # seconds until a reply is visible; or request number -> seconds
    error: Optional[str] = None
    requests: list = field(default_factory=list)
    restart_before: tuple = ()               # request numbers before which the node restarts (loses its state)
    context: Optional[Context] = None


class ScriptedGrid:
    def __init__(self, nodes: dict[int, Node]):
        from flwr.supercore.task_identity import TaskIdentity
        self.nodes = nodes
        self._ids, self._replies = itertools.count(), {}      # message id -> (visible from, reply)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1    # as in a ServerApp process

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Each node answers at once, in order; its reply becomes visible `delay` seconds later."""
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            reply = self._answer(msg, mid)
            node = self.nodes[msg.metadata.dst_node_id]
            if reply is not None:
                delay = node.delay(len(node.requests) - 1) if callable(node.delay) else node.delay
                self._replies[mid] = (time.time() + delay, reply)
        return ids

    def pull_messages(self, message_ids):
        now, out = time.time(), []
        for mid in list(message_ids):
            if mid in self._replies and self._replies[mid][0] <= now:
                out.append(self._replies.pop(mid)[1])
        return out

    def _answer(self, msg, mid):
        node_id = msg.metadata.dst_node_id
        node = self.nodes[node_id]
        node.requests.append(int(msg.content["config"]["chunk"]))
        meta = SimpleNamespace(src_node_id=node_id, reply_to_message_id=mid)
        if node.error:
            return SimpleNamespace(metadata=meta, has_error=lambda: True, error=SimpleNamespace(reason=node.error),
                                   content=None)
        if node.context is None or len(node.requests) - 1 in node.restart_before:
            node.context = device_context(node_id, node.node_config)
        content = honest(msg.content, node_id, node.node_config, node.context)
        if node.mutate is not None:
            content = node.mutate(content, msg.content)
            if content is None:
                return None
        return SimpleNamespace(metadata=meta, has_error=lambda: False, content=content)


def no_dp() -> ImageRelease:
    return ImageRelease(0.0, 0.0, 0.0, "public", None, 10)


def fed_config(**changes) -> FederationConfig:
    base = dict(clients=2, chunk_size=100, timeout=30.0, startup_grace=0.0, connect_timeout=1.0)
    return FederationConfig(**{**base, **changes})
