"""Student losses, one registry keyed by name (docs/spec.md §1 claim 5, §2-§5).

Each entry is a factory `(num_classes, **options) -> nn.Module`; the module's `forward(LossInputs)`
returns a scalar, and its parameters (MI's prior m, d; DDKD's autoencoder and diffusion model) are
trained with the student. `--loss soft_ce:1,kd:0.5` composes terms by weight.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from server.distill import channel_matching, ddkd  # noqa: F401  (their entries register on import)
from server.distill.registry import FEATURE_ONLY_CAVEAT, LOGIT_TERMS, LOSSES, LossInputs

log = logging.getLogger(__name__)
_warned: set[str] = set()

def kl_div(teacher_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(teacher || student)."""
    return (teacher_probs * (teacher_probs.clamp_min(1e-12).log() - student_log_probs)).sum(1).mean()


@LOSSES.register("soft_ce")
class SoftCrossEntropy(nn.Module):
    """The patent's own: cross-entropy against the n_c / T label distribution (docs/spec.md §1 claims 5-6)."""

    def __init__(self, num_classes: int, **_):
        super().__init__()

    def forward(self, inp: LossInputs) -> torch.Tensor:
        return -(inp.targets * F.log_softmax(inp.student_logits, dim=1)).sum(1).mean()


@LOSSES.register("kd")
class KD(nn.Module):
    """Vanilla knowledge distillation (Hinton et al. 2015): T^2 KL(softmax(t/T) || softmax(s/T))."""

    def __init__(self, num_classes: int, temperature: float = 4.0, **_):
        super().__init__()
        self.temperature = temperature

    def forward(self, inp: LossInputs) -> torch.Tensor:
        T = self.temperature
        t = inp.need_teacher("kd")
        return kl_div(F.softmax(t / T, 1), F.log_softmax(inp.student_logits / T, 1)) * T * T


def dkd_parts(student_logits, teacher_logits, target, temperature):
    """Decoupled KD (Zhao et al. 2022): per-sample TCKD, NCKD and the teacher's target probability."""
    T = temperature
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    ps, pt = F.softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1)
    bs = torch.stack([ps[gt], 1 - ps[gt]], 1).clamp_min(1e-12)
    bt = torch.stack([pt[gt], 1 - pt[gt]], 1).clamp_min(1e-12)
    tckd = (bt * (bt.log() - bs.log())).sum(1) * T * T
    mask = gt.float() * 1e4
    ns_log = F.log_softmax(student_logits / T - mask, 1)
    nt = F.softmax(teacher_logits / T - mask, 1)
    nckd = (nt * (nt.clamp_min(1e-12).log() - ns_log)).sum(1) * T * T
    return tckd, nckd, pt[gt]


@LOSSES.register("dkd")
class DKD(nn.Module):
    """Decoupled KD (Zhao et al., CVPR 2022; docs/spec.md §3): alpha * TCKD + beta * NCKD, target = label argmax.

    As the paper and mdistiller train it: alpha 1, beta 8, temperature 4, and the loss weight ramped up
    linearly over the first `warmup` of training (20 of 240 epochs)."""

    caveat = ("on the condensed set it trains the width-128 ConvNet-3 below soft labels alone: the beta-8 non-target "
              "term (DKD's CIFAR-100 setting) outweighs the labels (docs/distill/synthetic.md); there, use kd")
    caveat_applies = "always"

    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: float = 20 / 240, **_):
        super().__init__()
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup

    def forward(self, inp: LossInputs) -> torch.Tensor:
        tckd, nckd, _ = dkd_parts(inp.student_logits, inp.need_teacher("dkd"), inp.targets.argmax(1), self.temperature)
        ramp = min(1.0, inp.progress / self.warmup) if self.warmup > 0 else 1.0
        return ramp * (self.alpha * tckd + self.beta * nckd).mean()


@LOSSES.register("mi_prior")
class MutualInformationPrior(nn.Module):
    """Negative mutual information with a learnable student prior (docs/spec.md §2).

    The teacher sees a weak augmentation of the student's image (`teacher_view = 0.5`), as §2 asks.
    P1 = sum_n s_n t_n^T, P = sym(P1) / sum; p_s = softmax(sum_g (m_g + d_g * a_g)), a_g ~ N(0, 1) fixed
    at initialisation, m and d learnable. **Readings:** (1) the prior is normalised with softmax.
    (2) With p_s in place of the student marginal P_s, the loss is
    -sum_ij P_ij (log P_ij - log p_s_i - log p_t_j) = -I(P) - KL(P_s || p_s): descending it in m, d drives
    p_s away from P_s without bound (measured: one seed in three collapsed). So the prior is fitted to
    the student's marginal (m, d descend KL(P_s || p_s), the maximum-likelihood fit §2's "learnable
    prior" stands for) and the student descends the loss with the prior held fixed; at the fit the KL
    term's gradient vanishes and the student maximises I(P).
    """

    teacher_view = 0.5
    caveat = FEATURE_ONLY_CAVEAT

    def __init__(self, num_classes: int, groups: int = 1, temperature: float = 1.0, **_):
        super().__init__()
        self.temperature = temperature
        self.m = nn.Parameter(torch.zeros(groups, num_classes))
        self.d = nn.Parameter(torch.full((groups, num_classes), 0.1))
        self.register_buffer("a", torch.randn(groups, num_classes))

    def prior(self) -> torch.Tensor:
        return F.softmax((self.m + self.d * self.a).sum(0), dim=0)

    def forward(self, inp: LossInputs) -> torch.Tensor:
        s = F.softmax(inp.student_logits / self.temperature, 1)
        t = F.softmax(inp.need_teacher("mi_prior") / self.temperature, 1)
        p1 = (s.unsqueeze(2) * t.unsqueeze(1)).sum(0)
        p2 = (p1 + p1.T) / 2
        P = (p2 / p2.sum()).clamp_min(1e-12)
        p_t, p_s = P.sum(0), P.sum(1).detach()
        log_prior = self.prior().clamp_min(1e-12).log()
        student = -(P * (P.log() - log_prior.detach()[:, None] - p_t.log()[None, :])).sum()
        prior_fit = (p_s * (p_s.log() - log_prior)).sum()
        return student + prior_fit


def _channel_vector(feat: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Channel attention: spatial mean of each channel's rectified activation, L2-normalised; resampled
    to `length` channels.

    **Readings (docs/spec.md §4):** (1) the mean is taken after the activation (ReLU), i.e. of what the next
    layer sees. Our distillation points sit after a normalisation and before the ReLU (docs/spec.md §5), where
    the plain spatial mean of a channel *is* the norm's bias: zero at initialisation, so the L2
    normalisation's gradient (~1 / ||v||) blew the student up (measured, docs/results.md). For features
    already past a ReLU this is the plain mean. (2) Teacher and student may differ in channel count;
    the longer vector is average-pooled to the shorter length, so no new parameters are needed.
    """
    v = F.relu(feat).mean(dim=(2, 3))
    if length is not None and v.shape[1] != length:
        v = F.adaptive_avg_pool1d(v.unsqueeze(1), length).squeeze(1)
    return F.normalize(v, dim=1, eps=1e-6)


def channel_attention_mse(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the normalised channel-attention vectors (teacher detached)."""
    n = min(fs.shape[1], ft.shape[1])
    return F.mse_loss(_channel_vector(fs, n), _channel_vector(ft, n).detach())


@LOSSES.register("attention")
class AttentionTransfer(nn.Module):
    """Channel-attention transfer (docs/spec.md §4; Zagoruyko & Komodakis 2017): beta * MSE(a_s, a_t), beta 1000.

    a = the L2-normalised channel-attention vector; beta 1000 as attention transfer and mdistiller's AT
    weight it. With beta 1 the term is ~1e-3 of the cross-entropy and changes nothing (measured: the
    student was within 0.01 points of the soft-label one)."""

    caveat = FEATURE_ONLY_CAVEAT

    def __init__(self, num_classes: int, beta: float = 1000.0, **_):
        super().__init__()
        self.beta = beta

    def forward(self, inp: LossInputs) -> torch.Tensor:
        fs, ft = inp.need_features("attention")
        return self.beta * channel_attention_mse(fs, ft)


@LOSSES.register("mixed")
class MixedKD(nn.Module):
    """docs/spec.md §4's suggested mix: 0.5 KL (deep: logits) + 0.3 feature MSE (shallow) + 0.2 attention MSE.

    **Reading:** the feature MSE compares spatial attention maps (channel mean of squared activations,
    L2-normalised over positions, as in attention transfer; the teacher's resized to the student's
    grid), which needs no learnable adapter when shapes differ. Standardising the maps (dividing by
    their spatial spread) is unbounded for a flat map; these maps are not (tested). The attention
    term uses `_channel_vector` (rectified means), which stays bounded at initialisation (tested).
    """

    def __init__(self, num_classes: int, temperature: float = 4.0, weights=(0.5, 0.3, 0.2), **_):
        super().__init__()
        self.kd, self.weights = KD(num_classes, temperature), weights

    @staticmethod
    def _map(feat: torch.Tensor, size) -> torch.Tensor:
        m = F.interpolate(feat.pow(2).mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False)
        return F.normalize(m.flatten(1), dim=1)

    def forward(self, inp: LossInputs) -> torch.Tensor:
        fs, ft = inp.need_features("mixed")
        w_kl, w_feat, w_att = self.weights
        return (w_kl * self.kd(inp) + w_feat * F.mse_loss(self._map(fs, fs.shape[-2:]), self._map(ft, fs.shape[-2:]).detach())
                + w_att * channel_attention_mse(fs, ft))


def build_losses(spec: str, num_classes: int, **context) -> list[tuple[nn.Module, float]]:
    """'soft_ce' or 'soft_ce:1,kd:0.5' -> [(loss module, weight)]; `context` (feature channel counts)
    goes to every factory."""
    for warning in spec_caveats(spec):
        if warning not in _warned:
            _warned.add(warning)
            log.warning("loss '%s': %s", spec, warning)
    return [(LOSSES[name](num_classes, **context), w) for name, w in parse_loss_spec(spec)]


def spec_caveats(spec: str) -> list[str]:
    """The caveats that hold for `spec`: each feature-only term used without a logit-distillation term, and
    every term whose caveat applies always."""
    names = [name for name, _ in parse_loss_spec(spec)]
    has_logit_term = any(name in LOGIT_TERMS for name in names)
    return [f"{name}: {LOSSES[name].caveat.format(name=name)}" for name in names if getattr(LOSSES[name], "caveat", None)
            and (getattr(LOSSES[name], "caveat_applies", "alone") == "always" or not has_logit_term)]


def teacher_views(spec: str, override: float | None = None) -> dict[str, float]:
    """For each term of `spec` that consults the teacher, the augmentation strength of the view its teacher
    logits come from, relative to the student's: `override` when set, else the term's own `teacher_view`
    (docs/spec.md §2's MI loss: 0.5, a weak view), else 1.0 - logit KD labels exactly the view the student
    trains on. Each term gets its own view, so MI beside KD does not move KD's labels to the weak view."""
    if override is not None and not 0 <= override <= 1:
        raise ValueError(f"teacher_strength must be in [0, 1] (0: no augmentation, 1: the student's), got {override}")
    return {name: float(override) if override is not None else float(getattr(LOSSES[name], "teacher_view", 1.0))
            for name, _ in parse_loss_spec(spec) if name != "soft_ce"}


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """Names and weights, checked against the registry (raises with the valid names)."""
    return LOSSES.parse(spec)


def needs_teacher(loss_spec: str) -> bool:
    """Every loss term except plain soft cross-entropy learns from the teacher."""
    return any(name != "soft_ce" for name, _ in parse_loss_spec(loss_spec))
