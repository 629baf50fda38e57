"""The audit's attacks can fail a run: a deliberately leaky student is flagged."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server.audit import attacks
from server.distill.student import train_student
from shared.config import DataConfig, StudentConfig
from shared.data import load_dataset


def test_leaky_student_is_flagged_by_both_attacks():
    """50 members, 200 full-batch steps without augmentation: the student memorises them. Measured on a 2-core
    AVX2 CPU: loss-threshold / LiRA AUC 0.79 / 0.83 in 21 s; 100 members at 300 steps gave 0.77 / 0.72 in 53 s."""
    n = 50
    ds = load_dataset(DataConfig(public_size=500, train_limit=4 * n, test_limit=100))
    members, others = ds.private.subset(range(0, n)), ds.private.subset(range(n, 2 * n))
    cfg = StudentConfig(model="convnet3_w32", steps=200, batch_size=n, augment="none", lr=0.05, weight_decay=0.0)
    onehot = lambda s: F.one_hot(s.labels, 10).float()
    target = train_student(members.images, onehot(members), cfg, torch.device("cpu"))
    x = torch.cat([members.images, others.images])
    y = torch.cat([members.labels, others.labels])
    is_member = np.r_[np.ones(n), np.zeros(n)]
    scores = attacks.example_scores(target, x, y)
    loss_attack = attacks.loss_threshold_attack(scores, is_member)
    shadows = []
    for k in range(2):        # OUT shadows: trained on disjoint real images
        part = ds.private.subset(range(2 * n + n * k, 3 * n + n * k))
        shadow = train_student(part.images, onehot(part), StudentConfig(**{**cfg.__dict__, "seed": k + 1}), torch.device("cpu"))
        shadows.append(attacks.example_scores(shadow, x, y))
    lira = attacks.lira_offline(scores, np.stack(shadows), is_member)
    assert loss_attack["auc"] > 0.7 and lira["auc"] > 0.7, (loss_attack["auc"], lira["auc"])
    assert 0 <= loss_attack["tpr_at_1pct_fpr"] <= 1


def test_lira_online_separates_in_from_out_and_stays_at_chance_without_a_signal():
    """Simulated scores: each example has its own difficulty; training on it raises its score by `gap`. The
    target trained on the first half. Online LiRA compares each example with itself, in and out."""
    rng = np.random.default_rng(0)
    n, shadows = 2000, 16
    difficulty = rng.normal(0, 3, n)
    is_member = np.r_[np.ones(n // 2), np.zeros(n // 2)]
    shadow_in = rng.random((shadows, n)) < 0.5
    for gap, lo, hi in ((1.0, 0.75, 1.0), (0.0, 0.45, 0.55)):
        target = difficulty + gap * is_member + rng.normal(0, 0.5, n)
        shadow = difficulty + gap * shadow_in + rng.normal(0, 0.5, (shadows, n))
        online = attacks.lira_online(target, shadow, shadow_in, is_member)
        assert lo < online["auc"] < hi, (gap, online["auc"])
        assert len(online["scores"]) == n and online["in_shadows_median"] == 8
    loss_only = attacks.roc(difficulty + is_member + rng.normal(0, 0.5, n), is_member)["auc"]
    assert loss_only < 0.7, "without the per-example calibration the same signal is weak"


def test_roc_of_random_scores_is_chance():
    rng = np.random.default_rng(0)
    r = attacks.roc(rng.random(20000), rng.random(20000) < 0.5)
    assert abs(r["auc"] - 0.5) < 0.02


def test_ssim_and_psnr_sanity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(attacks.ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    noisier = (x + 0.8 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (attacks.ssim(x, noisy) > attacks.ssim(x, noisier)).all()
    assert (attacks.psnr(x, noisy) > attacks.psnr(x, noisier)).all()


def test_an_audit_finds_the_runs_checkpoints_after_the_cache_moved(tmp_path, monkeypatch):
    """report.json records absolute checkpoint paths; audited on another machine (or after the cache moved),
    each is found by name in FEDCONDENSE_CACHE, and a missing one is an error that says where to put it."""
    from server.audit.runner import run_checkpoint
    (tmp_path / "here" / "chain-abc").mkdir(parents=True)
    (tmp_path / "gone-too" / "teacher-def").mkdir(parents=True)
    monkeypatch.setenv("FEDCONDENSE_CACHE", str(tmp_path / "here"))
    report = {"checkpoints": {"chain": "/elsewhere/cache/chain-abc", "teacher": str(tmp_path / "gone-too" / "teacher-def"),
                              "autoencoder": "/elsewhere/cache/autoencoder-123"}}
    assert run_checkpoint(report, "chain") == tmp_path / "here" / "chain-abc"
    assert run_checkpoint(report, "teacher") == tmp_path / "gone-too" / "teacher-def", "the recorded path first"
    with pytest.raises(FileNotFoundError, match="autoencoder-123 is neither at /elsewhere/cache/autoencoder-123 nor"):
        run_checkpoint(report, "autoencoder")


def test_empirical_epsilon_bounds_what_an_attack_shows_and_no_more():
    """A perfect attack on 2,000 candidates proves a large epsilon; a chance-level one proves none; a
    moderate one (scores shifted by 1 sd) lands between, with a bootstrap interval around its AUC."""
    rng = np.random.default_rng(0)
    is_member = np.r_[np.ones(1000), np.zeros(1000)]
    perfect = attacks.empirical_epsilon(is_member + 0.01 * rng.random(2000), is_member, delta=1e-5)
    chance = attacks.empirical_epsilon(rng.random(2000), is_member, delta=1e-5)
    shifted = rng.normal(size=2000) + is_member
    moderate = attacks.attack_figures(shifted, is_member, delta=1e-5)
    # 500 held-out trials per side with no error: the Clopper-Pearson bounds allow log(1 / 0.0074) ~ 4.9
    assert perfect["epsilon_lower_bound"] > 4.5 and chance["epsilon_lower_bound"] < 0.3
    assert 0.3 < moderate["empirical_epsilon"]["epsilon_lower_bound"] < perfect["epsilon_lower_bound"]
    lo, hi = moderate["ci"]["auc"]
    assert lo < moderate["auc"] < hi and hi - lo < 0.06 and abs(moderate["auc"] - 0.76) < 0.03


def test_the_auditor_names_each_nodes_share_by_its_record_count(tmp_path):
    """A federated run's pool does not say which share a node held; the auditor, who knows the simulation's
    partition rule, matches record counts, and refuses where two shares have one size."""
    import json
    from types import SimpleNamespace
    from server.audit.runner import pooled_shares
    from shared.partition import partition
    labels = torch.arange(600) % 10
    ds = SimpleNamespace(private=SimpleNamespace(labels=labels))
    fed = {"iid": False, "alpha": 0.5, "partition_seed": 3}
    parts = partition(labels.numpy(), 4, iid=False, alpha=0.5, seed=3)
    assert len({len(p) for p in parts}) == 4
    (tmp_path / "pool").mkdir()
    node_ids = [40, 10, 30, 20]                              # node i held share i; ranks go by node id
    (tmp_path / "pool" / "provenance.jsonl").write_text("\n".join(
        json.dumps({"node_id": n, "latents": len(parts[i]), "mechanism": {"group_size": 1}})
        for i, n in enumerate(node_ids)))
    report = {"config": {"federation": fed}, "federation": {"nodes": node_ids}}
    _, ranks = pooled_shares(report, ds, tmp_path)
    assert ranks == [1, 3, 2, 0]
    (tmp_path / "pool" / "provenance.jsonl").write_text(json.dumps({"node_id": 1, "latents": 7}))
    with pytest.raises(ValueError, match="matches 0 shares"):
        pooled_shares(report, ds, tmp_path)


def test_the_released_set_attack_finds_members_a_set_copies_and_not_members_it_does_not():
    """The nearest-synthetic attack on a released set: a set holding lightly blurred copies of half the members
    puts those nearer than any non-member; a set of other real images does not (AUC 0.5 within its interval)."""
    ds = load_dataset(DataConfig(public_size=500, train_limit=3000, test_limit=100))
    order = torch.randperm(len(ds.private), generator=torch.Generator().manual_seed(0))
    members, others, unrelated = (ds.private.subset(order[a:a + 200]) for a in (0, 200, 400))
    x = torch.cat([members.images, others.images])
    is_member = np.r_[np.ones(200), np.zeros(200)]
    copies = F.avg_pool2d(members.images[:100], 3, 1, 1) * 0.5 + members.images[:100] * 0.5
    leaky = attacks.attack_figures(attacks.nearest_synthetic_scores(x, copies), is_member, delta=1e-5)
    assert leaky["auc"] > 0.7 and leaky["tpr_at_1pct_fpr"] >= 0.45, leaky["auc"]
    assert leaky["empirical_epsilon"]["epsilon_lower_bound"] > 0
    fair = attacks.attack_figures(attacks.nearest_synthetic_scores(x, unrelated.images[:100]), is_member, delta=1e-5)
    assert fair["ci"]["auc"][0] <= 0.5 <= fair["ci"]["auc"][1] and fair["empirical_epsilon"]["epsilon_lower_bound"] == 0
