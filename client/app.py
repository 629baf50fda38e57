"""Flower ClientApp: encode the local partition with E1, optionally add noise, seal, reply (issue 3 §1).

Every message is self-contained (E1 weights, server key, data and partition parameters, chunk index),
because a deployed SuperNode starts a fresh process per message. Pixels never leave this function.
"""
from __future__ import annotations

import json
import math
import resource
import time

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.encode import encode_images
from client.privacy import gaussian_mechanism
from shared.config import DataConfig
from shared.data import stored_splits
from shared.models.first_encoder import FirstEncoder
from shared.partition import partition
from shared.sealing import CIPHER, encode_payload, seal

app = ClientApp()
_PARTITIONS: dict = {}


def local_partition(cfg: ConfigRecord, partition_id: int, num_partitions: int):
    """This node's private images, as stored (uint8): the deterministic split every node computes the same
    way. Kept per process (a few MB each), so a node asked for several chunks splits the data once."""
    key = (cfg["data_config"], partition_id, num_partitions, cfg["iid"], cfg["alpha"], cfg["partition_seed"])
    if key not in _PARTITIONS:
        if len(_PARTITIONS) >= 32:                      # a long-lived simulation actor serving many runs
            _PARTITIONS.clear()
        data = stored_splits(DataConfig(**json.loads(cfg["data_config"])))
        parts = partition(data.private.labels.numpy(), num_partitions, iid=bool(cfg["iid"]), alpha=float(cfg["alpha"]),
                          seed=int(cfg["partition_seed"]))
        _PARTITIONS[key] = (data.private.subset(parts[partition_id]), data.raw_bytes_per_image)
    return _PARTITIONS[key]


def load_first_encoder(content: RecordDict) -> FirstEncoder:
    enc = FirstEncoder(**json.loads(content["first_encoder_config"]["json"]))
    enc.load_state_dict(content["first_encoder"].to_torch_state_dict())
    return enc.eval()


def encode_chunk(content: RecordDict, context: Context) -> tuple[dict, dict]:
    cfg = content["config"]
    torch.set_num_threads(int(cfg.get("threads", 1)))
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    local, raw_bytes_per_image = local_partition(cfg, pid, num)
    chunk, size = int(cfg["chunk"]), int(cfg["chunk_size"])
    num_chunks = max(1, math.ceil(len(local) / size))
    part = local.subset(torch.arange(chunk * size, min((chunk + 1) * size, len(local)))).converted()
    start = time.time()
    latents = encode_images(load_first_encoder(content), part.images, device=torch.device("cpu"))
    encode_s = time.time() - start
    gen = torch.Generator().manual_seed(int(cfg["noise_seed"]) * 1_000_003 + pid * 1009 + chunk)
    released = gaussian_mechanism(latents, float(cfg["clip_norm"]), float(cfg["noise_multiplier"]), gen)
    payload = encode_payload(released, part.labels)
    env = seal(payload, bytes(cfg["server_public"]), str(cfg["run_id"]), int(cfg["node_id"]), int(cfg["round"]),
               chunk, num_chunks)
    stats = {"partition_id": pid, "num_examples": len(part), "partition_size": len(local),
             "encode_seconds": encode_s, "encode_images_per_s": len(part) / max(encode_s, 1e-9),
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "payload_bytes": len(payload), "ciphertext_bytes": len(env["ciphertext"]),
             "raw_image_bytes": raw_bytes_per_image * len(part)}
    return env, stats


@app.query("encode")
def encode(msg: Message, context: Context) -> Message:
    env, stats = encode_chunk(msg.content, context)
    info = ConfigRecord({"cipher": CIPHER, "latent_dtype": "float16",
                         "latent_shape": list(msg.content["config"]["latent_shape"])})
    return Message(RecordDict({"envelope": ConfigRecord(env), "stats": MetricRecord(stats), "info": info}), reply_to=msg)
