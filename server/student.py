"""Train a student on any labelled image set and evaluate it on the real test set (issue 2 §5).

One recipe for every arm (synthetic, random real, full real): SGD with momentum, cosine schedule,
DSA-style augmentation, soft cross-entropy (hard labels are one-hot soft labels).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from server.losses import LOSSES, LossInputs, parse_loss_spec
from shared.augment import AUGMENTATIONS
from shared.config import StudentConfig
from shared.models.students import build_student
from shared.progress import progress


def train_student(images: torch.Tensor, targets: torch.Tensor, cfg: StudentConfig, device: torch.device,
                  steps: int | None = None, loss: str = "soft_ce", desc: str = "student") -> nn.Module:
    """`targets`: (N, K) soft labels. Trains for `steps` (default cfg.steps) minibatch steps."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} labels")
    if not torch.isfinite(images).all():
        raise ValueError("training images contain NaN/inf")
    steps = steps or cfg.steps
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_student(cfg.model, images.shape[1], targets.shape[1], images.shape[-1]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    augment, terms = AUGMENTATIONS[cfg.augment], parse_loss_spec(loss)
    batch = min(cfg.batch_size, len(images))
    model.train()
    for _ in progress(range(steps), desc=desc, unit="step"):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = augment(images[idx].to(device), 1.0, gen)
        inp = LossInputs(model(x), targets[idx].to(device))
        total = sum(w * LOSSES[name](inp) for name, w in terms)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    model.eval()
    correct = 0
    for lo in range(0, len(images), batch_size):
        logits = model(images[lo:lo + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[lo:lo + batch_size]).sum())
    return correct / max(len(images), 1)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


def fit_and_score(images, targets, test, cfg: StudentConfig, device, steps=None, loss="soft_ce", desc="student") -> dict:
    start = time.time()
    model = train_student(images, targets, cfg, device, steps, loss, desc)
    return {"accuracy": evaluate(model, test.images, test.labels, device), "seconds": time.time() - start,
            "images": len(images), "steps": steps or cfg.steps}
