"""Flower ClientApp: check the request against the device's policy, encode the device's images with E1,
apply the mechanisms, seal, reply (docs/spec.md §1, federated scenario; docs/privacy.md).

Every message carries the server key, the parameters and the chunk index. E1's weights travel once per node
and run: the first request carries them, the node keeps them in its run state (`context.state`, which Flower
hands to every message of the run, in a fresh process or not), and later requests name them by hash; a
node that has lost them (restarted) answers `encoder_missing` and the server sends them again. Pixels
never leave this function, and what does leave is exactly `shared/release.py`'s fields. Timings and
memory stay in the device's own log.

Where the images come from (node config):
- `data-dir=/path`: the device's own folder (client/local_data.py), as a deployed edge device runs;
- `partition-id` / `num-partitions`: a share of the bundled dataset, cut by the rule the server names
  (Flower's simulation engine, and tests).
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.encode import encode_images
from client.local_data import load_local_folder
from client.policy import DevicePolicy, PolicyRefusal, encoder_sha256
from client.privacy import release_records
from shared.accounting import ImageRelease
from shared.config import DataConfig
from shared.data import StoredSplit, private_share
from shared.models.first_encoder import FirstEncoder
from shared.partition import partition
from shared.release import ENCODER_MISSING
from shared.sealing import encode_payload, seal

app = ClientApp()
log = logging.getLogger("fedcondense.device")
_LOCAL: dict = {}


def local_records(cfg: ConfigRecord, node_config: dict) -> StoredSplit:
    """This device's images as stored (uint8). Kept per process, so a node asked for several chunks
    reads its data once."""
    data_cfg = DataConfig(**json.loads(cfg["data_config"]))
    if node_config.get("data-dir"):
        key = ("folder", str(node_config["data-dir"]), data_cfg.image_size)
        if key not in _LOCAL:
            _LOCAL[key] = load_local_folder(str(node_config["data-dir"]), data_cfg.dataset,
                                            tuple(cfg["native_shape"]), data_cfg.image_size, int(cfg["num_classes"]))
        return _LOCAL[key]
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode has no data: set data-dir=/folder/of/images in its --node-config "
                         "(or partition-id and num-partitions for a share of the bundled dataset)")
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    key = (cfg["data_config"], pid, num, cfg["iid"], cfg["alpha"], cfg["partition_seed"])
    if key not in _LOCAL:
        if len(_LOCAL) >= 32:                      # a long-lived simulation actor serving many nodes
            _LOCAL.clear()
        rule = lambda labels: partition(labels, num, iid=bool(cfg["iid"]), alpha=float(cfg["alpha"]),
                                        seed=int(cfg["partition_seed"]))[pid]
        _LOCAL[key] = private_share(data_cfg, rule)
    return _LOCAL[key]


def requested_release(cfg: ConfigRecord) -> ImageRelease:
    label_mech = str(cfg["label_mechanism"])
    return ImageRelease(float(cfg["clip_norm"]), float(cfg["noise_multiplier"]), float(cfg["delta"]), label_mech,
                        float(cfg["label_epsilon"]) or None, int(cfg["num_classes"]),
                        group_size=int(cfg.get("group_size", 1)))


class EncoderMissing(Exception):
    """The request names E1 by hash, and this node does not hold it (a restarted node has lost its state)."""


def load_first_encoder(content: RecordDict, context: Context) -> tuple[FirstEncoder, str]:
    """E1 from the request when the server sends it (once per node per run), kept in the node's run state
    for the later chunks; otherwise the copy held, which must match the hash the request names."""
    if "first_encoder" in content:
        context.state["first_encoder"] = content["first_encoder"]
        context.state["first_encoder_config"] = content["first_encoder_config"]
    elif "first_encoder" not in context.state:
        raise EncoderMissing("the request names the first encoder by hash and this node holds no copy for this run")
    state = context.state["first_encoder"].to_torch_state_dict()
    digest = encoder_sha256(state)
    if digest != str(content["config"].get("encoder_sha256") or digest):
        raise EncoderMissing(f"the request names encoder {str(content['config']['encoder_sha256'])[:12]}, this node "
                             f"holds {digest[:12]}")
    enc = FirstEncoder(**json.loads(context.state["first_encoder_config"]["json"]))
    enc.load_state_dict(state)
    return enc.eval(), digest


def encode_chunk(content: RecordDict, context: Context) -> tuple[dict, dict]:
    """Policy check first, then encode, release and seal one chunk; returns (envelope, mechanism)."""
    cfg = content["config"]
    torch.set_num_threads(int(cfg.get("threads", 1)))
    release = requested_release(cfg)
    e1, e1_hash = load_first_encoder(content, context)
    epsilon = DevicePolicy.from_node_config(dict(context.node_config)).check(release, e1_hash)
    local = local_records(cfg, dict(context.node_config))
    chunk, size = int(cfg["chunk"]), int(cfg["chunk_size"])
    num_chunks = max(1, math.ceil(len(local) / size))
    if not 0 <= chunk < num_chunks:
        raise ValueError(f"chunk {chunk} requested, this device holds {num_chunks}")
    part = local.subset(torch.arange(chunk * size, min((chunk + 1) * size, len(local)))).converted()
    start = time.time()
    latents, labels = release_records(encode_images(e1, part.images, device=torch.device("cpu")), part.labels, release)
    env = seal(encode_payload(latents, labels), bytes(cfg["server_public"]), str(cfg["run_id"]), int(cfg["node_id"]),
               int(cfg["round"]), chunk, num_chunks)
    log.info("chunk %d/%d: %d records (%d released) in %.2fs, peak RSS %.0f MB", chunk + 1, num_chunks, len(part),
             len(labels), time.time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    mechanism = {"clip_norm": release.clip_norm, "noise_multiplier": release.noise_multiplier, "delta": release.delta,
                 "label_mechanism": release.label_mechanism, "label_epsilon": float(release.label_epsilon or 0.0),
                 "group_size": release.group_size, "epsilon": float(epsilon), "encoder_sha256": e1_hash}
    return env, mechanism


def refusal_reply(msg: Message, code: str, reason: str) -> Message:
    return Message(RecordDict({"refusal": ConfigRecord({"code": code, "reason": reason})}), reply_to=msg)


@app.query("encode")
def encode(msg: Message, context: Context) -> Message:
    try:
        env, mechanism = encode_chunk(msg.content, context)
    except PolicyRefusal as refusal:
        log.warning("refused the server's request: %s", refusal)
        return refusal_reply(msg, refusal.code, refusal.reason)
    except EncoderMissing as missing:
        log.info("asking the server for the first encoder: %s", missing)
        return refusal_reply(msg, ENCODER_MISSING, str(missing))
    return Message(RecordDict({"envelope": ConfigRecord(env), "mechanism": ConfigRecord(mechanism)}), reply_to=msg)

