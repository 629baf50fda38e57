"""Train a student on any labelled image set and evaluate it on the real test set.

One recipe for every arm (synthetic, random real, full real): SGD with momentum, cosine schedule,
DSA-style augmentation, soft cross-entropy (hard labels are one-hot soft labels) and, by default, KD from
the server's teacher on the same augmented view (`StudentConfig.loss`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from server.distill.losses import LossInputs, build_losses, needs_teacher, parse_loss_spec, teacher_views
from shared.augment import AUGMENTATIONS
from shared.cache import config_hash, fingerprint, state_fingerprint, to_jsonable
from shared.checkpoint import LoopCheckpoint
from shared.config import StudentConfig
from shared.device import autocast
from shared.models.distill_points import FeatureTap
from shared.models.students import build_student
from shared.progress import progress
from shared.workers import average_gradients, mean_over_workers, my_slice


def train_student(images: torch.Tensor, targets: torch.Tensor, cfg: StudentConfig, device: torch.device,
                  steps: int | None = None, loss: str = "soft_ce", desc: str = "student",
                  teacher: nn.Module | None = None, checkpoint: Path | None = None, trace: list | None = None,
                  trace_every: int = 25) -> nn.Module:
    """`targets`: (N, K) soft labels. Trains for `steps` (default cfg.steps) minibatch steps. With
    `checkpoint`, the loop's state is kept there every minute and a restarted call resumes it. With
    `trace` (a list), every `trace_every` steps it gets each loss term's value (unweighted) and the
    student's gradient norm: what a diagnosis of a failing loss reads.

    With a `teacher`, each batch is augmented from the same random draws for the student and, once per
    strength that a term asks for (`teacher_views`: 1 is the student's own view; docs/spec.md §2's MI loss:
    a weaker one), for the teacher; each term reads the teacher's logits on its own view, and both networks'
    distillation-point features (the teacher's on its strongest view) reach the losses.
    A teacher that no term of `loss` consults (plain soft_ce) is ignored: callers pass theirs unconditionally.

    Under torchrun every worker draws the whole batch and its augmentations, trains on its slice of the rows
    and averages gradients (shared/workers.py): N workers follow one worker's run, up to the order of sums.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} labels")
    if not torch.isfinite(images).all():
        raise ValueError("training images contain NaN/inf")
    steps = steps or cfg.steps
    teacher = teacher if needs_teacher(loss) else None
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_student(cfg.model, images.shape[1], targets.shape[1], images.shape[-1]).to(device)
    taps = (FeatureTap(model, cfg.model), FeatureTap(teacher, getattr(teacher, "arch", "teacher"))) if teacher is not None else None
    context = _feature_channels(model, teacher, images[:2].to(device), taps) if taps else {}
    terms = [(module.to(device), w) for module, w in build_losses(loss, targets.shape[1], **context)]
    names = [name for name, _ in parse_loss_spec(loss)]
    params = [*model.parameters(), *(p for module, _ in terms for p in module.parameters())]
    batch = min(cfg.batch_size, len(images))
    opt = torch.optim.SGD(params, lr=student_lr(cfg, batch), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    augment = AUGMENTATIONS[cfg.augment]
    views = teacher_views(loss, cfg.teacher_strength)
    state = LoopCheckpoint(checkpoint, config_hash([fingerprint(images), fingerprint(targets), to_jsonable(cfg), steps,
                                                     loss, state_fingerprint(teacher), str(device)]))
    first = state.restore(_Trained(model, terms), opt, sched, [gen])
    model.train()
    for module, _ in terms if taps and first == 0 else ():
        if getattr(module, "runs_first", False):
            _hint_stage(model, teacher, taps, module, images, cfg, device, steps, batch, augment, trace)
    mine = my_slice(batch)                      # under torchrun: this worker's rows of every batch
    for step in progress(range(first, steps), desc=desc, unit="step", initial=first, total=steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx].to(device)
        draws = gen.get_state()
        with autocast(device, cpu_bf16=True):
            inp = LossInputs(model(augment(x, 1.0, gen)[mine]).float(), targets[idx][mine].to(device),
                             progress=step / steps)
            if teacher is not None:
                _teacher_logits(inp, teacher, views, lambda s: augment(x, s, torch.Generator().set_state(draws))[mine])
                inp.student_features, inp.teacher_features = taps[0].value, taps[1].value
            values = [module(inp) for module, _ in terms]
            total = sum(w * v for (_, w), v in zip(terms, values))
        if not torch.isfinite(mean_over_workers(total)):
            raise FloatingPointError(f"student loss '{loss}' became {total.item()} at step {step}: training diverged; "
                                     f"lower the learning rate or that term's weight (e.g. soft_ce:1,kd:0.5)")
        opt.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(params)
        if trace is not None and step % trace_every == 0:
            trace.append(_trace_row(step, names, values, model))
        opt.step()
        sched.step()
        state.tick(step + 1, _Trained(model, terms), opt, sched, [gen])
    state.finish()
    for tap in taps or ():
        tap.remove()
    return model.eval()


@torch.no_grad()
def _teacher_logits(inp: LossInputs, teacher: nn.Module, views: dict[str, float], view_at) -> None:
    """One teacher pass per distinct view strength, weakest first, so the strongest view's features stay in the
    feature tap; `inp.teacher_logits` is that view's, and each term on another view finds its own by name."""
    by_strength = {s: teacher(view_at(s)).float() for s in sorted(set(views.values()))}
    inp.teacher_logits = by_strength[max(by_strength)]
    inp.teacher_by_term = {name: by_strength[s] for name, s in views.items() if s != max(by_strength)}


def _hint_stage(model, teacher, taps, hint, images, cfg: StudentConfig, device, steps: int, batch: int, augment,
                trace: list | None = None):
    """FitNets' first stage (Romero et al. 2015): the student's layers up to the distillation point learn the
    `hint` term alone until it says its stage is over (its threshold or step budget), then the task training
    starts from them with its own optimiser and schedule. The stage draws from its own generator, so the
    task stage sees the same batches and augmentations as a run without the hint (paired seeds). With
    `trace`, it gets one row: the steps the stage ran, its budget, and its first and last distance."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    budget = max(1, int(hint.budget * steps))
    opt = torch.optim.SGD(model.parameters(), lr=student_lr(cfg, batch), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, budget)
    mine = my_slice(batch)
    distances, taken = [], 0
    for step in progress(range(budget), desc="hint stage", unit="step"):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)].to(device)
        with autocast(device, cpu_bf16=True):
            view = augment(x, 1.0, gen)[mine]
            logits = model(view).float()
            with torch.no_grad():
                teacher(view)
            loss = hint(LossInputs(logits, logits.detach(), student_features=taps[0].value,
                                   teacher_features=taps[1].value, progress=0.0))   # this loop counts the budget
        distances.append(float(loss.detach()))
        if not bool(hint.active):                      # under its threshold: this step is not taken
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(list(model.parameters()))
        opt.step()
        sched.step()
        taken += 1
    hint.active.fill_(False)
    if trace is not None:
        trace.append({"stage": "hint", "steps": taken, "budget": budget,
                      "first_distance": distances[0], "last_distance": distances[-1]})


def _trace_row(step: int, names: list[str], values: list[torch.Tensor], model: nn.Module) -> dict:
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    terms = {}
    for name, value in zip(names, values):
        terms[name if name not in terms else f"{name}#{len(terms)}"] = float(value.detach())
    return {"step": step, "terms": terms, "grad_norm": float(torch.stack(grads).norm()) if grads else 0.0}


class _Trained(nn.Module):
    """The student and its loss terms' own parameters (adapters, priors), saved and restored together."""

    def __init__(self, model: nn.Module, terms: list):
        super().__init__()
        self.model, self.terms = model, nn.ModuleList([module for module, _ in terms])


def student_lr(cfg: StudentConfig, batch: int) -> float:
    """`cfg.lr` for batches of at least `cfg.lr_reference_batch` images; smaller batches (a set of fewer
    images, e.g. IPC 1: 10) scale it by sqrt(batch / reference), the usual rule for noisier gradients."""
    return cfg.lr * min(1.0, batch / cfg.lr_reference_batch) ** 0.5


@torch.no_grad()
def _feature_channels(model, teacher, probe, taps) -> dict:
    """Dry run to size feature-level losses (DDKD's adapters)."""
    model.eval()
    model(probe)
    teacher(probe)
    model.train()
    return {"student_channels": taps[0].value.shape[1], "teacher_channels": taps[1].value.shape[1]}


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int | None = None) -> float:
    """Top-1 accuracy as a fraction in [0, 1]. Default batches: 1000 on CUDA, 100 on CPU, where ConvNet-3
    runs 1.3-1.45x faster than at 1000 (activations nearer the caches) with identical logits."""
    batch_size = batch_size or (1000 if device.type == "cuda" else 100)
    model.eval()
    correct = 0
    for lo in range(0, len(images), batch_size):
        with autocast(device, cpu_bf16=True):
            logits = model(images[lo:lo + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[lo:lo + batch_size]).sum())
    return correct / max(len(images), 1)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


def fit_and_score(images, targets, test, cfg: StudentConfig, device, steps=None, loss="soft_ce", desc="student",
                  teacher=None, checkpoint: Path | None = None, trace: list | None = None) -> dict:
    start = time.time()
    model = train_student(images, targets, cfg, device, steps, loss, desc, teacher, checkpoint, trace)
    return {"accuracy": evaluate(model, test.images, test.labels, device), "seconds": time.time() - start,
            "images": len(images), "steps": steps or cfg.steps}
