"""The loss registry and what every loss reads (docs/spec.md §2-§5). Each method's module registers its
entries here; server/distill/losses.py imports them all, so a spec can name any of them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.registry import Registry

LOSSES: Registry = Registry("loss")

# what a term lacks on its own, printed by `fedcondense losses` and logged when a spec uses the term
# without a logit-distillation term (LOGIT_TERMS) beside it; the figures: docs/distill/
FEATURE_ONLY_CAVEAT = ("with the task loss alone it trains below vanilla KD, on real data and on the condensed set "
                       "(docs/distill/native.md, docs/distill/synthetic.md: the same term added to KD, "
                       "soft_ce:0.1,kd:0.9,{name}:1, is measured there too)")
LOGIT_TERMS = ("kd", "dkd", "mixed")


@dataclass
class LossInputs:
    student_logits: torch.Tensor
    targets: torch.Tensor                          # soft labels (B, K), rows sum to 1
    teacher_logits: torch.Tensor | None = None
    student_features: torch.Tensor | None = None   # (B, n, H, W) at the distillation point
    teacher_features: torch.Tensor | None = None   # (B, m, H, W), same H, W
    progress: float = 1.0                          # fraction of the training steps done (DKD's warm-up)
    teacher_by_term: dict = field(default_factory=dict)  # a term's teacher logits when its view differs
    extras: dict = field(default_factory=dict)

    def need_teacher(self, name: str) -> torch.Tensor:
        """The teacher's logits on the view term `name` asks for (losses.teacher_views)."""
        if self.teacher_logits is None:
            raise ValueError(f"loss '{name}' needs a teacher: pass --teacher (see `fedcondense distill --help`)")
        return self.teacher_by_term.get(name, self.teacher_logits)

    def need_features(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.student_features is None or self.teacher_features is None:
            raise ValueError(f"loss '{name}' needs student and teacher features at a distillation point")
        return self.student_features, self.teacher_features
