"""Differential-privacy accounting for what one device releases per image (docs/privacy.md).

Per image a device releases a pair: its latent through the Gaussian mechanism (clipped to L2 norm C,
then N(0, (sigma C)^2 I) noise) and its label through k-ary randomized response with epsilon_label,
or in the clear when the operator declares labels public. Neighbouring relation: two datasets that
differ in ONE (image, label) record, the dataset size staying fixed (replace-one, "bounded" DP), so
the released latent moves by at most 2C and the label by one bucket.

Group means (`group_size` k > 1): the device releases, instead of each latent, the mean of k clipped
latents that share a released label, with noise N(0, (sigma C / k)^2 I). Groups are cut by an OS-random
permutation that depends on the released labels alone, and each record joins at most one group, so
replacing one record moves one released mean by at most 2C / k: the same sigma gives the same epsilon
per record as the per-record release, with k times less noise on what is released. The labels (or
randomized-response labels) are released first; the grouping is adaptive on them, which the
composition covers. With public labels the relation
narrows to "replace one image by another of the same class", and the report says so in bold.

The epsilon of the pair is the exact composition of both mechanisms in dp-accounting's PLD
accountant under REPLACE_ONE (its Gaussian event there already carries sensitivity 2); its RDP
accountant is the cross-check, given the Gaussian explicitly at sensitivity 2 (sigma / 2), because
its REPLACE_ONE Gaussian keeps sensitivity 1. `releases` > 1 composes repeated releases of the same
records. Everything after the release (pooling, training, condensation, students) is
post-processing and spends no further privacy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import dp_accounting
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

NEIGHBOURING = "replace one (image, label) record; dataset size fixed (latent L2 sensitivity 2C)"
NEIGHBOURING_PUBLIC_LABELS = ("replace one image by another OF THE SAME LABEL; dataset size fixed "
                              "(latent L2 sensitivity 2C); labels are released in the clear")
LABEL_MECHANISMS = ("randomized_response", "public")


def rr_noise_parameter(epsilon: float, num_classes: int) -> float:
    """dp-accounting's noise parameter p of k-ary randomized response at `epsilon`: with probability
    1 - p the true label, else a uniform draw over all k labels; eps = ln(1 + k (1 - p) / p)."""
    if epsilon <= 0 or num_classes < 2:
        raise ValueError(f"randomized response needs epsilon > 0 and >= 2 classes, got {epsilon}, {num_classes}")
    return num_classes / (math.exp(epsilon) + num_classes - 1)


@dataclass(frozen=True)
class ImageRelease:
    """One device's release of each of its records: latent (Gaussian) and label (randomized response
    or public). `noise_multiplier` <= 0 or `clip_norm` <= 0 means no guarantee (epsilon inf)."""
    clip_norm: float
    noise_multiplier: float              # noise std = noise_multiplier * clip_norm
    delta: float
    label_mechanism: str = "randomized_response"
    label_epsilon: Optional[float] = None
    num_classes: int = 10
    releases: int = 1
    group_size: int = 1                  # k > 1: the mean of k same-label clipped latents per release

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {self.group_size!r}")
        if self.label_mechanism not in LABEL_MECHANISMS:
            raise ValueError(f"unknown label mechanism '{self.label_mechanism}'; choose one of {LABEL_MECHANISMS}")
        if self.label_mechanism == "randomized_response" and self.private and not (self.label_epsilon or 0) > 0:
            raise ValueError("randomized-response labels need label_epsilon > 0 (or label_mechanism='public')")

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0 and self.clip_norm > 0

    @property
    def neighbouring(self) -> str:
        text = NEIGHBOURING if self.label_mechanism == "randomized_response" else NEIGHBOURING_PUBLIC_LABELS
        if self.group_size == 1:
            return text
        return text.replace("latent L2 sensitivity 2C", f"L2 sensitivity 2C/{self.group_size} of the one group mean "
                                                         f"the record joins")

    @property
    def latent_sensitivity(self) -> float:
        """L2 distance one replaced record can move one released latent (or group mean)."""
        return 2 * self.clip_norm / self.group_size

    @property
    def noise_std(self) -> float:
        """Per-coordinate std of the noise on each released latent (or group mean)."""
        return self.noise_multiplier * self.clip_norm / self.group_size

    def _label_event(self) -> list:
        if self.label_mechanism != "randomized_response":
            return []
        return [dp_accounting.RandomizedResponseDpEvent(rr_noise_parameter(self.label_epsilon, self.num_classes),
                                                        self.num_classes)]

    def epsilon(self, accountant: str = "pld") -> float:
        if not self.private:
            return math.inf
        if accountant == "pld":
            acc, latent = PLDAccountant(NeighboringRelation.REPLACE_ONE), dp_accounting.GaussianDpEvent(self.noise_multiplier)
        else:
            acc, latent = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE), \
                dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.ComposedDpEvent([latent, *self._label_event()]),
                                                      self.releases))
        return float(acc.get_epsilon(self.delta))

    def ledger_entry(self) -> dict:
        rr = self.label_mechanism == "randomized_response" and self.private
        latent = "gaussian latent" if self.group_size == 1 else f"gaussian mean of {self.group_size} same-label latents"
        return {"mechanism": latent + " + " + ("randomized-response label" if rr else "public label"),
                **asdict(self), "latent_sensitivity": self.latent_sensitivity, "noise_std": self.noise_std,
                "label_keep_probability": (1 - rr_noise_parameter(self.label_epsilon, self.num_classes)
                                           * (self.num_classes - 1) / self.num_classes) if rr else 1.0,
                "neighbouring": self.neighbouring, "epsilon": self.epsilon("pld"), "epsilon_rdp": self.epsilon("rdp"),
                "accountant": "dp-accounting PLD, REPLACE_ONE (RDP cross-check)"}


def smallest_noise(within: Callable[[float], bool], start: float, tol: float = 1e-4) -> float:
    """Smallest sigma (to relative `tol`) with `within(sigma)`, `within` monotone in sigma; the bracket
    grows from `start` (an analytic guess), so a good guess settles it in a few evaluations."""
    step = tol
    if within(start):
        lo, hi = start * (1 - step), start
        while within(lo):
            step *= 4
            lo, hi = start * max(1 - step, 0.0), lo
    else:
        lo, hi = start, start * (1 + step)
        while not within(hi):
            if hi > 1e5:
                raise ValueError("no noise multiplier below 1e5 reaches that epsilon")
            step *= 4
            lo, hi = hi, start * (1 + step)
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if within(mid) else (mid, hi)
    return hi


def analytic_noise_multiplier(target_epsilon: float, delta: float, releases: int = 1) -> float:
    """Exact calibration of the latent's Gaussian alone (dp-accounting's analytic `GaussianPrivacyLoss`
    at sensitivity 2; `releases` compose exactly to one with std / sqrt(releases))."""
    from dp_accounting.pld.common import DifferentialPrivacyParameters
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
    loss = GaussianPrivacyLoss.from_privacy_guarantee(DifferentialPrivacyParameters(target_epsilon, delta), sensitivity=1.0)
    return 2.0 * loss.standard_deviation * math.sqrt(releases)


def calibrate(target_epsilon: float, delta: float, *, label_mechanism: str = "randomized_response",
              label_share: float = 0.25, num_classes: int = 10, releases: int = 1,
              clip_norm: float = 1.0, group_size: int = 1) -> ImageRelease:
    """The release whose (latent, label) epsilon is at most `target_epsilon`: randomized response at
    `label_share` of the budget, then the smallest latent noise that fits the composed total."""
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need target epsilon > 0 and 0 < delta < 1, got {target_epsilon}, {delta}")
    if label_mechanism == "randomized_response" and not 0 < label_share < 1:
        raise ValueError(f"label_share must lie in (0, 1), got {label_share}")
    label_eps = target_epsilon * label_share if label_mechanism == "randomized_response" else None
    make = lambda s: ImageRelease(clip_norm, s, delta, label_mechanism, label_eps, num_classes, releases, group_size)
    start = analytic_noise_multiplier(target_epsilon * (1 - label_share if label_eps else 1.0), delta, releases)
    return make(smallest_noise(lambda s: make(s).epsilon("pld") <= target_epsilon, start))


def noise_for_epsilon(target_epsilon: float, delta: float, releases: int = 1) -> float:
    """Smallest latent noise multiplier for `target_epsilon` when labels are public."""
    return calibrate(target_epsilon, delta, label_mechanism="public", releases=releases).noise_multiplier


def default_delta(n: int) -> float:
    """Below 1/n, as is customary: 1 / (10 n)."""
    return 1.0 / (10 * max(n, 1))
