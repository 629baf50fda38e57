"""What leaves a device, against a curious server: the noise cannot be regenerated from anything the server
knows, every released field is in the ledger, and the device's own policy refuses what it does not allow."""
import itertools
import json
import zlib

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord

from client.encode import encode_images
from client.policy import PolicyRefusal, encoder_sha256
from client.privacy import clip_latents
from server.federation.collect import check_reply, collect, encoder_records, request
from server.federation.ledger import build_ledger
from server.federation.pool import LatentPool
from shared.accounting import ImageRelease, calibrate
from shared.config import DemoConfig
from shared.data import stored_splits
from shared.partition import partition
from shared.release import REPLY_FIELDS
from shared.sealing import Limits, Opener, raw_public
from tests.scripted_grid import DATA, Node, ScriptedGrid, fed_config, honest, no_dp, tiny_encoder

NODE_CONFIG = {"partition-id": 0, "num-partitions": 2}
EPS8 = calibrate(8.0, 1e-5, clip_norm=3.0)
EPS8_PUBLIC_LABELS = calibrate(8.0, 1e-5, label_mechanism="public", clip_norm=3.0)


def device_round(release: ImageRelease, node_config=NODE_CONFIG, chunk=0, e1=None):
    """One real request and the real device's reply, opened with the server's key, as the server sees it."""
    e1 = e1 or tiny_encoder()
    key = X25519PrivateKey.generate()
    fed = fed_config()
    content = request(e1, DATA, fed, release, "run-7", raw_public(key.public_key()), 5, 0, chunk, 10, (28, 28),
                      encoder_records(e1))
    reply = honest(content, 5, node_config)
    return e1, fed, content, reply, key


def clean_latents(e1, fed, chunk=0):
    data = stored_splits(DATA)
    share = data.private.subset(partition(data.private.labels.numpy(), 2, iid=False, alpha=fed.alpha,
                                          seed=fed.partition_seed)[0])
    part = share.subset(torch.arange(chunk * fed.chunk_size, min((chunk + 1) * fed.chunk_size, len(share))))
    return encode_images(e1, part.converted().images), part.labels


def test_the_server_cannot_remove_the_noise():
    """The server holds every value it sent or received: request (seeds, ids, run, chunk), node config of
    the simulation, envelope, mechanism. Regenerating the noise from any combination of them, as a seeded
    generator would, leaves the error at the mechanism's own (sigma C)^2 per coordinate, or above."""
    release = EPS8
    e1, fed, content, reply, key = device_round(release)
    kind, env, mech = check_reply(reply)
    opener = Opener(key, "run-7", Limits((4, 8, 8), 10, max_chunk_latents=fed.chunk_size))
    released, _ = opener.open(env, 5, 0)
    clean, _ = clean_latents(e1, fed)
    target = clip_latents(clean.double(), release.clip_norm).float()
    mech_var = (release.noise_multiplier * release.clip_norm) ** 2
    observed = [int(content["config"][k]) for k in ("partition_seed", "node_id", "round", "chunk")]
    known = sorted({0, 1, 5, 7, *observed, int(env["num_chunks"]), zlib.crc32(b"run-7")})
    best = float("inf")
    for a, b, c in itertools.product(known, repeat=3):
        for seed in (a * 1_000_003 + b * 1009 + c, a + b + c, a):
            guess = torch.randn(released.shape, generator=torch.Generator().manual_seed(seed)) * (mech_var ** 0.5)
            best = min(best, float((released - guess - target).pow(2).mean()))
    assert best >= 0.9 * mech_var, f"a seed the server knows regenerates the noise (error {best:.3g} < {mech_var:.3g})"
    residual = float((released - target).pow(2).mean())
    assert residual == pytest.approx(mech_var, rel=0.1), "the released latent carries exactly the mechanism's noise"


def test_the_same_request_twice_gives_independent_noise():
    release = EPS8
    e1 = tiny_encoder()
    outs = []
    for _ in range(2):
        _, fed, content, reply, key = device_round(release, e1=e1)
        _, env, _ = check_reply(reply)
        outs.append(Opener(key, "run-7", Limits((4, 8, 8), 10, max_chunk_latents=100)).open(env, 5, 0)[0])
    clean, _ = clean_latents(e1, fed)
    n1, n2 = (o - clip_latents(clean.double(), 3.0).float() for o in outs)
    assert abs(float(torch.corrcoef(torch.stack([n1.flatten(), n2.flatten()]))[0, 1])) < 0.05


def test_labels_leave_through_randomized_response():
    release = calibrate(1.0, 1e-5, clip_norm=3.0)            # label epsilon 0.25: most labels are redrawn
    e1, fed, content, reply, key = device_round(release)
    _, env, _ = check_reply(reply)
    _, labels = Opener(key, "run-7", Limits((4, 8, 8), 10, max_chunk_latents=100)).open(env, 5, 0)
    _, true = clean_latents(e1, fed)
    kept = float((labels == true).float().mean())
    assert kept < 0.5, f"{kept:.0%} of labels arrive as they are at label epsilon 0.25"


def test_the_reply_holds_exactly_the_declared_fields_and_the_ledger_lists_them():
    reply = device_round(EPS8)[3]
    assert set(reply.keys()) == set(REPLY_FIELDS)
    for record, fields in REPLY_FIELDS.items():
        assert set(dict(reply[record])) == set(fields), f"a field of '{record}' left the device outside the schema"
    ledger = build_ledger(DemoConfig(), {"clients": {}}, [4, 8, 8], EPS8)
    listed = {(row["record"], row["field"]) for row in ledger["fields_leaving_a_device"]}
    assert {(r, f) for r, fields in REPLY_FIELDS.items() for f in fields} <= listed
    assert all(row["coverage"] in ("mechanism", "public", "random") for row in ledger["fields_leaving_a_device"])
    assert ledger["summary"]["covers"] == "the (latent, label) pair of each record"


def test_public_labels_are_printed_as_such():
    ledger = build_ledger(DemoConfig(), {"clients": {}}, [4, 8, 8],
                          EPS8_PUBLIC_LABELS)
    assert ledger["summary"]["labels_public"] and "**LABELS ARE PUBLIC" in ledger["summary"]["note"]


@pytest.mark.parametrize("node_config,release,code", [
    ({"max-epsilon": 8}, no_dp(), "epsilon"),
    ({"max-epsilon": 2}, EPS8, "epsilon"),
    ({"max-epsilon": 8}, EPS8_PUBLIC_LABELS, "labels"),
    ({"max-epsilon": 8, "max-delta": 1e-7}, EPS8, "delta"),
    ({"min-noise-multiplier": 50.0}, EPS8, "noise"),
    ({"encoder-sha256": "00" * 32}, no_dp(), "encoder"),
])
def test_the_device_policy_refuses_what_it_does_not_allow(node_config, release, code):
    reply = device_round(release, {**NODE_CONFIG, **node_config})[3]
    kind, fields, _ = check_reply(reply)
    assert kind == "refusal" and fields["code"] == code, fields


def test_the_device_policy_allows_a_request_within_it():
    e1 = tiny_encoder()
    cfg = {**NODE_CONFIG, "max-epsilon": 8, "encoder-sha256": encoder_sha256(e1.state_dict())}
    kind, _, mech = check_reply(device_round(EPS8, cfg, e1=e1)[3])
    assert kind == "envelope" and mech["epsilon"] <= 8.0


def test_a_refusal_reaches_the_server_as_a_clear_drop(tmp_path):
    grid = ScriptedGrid({1: Node(NODE_CONFIG), 2: Node({"partition-id": 1, "num-partitions": 2, "max-epsilon": 4})})
    fed = collect(grid, tiny_encoder(), DATA, fed_config(), no_dp(), LatentPool(tmp_path / "pool"), 10, (28, 28))
    assert fed["accepted_nodes"] == [1] and "refused by the device's policy: epsilon" in fed["dropped_nodes"][2]
    assert fed["refusals"]["2"]["code"] == "epsilon" and "max-epsilon" in fed["refusals"]["2"]["reason"]


def test_a_pool_collected_under_other_settings_is_not_resumed(tmp_path):
    pool = LatentPool(tmp_path / "pool")
    grid = ScriptedGrid({1: Node(NODE_CONFIG)})
    collect(grid, tiny_encoder(), DATA, fed_config(clients=1), no_dp(), pool, 10, (28, 28))
    with pytest.raises(RuntimeError, match="new output folder"):
        collect(grid, tiny_encoder(), DATA, fed_config(clients=1), EPS8, pool, 10,
                (28, 28))
    again = collect(grid, tiny_encoder(), DATA, fed_config(clients=1), no_dp(), pool, 10, (28, 28))
    assert again["resumed_nodes"] == [1] and json.loads(pool.provenance_path.read_text().splitlines()[0])["mechanism"]


def test_policy_keys_are_validated():
    from client.policy import DevicePolicy
    with pytest.raises(ValueError, match="labels=private"):
        DevicePolicy.from_node_config({"labels": "maybe"})
    with pytest.raises(ValueError, match="malformed"):
        DevicePolicy.from_node_config({"max-epsilon": "lots"})
    with pytest.raises(PolicyRefusal):
        DevicePolicy.from_node_config({"max-epsilon": 1}).check(no_dp(), "")


def test_a_device_without_data_says_how_to_give_it_some():
    e1 = tiny_encoder()
    key = X25519PrivateKey.generate()
    content = request(e1, DATA, fed_config(), no_dp(), "r", raw_public(key.public_key()), 5, 0, 0, 10, (28, 28),
                      encoder_records(e1))
    with pytest.raises(ValueError, match="data-dir"):
        honest(content, 5, {})
    assert isinstance(content["config"], ConfigRecord)


def test_group_means_leave_as_means_of_k_same_label_records_with_k_times_less_noise():
    """The real device under a group-size request: each released latent is the mean of k clipped latents of
    its label (every class's n_c mod k records held back), noised with std sigma C / k; the ledger states
    sensitivity 2C/k and the same epsilon as the per-record release at that sigma."""
    k = 8
    release = calibrate(8.0, 1e-5, label_mechanism="public", clip_norm=3.0, group_size=k)
    e1, fed, content, reply, key = device_round(release)
    kind, env, mech = check_reply(reply)
    assert mech["group_size"] == k and int(content["config"]["group_size"]) == k
    released, labels = Opener(key, "run-7", Limits((4, 8, 8), 10, max_chunk_latents=fed.chunk_size)).open(env, 5, 0)
    clean, true = clean_latents(e1, fed)
    counts = torch.bincount(true, minlength=10)
    assert torch.equal(torch.bincount(labels, minlength=10), counts // k)
    clipped = clip_latents(clean.double(), 3.0).float().flatten(1)
    for c in labels.unique().tolist():
        members = clipped[true == c]
        noise = released[labels == c].flatten(1) - members.mean(0)          # each mean's deviation from the class mean
        spread = members.var(0).sum() / k                                   # of a mean of k members, without noise
        expected = spread + released.shape[1:].numel() * release.noise_std ** 2
        assert float(noise.pow(2).sum(1).mean()) == pytest.approx(float(expected), rel=0.5)
    ledger = build_ledger(DemoConfig(), {"clients": {}}, [4, 8, 8], release)
    assert ledger["guarantee"]["latent_sensitivity"] == pytest.approx(2 * 3.0 / k)
    assert ledger["summary"]["group_size"] == k and "mean of 8" in ledger["summary"]["mechanism"]
    assert release.epsilon() == pytest.approx(calibrate(8.0, 1e-5, label_mechanism="public", clip_norm=3.0).epsilon())
