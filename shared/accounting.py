"""Differential-privacy accounting for the client-side latent mechanism (issue 4 §1).

Mechanism (client/privacy.py): each image's latent is clipped to L2 norm C and released once with
N(0, (sigma C)^2 I) noise. Neighbouring relation: two datasets that differ in ONE image (replace-one);
the released latent moves by at most 2C, so the mechanism is the Gaussian mechanism with sensitivity
2C, i.e. effective noise multiplier z = sigma / 2. The threat model is a curious server that sees
every released latent (encryption protects them only in transit). Everything downstream (chain
training, condensation, students) is post-processing and spends no further privacy.
Accounting: dp-accounting's PLD accountant (tight) with its RDP accountant as a cross-check;
`releases` > 1 composes repeated releases of the same image.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld.common import DifferentialPrivacyParameters
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from dp_accounting.rdp import RdpAccountant

NEIGHBOURING = "replace-one-image (L2 sensitivity 2C after clipping)"


@dataclass(frozen=True)
class GaussianRelease:
    clip_norm: float
    noise_multiplier: float          # noise std = noise_multiplier * clip_norm
    delta: float
    releases: int = 1

    @property
    def effective_multiplier(self) -> float:
        return self.noise_multiplier / 2.0          # sensitivity 2C

    def epsilon(self, accountant: str = "pld") -> float:
        if self.noise_multiplier <= 0:
            return math.inf
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(self.effective_multiplier), self.releases)
        acc = PLDAccountant() if accountant == "pld" else RdpAccountant()
        acc.compose(event)
        return float(acc.get_epsilon(self.delta))

    def ledger_entry(self) -> dict:
        return {"mechanism": "gaussian", **asdict(self), "sensitivity": 2 * self.clip_norm,
                "neighbouring": NEIGHBOURING, "epsilon": self.epsilon("pld"), "epsilon_rdp": self.epsilon("rdp"),
                "accountant": f"dp-accounting {getattr(dp_accounting, '__version__', '')} PLD (RDP cross-check)"}


def analytic_noise_multiplier(target_epsilon: float, delta: float, releases: int = 1) -> float:
    """Exact calibration of the Gaussian mechanism (dp-accounting's analytic `GaussianPrivacyLoss`;
    `releases` of one Gaussian compose exactly to one with std / sqrt(releases)), in our units (sensitivity 2C)."""
    loss = GaussianPrivacyLoss.from_privacy_guarantee(DifferentialPrivacyParameters(target_epsilon, delta), sensitivity=1.0)
    return 2.0 * loss.standard_deviation * math.sqrt(releases)


def noise_for_epsilon(target_epsilon: float, delta: float, releases: int = 1, tol: float = 1e-4) -> float:
    """Smallest noise multiplier sigma (to relative `tol`) whose PLD epsilon is <= target.

    The bracket grows from the analytic calibration, which the PLD epsilon matches to ~1e-6, so two or
    three PLD evaluations (~1 s each) settle it, where a bisection from scratch took ~17."""
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need target epsilon > 0 and 0 < delta < 1, got {target_epsilon}, {delta}")
    within = lambda s: GaussianRelease(1.0, s, delta, releases).epsilon("pld") <= target_epsilon
    start, step = analytic_noise_multiplier(target_epsilon, delta, releases), tol
    if within(start):
        lo, hi = start * (1 - step), start
        while within(lo):
            step *= 4
            lo, hi = start * max(1 - step, 0.0), lo
    else:
        lo, hi = start, start * (1 + step)
        while not within(hi):
            if hi > 1e5:
                raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta}")
            step *= 4
            lo, hi = hi, start * (1 + step)
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return hi


def default_delta(n: int) -> float:
    """Below 1/n, as is customary: 1 / (10 n)."""
    return 1.0 / (10 * max(n, 1))
