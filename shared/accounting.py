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


def noise_for_epsilon(target_epsilon: float, delta: float, releases: int = 1, tol: float = 1e-4) -> float:
    """Smallest noise multiplier sigma whose PLD epsilon is <= target (bisection)."""
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need target epsilon > 0 and 0 < delta < 1, got {target_epsilon}, {delta}")
    eps = lambda s: GaussianRelease(1.0, s, delta, releases).epsilon("pld")
    lo, hi = 1e-3, 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1e5:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta}")
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def default_delta(n: int) -> float:
    """Below 1/n, as is customary: 1 / (10 n)."""
    return 1.0 / (10 * max(n, 1))
