"""Loss registry: gradients, known values, Hungarian matching vs brute force."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server.distill.channel_matching import (channel_distances, grouped_assignment, sparse_assignment, target_coverage,
                                             target_maxpool, teacher_group_order)
import server.distill.ddkd  # noqa: F401  (registers ddkd)
from server.distill.losses import LOSSES, KD, LossInputs, MutualInformationPrior, build_losses, dkd_parts
from shared.models.distill_points import FeatureTap
from shared.models.students import build_student

K = 10


def inputs(student_logits, teacher_logits=None, fs=None, ft=None, targets=None, progress=1.0):
    targets = targets if targets is not None else F.one_hot(torch.arange(len(student_logits)) % K, K).float()
    return LossInputs(student_logits, targets, teacher_logits, fs, ft, progress=progress)


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradients_reach_the_student(name):
    torch.manual_seed(0)
    student = build_student("convnet3", 1, K)
    tap = FeatureTap(student, "convnet3")
    x = torch.randn(8, 1, 32, 32)
    logits = student(x)
    teacher_feat = torch.randn(8, 256, 8, 8) if name.startswith("channel") else torch.randn(8, 64, 4, 4)
    loss_fn = LOSSES[name](K, student_channels=128, teacher_channels=teacher_feat.shape[1])
    at = 0.0 if name.startswith("channel") else 1.0           # the channel terms' hint stage: the first steps
    loss = loss_fn(inputs(logits, torch.randn(8, K), tap.value, teacher_feat, progress=at))
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)
    if name == "mi_prior":
        assert loss_fn.m.grad.abs().sum() > 0 and loss_fn.d.grad.abs().sum() > 0


def test_mi_identical_vs_independent():
    mi = MutualInformationPrior(K)
    onehot_logits = F.one_hot(torch.arange(1000) % K, K).float() * 50
    with torch.no_grad():                        # prior = the true (uniform) student marginal
        mi.m.zero_()
        mi.d.zero_()
    identical = mi(inputs(onehot_logits, onehot_logits))
    assert identical.item() == pytest.approx(-math.log(K), abs=1e-3), "identical: MI = log C"
    g = torch.Generator().manual_seed(0)
    s = F.one_hot(torch.randint(0, K, (20000,), generator=g), K).float() * 50
    t = F.one_hot(torch.randint(0, K, (20000,), generator=g), K).float() * 50
    assert abs(mi(inputs(s, t)).item()) < 0.01, "independent: MI = 0"


def test_mi_prior_stays_bounded_while_its_prior_trains():
    """-I(P) - KL(P_s || p_s) is unbounded below in the prior; trained as a fit of the student's marginal,
    the prior converges to it and the loss to -I(P) instead of running away."""
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(256, K, generator=g) * 2, torch.randn(256, K, generator=g) * 2
    s_logits[:, 0] += 2                                    # a skewed student marginal
    mi = MutualInformationPrior(K)
    opt = torch.optim.SGD(mi.parameters(), lr=1.0)
    for _ in range(400):
        loss = mi(inputs(s_logits, t_logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
    s, t = F.softmax(s_logits, 1), F.softmax(t_logits, 1)
    p1 = s.T @ t
    P = (p1 + p1.T) / 2
    P = P / P.sum()
    marginal = P.sum(1)
    mutual_information = (P * (P.log() - marginal[:, None].log() - marginal[None, :].log())).sum()
    torch.testing.assert_close(mi.prior().detach(), marginal, atol=2e-3, rtol=0)
    assert mi(inputs(s_logits, t_logits)).item() == pytest.approx(-mutual_information.item(), abs=1e-4)


def test_ddkd_denoises_from_the_middle_of_the_schedule_with_bounded_gradients():
    """A start near t = 999 divides by sqrt(alpha_bar) ~ 0.02 and multiplied the student's gradient; a
    saturated noise adapter (gamma exactly 0 or 1 in bf16) gave sqrt an infinite derivative."""
    from server.distill.ddkd import DDKD
    torch.manual_seed(0)
    loss_fn = DDKD(K, student_channels=32, teacher_channels=128)
    assert max(loss_fn.timesteps) <= 500 and min(loss_fn.timesteps) == 0 and len(loss_fn.timesteps) == 5
    fs = torch.randn(16, 32, 8, 8, requires_grad=True)
    ft = torch.randn(16, 128, 8, 8)
    loss_fn(inputs(torch.randn(16, K), torch.randn(16, K), fs, ft)).backward()
    assert torch.isfinite(fs.grad).all() and fs.grad.abs().max() < 0.05
    with torch.no_grad():
        loss_fn.adapter.net[-1].bias.copy_(torch.tensor([200.0, -200.0]))      # gamma saturates to 1
    fs.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(inputs(torch.randn(16, K), torch.randn(16, K), fs, ft))
    loss.backward()
    assert torch.isfinite(fs.grad).all()


def test_dkd_weight_warms_up_linearly():
    from server.distill.losses import DKD
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, K, generator=g), torch.randn(8, K, generator=g)
    dkd = DKD(K, warmup=0.2)
    full = dkd(LossInputs(s, F.one_hot(torch.arange(8) % K, K).float(), t, progress=0.5)).item()
    half = dkd(LossInputs(s, F.one_hot(torch.arange(8) % K, K).float(), t, progress=0.1)).item()
    start = dkd(LossInputs(s, F.one_hot(torch.arange(8) % K, K).float(), t, progress=0.0)).item()
    assert full > 0 and start == 0 and half == pytest.approx(full / 2, rel=1e-6)


def test_dkd_decomposes_kd():
    """DKD paper, eq. 4: KD = TCKD + (1 - p_t^gt) NCKD, per sample."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, K, generator=g) * 3, torch.randn(16, K, generator=g) * 3
    target = torch.randint(0, K, (16,), generator=g)
    T = 4.0
    tckd, nckd, pt_gt = dkd_parts(s, t, target, T)
    pt = F.softmax(t / T, 1)
    kd_per_sample = (pt * (pt.log() - F.log_softmax(s / T, 1))).sum(1) * T * T
    torch.testing.assert_close(kd_per_sample, tckd + (1 - pt_gt) * nckd, rtol=1e-4, atol=1e-4)
    assert KD(K, T)(inputs(s, t)).item() == pytest.approx(kd_per_sample.mean().item(), rel=1e-5)


def brute_force_injective(dist):
    n, m = dist.shape
    return min(itertools.permutations(range(m), n), key=lambda cols: dist[range(n), list(cols)].sum())


@pytest.mark.parametrize("seed", range(5))
def test_sparse_assignment_equals_brute_force(seed):
    dist = np.random.default_rng(seed).random((3, 5))
    got = sparse_assignment(dist)
    best = brute_force_injective(dist)
    assert len(set(got)) == 3, "each student channel gets its own teacher channel"
    assert dist[range(3), got].sum() == pytest.approx(dist[range(3), list(best)].sum())
    assert got.max() < 5, "padded rows never win a real teacher channel for a student channel"


@pytest.mark.parametrize("seed", range(3))
def test_grouped_assignment_equals_brute_force(seed):
    dist = np.random.default_rng(seed).random((2, 5))         # r = 2, s = 4 teacher channels used
    groups = grouped_assignment(dist)
    chosen = teacher_group_order(5, 4)
    assert groups.shape == (2, 2) and len(set(groups.ravel())) == 4 and set(groups.ravel()) <= set(chosen)
    cost = sum(dist[i, g].sum() for i, g in enumerate(groups))
    best = min(sum(dist[0, list(p[:2])]) + sum(dist[1, list(p[2:])]) for p in itertools.permutations(chosen))
    assert cost == pytest.approx(best)


def test_maxpool_rule_equals_explicit_loop():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 7, 5, 5, generator=g)
    got = target_maxpool(fs, ft)
    groups = grouped_assignment(channel_distances(fs, ft).numpy())
    want = torch.zeros_like(fs)
    for i, group in enumerate(groups):
        for b in range(4):
            for y in range(5):
                for x in range(5):
                    want[b, i, y, x] = max(ft[b, j, y, x] for j in group)
    torch.testing.assert_close(got, want)


def test_composed_spec_and_unknown_name():
    terms = build_losses("soft_ce:1,kd:0.5", K)
    assert [w for _, w in terms] == [1.0, 0.5]
    with pytest.raises(KeyError, match="soft_ce"):
        build_losses("nope", K)


@pytest.mark.parametrize("name", ["resnet18", "resnet8", "mobilenet_v2", "mobilenet_v2_w05", "shufflenet_v2",
                                  "shufflenet_v2_x05", "convnet3"])
def test_distillation_points_capture_pre_activation(name):
    model = build_student(name, 1, K).eval()
    tap = FeatureTap(model, name)
    model(torch.randn(2, 1, 32, 32))
    assert tap.value is not None and tap.value.ndim == 4
    if not name.startswith("shufflenet_v2"):
        assert (tap.value < 0).any(), "captured before the activation, so negatives survive"


def test_mixed_feature_term_stays_bounded_on_a_flat_student_map():
    """A spatially flat student feature map (early training) must not blow the gradient up."""
    from server.distill.losses import MixedKD
    fs = (torch.ones(4, 8, 8, 8) + 1e-7 * torch.randn(4, 8, 8, 8)).requires_grad_(True)
    ft = torch.rand(4, 16, 4, 4)
    logits = torch.randn(4, K, requires_grad=True)
    loss = MixedKD(K)(inputs(logits, torch.randn(4, K), fs, ft))
    loss.backward()
    assert torch.isfinite(loss) and fs.grad.abs().max() < 10


def test_a_diverging_loss_stops_training_with_a_clear_error():
    from server.distill.losses import LOSSES
    from server.distill.student import train_student
    from shared.config import StudentConfig
    if "nan_for_test" not in LOSSES:
        @LOSSES.register("nan_for_test")
        class NaNLoss(torch.nn.Module):
            def __init__(self, num_classes, **_):
                super().__init__()

            def forward(self, inp):
                return inp.student_logits.sum() * float("nan")
    x, y = torch.randn(8, 1, 32, 32), F.one_hot(torch.arange(8) % K, K).float()
    with pytest.raises(FloatingPointError, match="diverged; lower the learning rate"):
        train_student(x, y, StudentConfig(model="convnet3_w32", steps=3, batch_size=8), torch.device("cpu"),
                      loss="soft_ce:1,nan_for_test:1")


@pytest.mark.parametrize("name", ["attention", "mixed"])
def test_attention_terms_have_bounded_gradients_at_initialisation(name):
    """At ConvNet-3's distillation point (after the norm, before the ReLU) a channel's plain spatial mean
    is the norm's bias, zero at initialisation; normalising it gave ~1e8 gradients."""
    torch.manual_seed(0)
    student = build_student("convnet3_w32", 1, K)
    tap = FeatureTap(student, "convnet3_w32")
    logits = student(torch.randn(8, 1, 32, 32))
    loss = LOSSES[name](K)(inputs(logits, torch.randn(8, K), tap.value, torch.rand(8, 64, 4, 4)))
    loss.backward()
    worst = max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None)
    assert torch.isfinite(loss) and worst < 10, worst


def test_small_batches_train_at_a_sqrt_scaled_learning_rate(monkeypatch):
    """The IPC-1 recipe (batch 10) runs at lr * sqrt(10 / 100); batches at or above the reference keep lr."""
    from server.distill import student
    from shared.config import StudentConfig
    cfg = StudentConfig(lr=0.02, lr_reference_batch=100)
    assert student.student_lr(cfg, 100) == student.student_lr(cfg, 256) == 0.02
    assert student.student_lr(cfg, 10) == pytest.approx(0.02 * 0.1 ** 0.5)
    seen = []
    real_sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda params, lr, **kw: seen.append(lr) or real_sgd(params, lr, **kw))
    x, y = torch.randn(10, 1, 32, 32), F.one_hot(torch.arange(10) % K, K).float()
    student.train_student(x, y, StudentConfig(model="convnet3_w32", steps=1), torch.device("cpu"))
    assert seen == [pytest.approx(student.student_lr(StudentConfig(), 10))]


def test_a_feature_term_alone_carries_its_warning(caplog):
    """A feature-only term that trains below KD without a logit term is still selectable, with its caveat
    in `fedcondense losses` and in the log when a spec uses it alone; beside KD no warning applies."""
    import logging
    import subprocess
    import sys
    from server.distill.losses import build_losses, spec_caveats
    alone = spec_caveats("soft_ce:1,attention:1,channel_sparse:1")
    assert [w.split(":")[0] for w in alone] == ["attention", "channel_sparse"]
    assert "soft_ce:0.1,kd:0.9,channel_sparse:1" in alone[1]
    assert spec_caveats("soft_ce:0.1,kd:0.9,channel_sparse:1") == [] and spec_caveats("soft_ce:1,kd:1") == []
    assert [w.split(":")[0] for w in spec_caveats("soft_ce:1,dkd:1,channel_sparse:1")] == ["dkd"]
    with caplog.at_level(logging.WARNING):
        build_losses("soft_ce:1,mi_prior:1", 10)
    assert "below vanilla KD" in caplog.text and "mi_prior" in caplog.text
    listing = subprocess.run([sys.executable, "-m", "server.cli", "losses"], capture_output=True, text=True,
                             check=True).stdout
    flagged = [line.split()[0] for line, nxt in zip(listing.splitlines(), listing.splitlines()[1:])
               if nxt.strip().startswith("!")]
    assert flagged == ["attention", "channel_maxpool", "channel_random", "channel_sparse", "dkd", "mi_prior"]


def test_the_sparse_rule_targets_the_teachers_weak_channels_and_the_grouped_rules_every_one():
    """The diagnosis `fedcondense bench --distill-native` records: a squared distance is cheapest to a teacher channel
    with little energy, so rule 1 pairs a fresh student with the teacher's weak channels; rules 2-3 cover them all."""
    g = torch.Generator().manual_seed(0)
    fs = 0.5 * torch.randn(64, 4, 6, 6, generator=g)
    scale = torch.tensor([3.0] * 8 + [0.3] * 8).view(1, 16, 1, 1)       # 8 strong, 8 weak teacher channels
    ft = torch.randn(64, 16, 6, 6, generator=g) * scale
    sparse = target_coverage("sparse", fs, ft)
    assert sparse["channels_targeted"] == 4 and sparse["mean_energy_rank"] < 0.5
    assert sparse["energy_share"] < 0.05                                 # the weak channels hold ~1 % of the energy
    for rule in ("random", "maxpool"):
        grouped = target_coverage(rule, fs, ft)
        assert grouped["channels_targeted"] == 16 and grouped["energy_share"] == pytest.approx(1.0)


@pytest.mark.parametrize("rule", ["sparse", "random", "maxpool"])
def test_channel_matching_is_a_hint_stage_that_ends_under_its_threshold_or_budget(rule):
    """docs/spec.md §5: the term trains until its distance falls under a threshold (10 % of its first value
    here) or its step budget (half the steps) runs out; then it is zero, and the stage's state is a buffer,
    so a student resumed from a checkpoint stays in the same stage."""
    from server.distill.channel_matching import ChannelMatching
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 4, 4, 4, generator=gen)
    ft = base.repeat(1, 4, 1, 1)                   # every rule's target for a student near `base` is `base`
    term = ChannelMatching(10, rule)
    inputs = lambda fs, progress: LossInputs(torch.zeros(8, 10), torch.zeros(8, 10), torch.zeros(8, 10), fs, ft,
                                             progress=progress)
    far = torch.randn(8, 4, 4, 4, generator=gen) * 3
    first = term(inputs(far, 0.0))
    assert first > 0 and term(inputs(far * 0.9, 0.1)) > 0 and bool(term.active)
    restored = ChannelMatching(10, rule)
    restored.load_state_dict(term.state_dict())
    near = base + 0.01 * torch.randn(8, 4, 4, 4, generator=gen)
    for module in (term, restored):
        assert float(module(inputs(near, 0.2))) < 0.1 * float(first), "the step that crosses still counts"
        assert not bool(module.active) and float(module(inputs(far, 0.3))) == 0.0
    budget = ChannelMatching(10, rule)
    assert budget(inputs(far, 0.0)) > 0 and float(budget(inputs(far, 0.5))) == 0.0
    assert float(budget(inputs(far, 0.1))) == 0.0, "once over, the stage stays over"


def test_channel_hint_stage_runs_first_on_the_layers_up_to_the_distillation_point():
    """FitNets' first stage: before the task training, the student's layers up to the distillation point learn
    the channel term alone (its distance falls; the classifier after the point is untouched), and the stage is
    then over for the rest of training."""
    from server.distill.channel_matching import ChannelMatching
    from server.distill.student import _hint_stage
    from shared.augment import AUGMENTATIONS
    from shared.config import StudentConfig
    torch.manual_seed(0)
    x = torch.rand(32, 1, 32, 32) * 2 - 1
    student, teacher = build_student("convnet3_w32", 1, K), build_student("convnet3", 1, K).eval()
    taps = FeatureTap(student, "convnet3_w32"), FeatureTap(teacher, "convnet3")
    hint = ChannelMatching(K, "sparse")

    def distance():
        with torch.no_grad():
            student.eval(), student(x), teacher(x), student.train()
            return float(F.mse_loss(taps[0].value, taps[1].value[:, torch.as_tensor(
                sparse_assignment(channel_distances(taps[0].value, taps[1].value).numpy()))]))

    before, head, trace = distance(), student.classifier.weight.clone(), []
    _hint_stage(student, teacher, taps, hint, x, StudentConfig(model="convnet3_w32", batch_size=16, lr=0.05),
                torch.device("cpu"), steps=120, batch=16, augment=AUGMENTATIONS["none"], trace=trace)
    assert distance() < 0.5 * before
    assert torch.equal(student.classifier.weight, head), "the stage trains only the layers up to the point"
    assert not bool(hint.active) and hint.runs_first
    (row,) = trace                          # what the stage ran, for the results page's diagnosis
    assert row["stage"] == "hint" and row["budget"] == 60 and 0 < row["steps"] <= 60
    assert row["last_distance"] < row["first_distance"]
