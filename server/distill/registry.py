"""The loss registry and what every loss reads (docs/spec.md §2-§5). Each method's module registers its
entries here; server/distill/losses.py imports them all, so a spec can name any of them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.registry import Registry

LOSSES: Registry = Registry("loss")


@dataclass
class LossInputs:
    student_logits: torch.Tensor
    targets: torch.Tensor                          # soft labels (B, K), rows sum to 1
    teacher_logits: torch.Tensor | None = None
    student_features: torch.Tensor | None = None   # (B, n, H, W) at the distillation point
    teacher_features: torch.Tensor | None = None   # (B, m, H, W), same H, W
    progress: float = 1.0                          # fraction of the training steps done (DKD's warm-up)
    extras: dict = field(default_factory=dict)

    def need_teacher(self, name: str) -> torch.Tensor:
        if self.teacher_logits is None:
            raise ValueError(f"loss '{name}' needs a teacher: pass --teacher (see `fedcondense distill --help`)")
        return self.teacher_logits

    def need_features(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.student_features is None or self.teacher_features is None:
            raise ValueError(f"loss '{name}' needs student and teacher features at a distillation point")
        return self.student_features, self.teacher_features
