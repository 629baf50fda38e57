"""Student losses, one registry keyed by name (SPEC §1 claim 5; issue 5 adds the KD family).

Every loss takes a `LossInputs` and returns a scalar; `--loss a:1,b:0.5` composes them by weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shared.registry import Registry

LOSSES: Registry = Registry("loss")


@dataclass
class LossInputs:
    student_logits: torch.Tensor
    targets: torch.Tensor                          # soft labels (B, K), rows sum to 1
    teacher_logits: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)     # features etc. for feature-level losses


@LOSSES.register("soft_ce")
def soft_cross_entropy(inp: LossInputs) -> torch.Tensor:
    """The patent's own: cross-entropy against the n_c / T label distribution."""
    return -(inp.targets * F.log_softmax(inp.student_logits, dim=1)).sum(1).mean()


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """'soft_ce' or 'soft_ce:1,kd:0.5' -> [(name, weight)], names checked against the registry."""
    terms = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        LOSSES[name]  # raises with the list of valid names
        terms.append((name, float(weight) if weight else 1.0))
    return terms
