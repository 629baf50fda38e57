"""Sealed submissions: every bad input is rejected with a specific code."""
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from safetensors.torch import save as st_save

from shared.sealing import Limits, Opener, SubmissionRejected, encode_payload, raw_public, seal

RUN = "run-1"


@pytest.fixture
def server():
    key = X25519PrivateKey.generate()
    return key, Opener(key, RUN, Limits(max_chunk_latents=64))


def good(n=8):
    return torch.randn(n, 4, 8, 8), torch.randint(0, 10, (n,))


def envelope(server_key, payload, node=5, rnd=0, chunk=0, of=1):
    return seal(payload, raw_public(server_key.public_key()), RUN, node, rnd, chunk, of)


def reject_code(opener, env, node=5, rnd=0):
    with pytest.raises(SubmissionRejected) as err:
        opener.open(env, node, rnd)
    return err.value.code


def test_roundtrip_fp16(server):
    key, opener = server
    z, y = good()
    out_z, out_y = opener.open(envelope(key, encode_payload(z, y)), 5, 0)
    assert torch.allclose(out_z, z.half().float()) and torch.equal(out_y, y)
    assert out_z.dtype == torch.float32


def test_fresh_ephemeral_key_per_message(server):
    key, _ = server
    p = encode_payload(*good())
    a, b = envelope(key, p), envelope(key, p)
    assert a["ephemeral_public"] != b["ephemeral_public"] and a["ciphertext"] != b["ciphertext"]


def test_tampered_ciphertext(server):
    key, opener = server
    env = envelope(key, encode_payload(*good()))
    ct = bytearray(env["ciphertext"])
    ct[10] ^= 1
    env["ciphertext"] = bytes(ct)
    assert reject_code(opener, env) == "auth"
    assert not opener.seen


def test_wrong_key(server):
    _, opener = server
    other = X25519PrivateKey.generate()
    assert reject_code(opener, envelope(other, encode_payload(*good()))) == "auth"


def test_replayed_chunk(server):
    key, opener = server
    env = envelope(key, encode_payload(*good()))
    opener.open(env, 5, 0)
    assert reject_code(opener, env) == "replay"


def test_moved_to_other_node_or_round(server):
    key, opener = server
    env = envelope(key, encode_payload(*good()), node=5)
    assert reject_code(opener, env, node=6) == "context"
    assert reject_code(opener, env, rnd=1) == "context"
    env["node_id"] = 6                      # forging the clear field too: the AAD still says node 5
    assert reject_code(opener, env, node=6) == "auth"


def test_nan_latents(server):
    key, opener = server
    z, y = good()
    z[0, 0, 0, 0] = float("nan")
    assert reject_code(opener, envelope(key, encode_payload(z, y))) == "non_finite"


def test_wrong_shape(server):
    key, opener = server
    assert reject_code(opener, envelope(key, encode_payload(torch.randn(8, 4, 7, 7), torch.zeros(8)))) == "shape"
    z, _ = good()
    assert reject_code(opener, envelope(key, encode_payload(z, torch.zeros(3)))) == "shape"


def test_wrong_dtype_and_label_range(server):
    key, opener = server
    z, y = good()
    bad = st_save({"latents": z.contiguous(), "labels": y.to(torch.uint8)})
    assert reject_code(opener, envelope(key, bad)) == "dtype"
    assert reject_code(opener, envelope(key, encode_payload(z, torch.full((8,), 11)))) == "label_range"


def test_oversized_payload(server):
    key, opener = server
    assert reject_code(opener, envelope(key, encode_payload(*good(65)))) == "oversized"
    env = envelope(key, encode_payload(*good()))
    env["ciphertext"] = env["ciphertext"] + b"\0" * opener.limits.max_bytes
    assert reject_code(opener, env) == "oversized"


def test_malformed(server):
    key, opener = server
    assert reject_code(opener, envelope(key, b"not safetensors at all")) == "malformed"
    env = envelope(key, encode_payload(*good()))
    del env["nonce"]
    assert reject_code(opener, env) == "malformed"
