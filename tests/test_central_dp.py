"""Central DP on a trusted server (server/condense/private_target.py): the one release that touches the pool."""
import math

import torch
import torch.nn as nn

from server.condense.private_target import (COUNT_SHARE, EmbeddingBank, class_sums, clip_norm_from_public,
                                            refine_to_means, release_class_means)
from shared.accounting import ImageRelease, noise_for_epsilon

CPU = torch.device("cpu")
K = 3


def toy(n=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen).clamp(-1, 1), torch.arange(n) % K


def statistic(stat):
    """What the mechanism noises, as one vector: [class sums, w x counts]."""
    w = COUNT_SHARE * stat.clip_norm
    return torch.cat([stat.sums.flatten(), stat.counts * w])


def test_replacing_one_record_moves_the_released_statistic_by_at_most_2C_labels_included():
    nets = EmbeddingBank(nets=2, width=8, seed=0).build(1, 8, CPU)
    x, y = toy()
    clip = 0.5 * clip_norm_from_public(nets, x, CPU)          # small enough that clipping binds on many records
    base = statistic(class_sums(nn.Identity(), x, y, K, nets, clip, CPU, batch=16))
    other, _ = toy(n=1, seed=7)
    moved = []
    for new_label in (int(y[5]), (int(y[5]) + 1) % K):        # same label, then a label change
        x2, y2 = x.clone(), y.clone()
        x2[5], y2[5] = other[0] * 3, new_label
        moved.append(float((statistic(class_sums(nn.Identity(), x2, y2, K, nets, clip, CPU, batch=16)) - base).norm()))
    assert all(0 < m <= 2 * clip * (1 + 1e-6) for m in moved), moved
    assert moved[1] <= math.sqrt(2) * clip * (1 + 1e-6)    # a label change: two sums, C each


def test_the_release_carries_os_random_noise_of_the_calibrated_size():
    nets = EmbeddingBank(nets=2, width=8, seed=0).build(1, 8, CPU)
    x, y = toy(n=90)
    stat = class_sums(nn.Identity(), x, y, K, nets, 1.0, CPU)
    sigma = noise_for_epsilon(1.0, 1e-5)
    assert ImageRelease(1.0, sigma, 1e-5, "public").epsilon("pld") <= 1.0
    a, b = release_class_means(stat, sigma), release_class_means(stat, sigma)
    assert not torch.equal(a.means, b.means)                  # fresh OS randomness, nothing seeds it
    noise = torch.stack([release_class_means(stat, sigma).released - statistic(stat) for _ in range(100)])
    assert abs(float(noise.std()) / (sigma * 1.0) - 1) < 0.05  # per-coordinate std sigma C, sums and counts alike
    clean = release_class_means(stat, 0.0)
    assert torch.allclose(clean.means, (stat.sums / stat.counts[:, None]).float())
    assert clean.counts.tolist() == [30.0, 30.0, 30.0]


def test_fitting_the_latents_pulls_the_set_towards_the_released_means():
    nets = EmbeddingBank(nets=2, width=8, seed=0).build(1, 8, CPU)
    x, y = toy(n=90)
    target = release_class_means(class_sums(nn.Identity(), x, y, K, nets, 10.0, CPU), 0.0)
    start = 0.1 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = refine_to_means([start], [torch.arange(6) % K], nn.Identity(), target, nets, 60, 0.05, CPU)
    curve = out["losses"][0]
    assert curve[-1][1] < 0.5 * curve[0][1], curve
    assert out["latents"][0].shape == start.shape and not torch.equal(out["latents"][0], start)


def test_the_two_threat_models_are_one_choice_and_the_flag_reaches_the_config():
    import pytest
    from server.cli import build_parser
    from server.options import demo_config
    parse = build_parser().parse_args
    cfg = demo_config(parse(["demo", "--local", "--central-epsilon", "3", "--central-delta", "1e-6"]))
    assert (cfg.central.epsilon, cfg.central.delta) == (3.0, 1e-6)
    with pytest.raises(ValueError, match="two threat models"):
        demo_config(parse(["demo", "--central-epsilon", "1", "--target-epsilon", "8"]))
    with pytest.raises(ValueError, match="must be > 0"):
        demo_config(parse(["demo", "--local", "--central-epsilon", "0"]))


def test_a_central_dp_demo_ships_a_set_whose_ledger_covers_every_pooled_record(tmp_path):
    """`demo --local --central-epsilon`: the chain and conditioning come from the public split, the pool enters
    through the one release, and the report and ledger state the guarantee (labels inside it)."""
    import json
    from server.cli import main
    from tests.test_demo_e2e import TINY
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--ipc", "2", "--no-full", "--central-epsilon", "2", *TINY,
                 "--student-steps", "10", "--central-iterations", "30"]) == 0
    report = json.loads((out / "report.json").read_text())
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert ledger["summary"]["epsilon"] <= 2.0 and ledger["summary"]["labels_public"] is False
    assert ledger["summary"]["threat_model"].startswith("trusted server") and ledger["summary"]["records"] == 1500
    assert report["privacy"]["epsilon"] == ledger["summary"]["epsilon"] and report["config"]["central"]["iterations"] == 30
    assert report["released_pool"]["chain_trained_on"].startswith("public split")
    meta = json.loads((out / "ipc2" / "manifest.json").read_text())
    assert "central-DP" in json.dumps(meta)
    # the audit of what the trusted server ships: members are the pooled records, non-members test images
    assert main(["audit", str(out), "--shadows", "1", "--candidates", "40", "--inverter-steps", "5",
                 "--device", "cpu"]) == 0
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert audit["membership"]["members"] == audit["membership"]["nonmembers"] == 40
    # LiRA's OUT shadows repeat the release without the candidates; the public-split teacher has none to build
    assert audit["membership"]["shadows"] == audit["shipped"]["shadows"] == 1
    assert "public split alone" in audit["shipped"]["teacher"]["lira_skipped"]
    targets = {(r["target"], r["attack"]) for r in audit["verdict"]["attacks"]}
    assert {("released set on pooled records", "nearest_synthetic"), ("shipped teacher on training members",
                                                                      "loss_threshold"),
            ("student (soft labels) on pooled records", "lira_offline"),
            ("shipped student on training members", "lira_offline")} <= targets
    assert ("shipped teacher on training members", "lira_offline") not in targets
    assert audit["claimed_epsilon"] == report["privacy"]["epsilon"] and audit["verdict"]["status"] != "no claim"
    assert "trusted server ships" in audit["verdict"]["text"]
    page = (out / "audit" / "audit.html").read_text()
    assert "Central DP on the trusted server" in page and "public split alone" in page
    # LiRA online: each shadow holds a random half of all candidates (members and test images alike)
    from server.audit.report import set_section
    from server.audit.runner import AuditContext, central_membership
    online = central_membership(AuditContext(out, torch.device("cpu"), lira="online"), shadows=2, candidates=40)
    assert "lira_offline" not in online and online["shadows"] == 2 and "random half" in online["shadows_are"]
    r = online["lira_online"]
    assert r["ci"]["auc"][0] <= r["auc"] <= r["ci"]["auc"][1] and r["empirical_epsilon"]["epsilon_lower_bound"] >= 0
    assert "LiRA (online) uses 2 shadows" in set_section(online)
