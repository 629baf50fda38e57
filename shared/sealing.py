"""Sealed latent submissions: what leaves a device, and how the server accepts or rejects it.

Per message a client makes a fresh X25519 key pair, agrees a secret with the server's public key,
derives an AES-256-GCM key with HKDF-SHA256 and encrypts the payload; the associated data binds run
id, node id, round and chunk index, so a ciphertext cannot be moved to another context. The payload is
a safetensors blob (no pickle): fp16 latents (n, c, h, w) and uint8 labels (n,).

`open_submission` checks, in order, before anything is stored: size, envelope fields, context (run,
node, round), replay of (node, round, chunk), AEAD tag, payload format, shapes, dtypes, finiteness and
label range. Each failure raises `SubmissionRejected` with a stable `code`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

VERSION = 1
INFO = b"fedcondense/latents/v1"
CIPHER = "X25519-HKDF-SHA256-AES-256-GCM"


class SubmissionRejected(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


def raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive(shared: bytes, eph_pub: bytes, server_pub: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=eph_pub + server_pub, info=INFO).derive(shared)


def associated_data(run_id: str, node_id: int, round_: int, chunk: int, num_chunks: int) -> bytes:
    return json.dumps({"v": VERSION, "run": run_id, "node": int(node_id), "round": int(round_),
                       "chunk": int(chunk), "of": int(num_chunks)}, sort_keys=True).encode()


def encode_payload(latents: torch.Tensor, labels: torch.Tensor) -> bytes:
    return st_save({"latents": latents.to(torch.float16).contiguous(), "labels": labels.to(torch.uint8).contiguous()})


def seal(payload: bytes, server_public: bytes, run_id: str, node_id: int, round_: int, chunk: int,
         num_chunks: int) -> dict:
    """Encrypt one chunk for the server; returns the envelope (a flat dict of str/int/bytes)."""
    eph = X25519PrivateKey.generate()
    eph_pub = raw_public(eph.public_key())
    key = _derive(eph.exchange(X25519PublicKey.from_public_bytes(server_public)), eph_pub, server_public)
    nonce = os.urandom(12)
    aad = associated_data(run_id, node_id, round_, chunk, num_chunks)
    return {"version": VERSION, "cipher": CIPHER, "ephemeral_public": eph_pub, "nonce": nonce,
            "ciphertext": AESGCM(key).encrypt(nonce, payload, aad), "run_id": run_id, "node_id": int(node_id),
            "round": int(round_), "chunk": int(chunk), "num_chunks": int(num_chunks)}


@dataclass
class Limits:
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    num_classes: int = 10
    max_chunk_latents: int = 4096
    max_chunks: int = 256

    @property
    def max_bytes(self) -> int:
        per = int(np.prod(self.latent_shape)) * 2 + 1
        return self.max_chunk_latents * per + 4096 + 16     # payload + safetensors header + GCM tag


@dataclass
class Opener:
    """Server side: holds the private key, the run context, the limits and the replay memory."""
    private_key: X25519PrivateKey
    run_id: str
    limits: Limits = field(default_factory=Limits)
    seen: set = field(default_factory=set)

    def open(self, env: dict, node_id: int, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate and decrypt one envelope sent by `node_id` in `round_`; returns (latents fp32, labels int64)."""
        lim = self.limits
        ct = env.get("ciphertext")
        if not isinstance(ct, (bytes, bytearray)):
            raise SubmissionRejected("malformed", "envelope has no ciphertext bytes")
        if len(ct) > lim.max_bytes:
            raise SubmissionRejected("oversized", f"{len(ct)} bytes > limit {lim.max_bytes}")
        eph_pub, nonce = env.get("ephemeral_public"), env.get("nonce")
        if not (isinstance(eph_pub, bytes) and len(eph_pub) == 32 and isinstance(nonce, bytes) and len(nonce) == 12):
            raise SubmissionRejected("malformed", "ephemeral_public must be 32 bytes and nonce 12 bytes")
        ints = {k: env.get(k) for k in ("chunk", "num_chunks", "version", "node_id", "round")}
        bad = [k for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad or not isinstance(env.get("run_id"), str):
            raise SubmissionRejected("malformed", f"envelope fields missing or not integers: {bad or ['run_id']}")
        chunk, num_chunks, version = ints["chunk"], ints["num_chunks"], ints["version"]
        run_id, claimed_node, claimed_round = env["run_id"], ints["node_id"], ints["round"]
        if version != VERSION:
            raise SubmissionRejected("version", f"envelope version {version}, server speaks {VERSION}")
        if (run_id, claimed_node, claimed_round) != (self.run_id, int(node_id), int(round_)):
            raise SubmissionRejected("context", f"envelope for run {run_id} node {claimed_node} round {claimed_round}, "
                                                f"expected run {self.run_id} node {node_id} round {round_}")
        if not 0 <= chunk < num_chunks <= lim.max_chunks:
            raise SubmissionRejected("malformed", f"chunk {chunk} of {num_chunks} (max {lim.max_chunks})")
        if (node_id, round_, chunk) in self.seen:
            raise SubmissionRejected("replay", f"chunk {chunk} of node {node_id} round {round_} was already accepted")
        server_pub = raw_public(self.private_key.public_key())
        try:
            key = _derive(self.private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, server_pub)
            payload = AESGCM(key).decrypt(nonce, bytes(ct), associated_data(self.run_id, node_id, round_, chunk, num_chunks))
        except (InvalidTag, ValueError) as exc:
            raise SubmissionRejected("auth", f"decryption failed (tampered ciphertext or wrong key): {type(exc).__name__}") from None
        latents, labels = self._validate(payload)
        self.seen.add((node_id, round_, chunk))
        return latents, labels

    def _validate(self, payload: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        lim = self.limits
        try:
            tensors = st_load(payload)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise SubmissionRejected("malformed", f"payload is not a safetensors blob: {exc}") from None
        if set(tensors) != {"latents", "labels"}:
            raise SubmissionRejected("malformed", f"payload keys {sorted(tensors)}, expected ['labels', 'latents']")
        z, y = tensors["latents"], tensors["labels"]
        if z.dtype != torch.float16 or y.dtype != torch.uint8:
            raise SubmissionRejected("dtype", f"latents {z.dtype} / labels {y.dtype}, expected float16 / uint8")
        if z.ndim != 4 or tuple(z.shape[1:]) != tuple(lim.latent_shape) or y.shape != (z.shape[0],):
            raise SubmissionRejected("shape", f"latents {tuple(z.shape)}, labels {tuple(y.shape)}; expected (n, {lim.latent_shape}) and (n,)")
        if not 0 <= z.shape[0] <= lim.max_chunk_latents:      # 0: a chunk with no full group of k (group means)
            raise SubmissionRejected("oversized", f"{z.shape[0]} latents in a chunk (0..{lim.max_chunk_latents})")
        if not torch.isfinite(z).all():
            raise SubmissionRejected("non_finite", "latents contain NaN or inf")
        if len(y) and int(y.max()) >= lim.num_classes:
            raise SubmissionRejected("label_range", f"label {int(y.max())} outside 0..{lim.num_classes - 1}")
        return z.float(), y.long()
