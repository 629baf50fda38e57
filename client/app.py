"""Flower ClientApp: check the request against the device's policy, encode the device's images with E1,
apply the mechanisms, seal, reply (docs/spec.md §1, federated scenario; docs/privacy.md).

Every message is self-contained (E1 weights, server key, parameters, chunk index), because a deployed
SuperNode starts a fresh process per message. Pixels never leave this function, and what does leave
is exactly `shared/release.py`'s fields. Timings and memory stay in the device's own log.

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
from client.privacy import gaussian_mechanism, randomized_response
from shared.accounting import ImageRelease
from shared.config import DataConfig
from shared.data import StoredSplit, stored_splits
from shared.models.first_encoder import FirstEncoder
from shared.partition import partition
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
        if len(_LOCAL) >= 32:                      # a long-lived simulation actor serving many runs
            _LOCAL.clear()
        data = stored_splits(data_cfg)
        parts = partition(data.private.labels.numpy(), num, iid=bool(cfg["iid"]), alpha=float(cfg["alpha"]),
                          seed=int(cfg["partition_seed"]))
        _LOCAL[key] = data.private.subset(parts[pid])
    return _LOCAL[key]


def requested_release(cfg: ConfigRecord) -> ImageRelease:
    label_mech = str(cfg["label_mechanism"])
    return ImageRelease(float(cfg["clip_norm"]), float(cfg["noise_multiplier"]), float(cfg["delta"]), label_mech,
                        float(cfg["label_epsilon"]) or None, int(cfg["num_classes"]))


def load_first_encoder(content: RecordDict) -> tuple[FirstEncoder, str]:
    state = content["first_encoder"].to_torch_state_dict()
    enc = FirstEncoder(**json.loads(content["first_encoder_config"]["json"]))
    enc.load_state_dict(state)
    return enc.eval(), encoder_sha256(state)


def encode_chunk(content: RecordDict, context: Context) -> tuple[dict, dict]:
    """Policy check first, then encode, release and seal one chunk; returns (envelope, mechanism)."""
    cfg = content["config"]
    torch.set_num_threads(int(cfg.get("threads", 1)))
    release = requested_release(cfg)
    e1, e1_hash = load_first_encoder(content)
    epsilon = DevicePolicy.from_node_config(dict(context.node_config)).check(release, e1_hash)
    local = local_records(cfg, dict(context.node_config))
    chunk, size = int(cfg["chunk"]), int(cfg["chunk_size"])
    num_chunks = max(1, math.ceil(len(local) / size))
    if not 0 <= chunk < num_chunks:
        raise ValueError(f"chunk {chunk} requested, this device holds {num_chunks}")
    part = local.subset(torch.arange(chunk * size, min((chunk + 1) * size, len(local)))).converted()
    start = time.time()
    latents = gaussian_mechanism(encode_images(e1, part.images, device=torch.device("cpu")), release.clip_norm,
                                 release.noise_multiplier)
    labels = part.labels
    if release.private and release.label_mechanism == "randomized_response":
        labels = randomized_response(labels, release.label_epsilon, release.num_classes)
    env = seal(encode_payload(latents, labels), bytes(cfg["server_public"]), str(cfg["run_id"]), int(cfg["node_id"]),
               int(cfg["round"]), chunk, num_chunks)
    log.info("chunk %d/%d: %d records in %.2fs, peak RSS %.0f MB", chunk + 1, num_chunks, len(part),
             time.time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    mechanism = {"clip_norm": release.clip_norm, "noise_multiplier": release.noise_multiplier, "delta": release.delta,
                 "label_mechanism": release.label_mechanism, "label_epsilon": float(release.label_epsilon or 0.0),
                 "epsilon": float(epsilon), "encoder_sha256": e1_hash}
    return env, mechanism


@app.query("encode")
def encode(msg: Message, context: Context) -> Message:
    try:
        env, mechanism = encode_chunk(msg.content, context)
    except PolicyRefusal as refusal:
        log.warning("refused the server's request: %s", refusal)
        return Message(RecordDict({"refusal": ConfigRecord({"code": refusal.code, "reason": refusal.reason})}),
                       reply_to=msg)
    return Message(RecordDict({"envelope": ConfigRecord(env), "mechanism": ConfigRecord(mechanism)}), reply_to=msg)

