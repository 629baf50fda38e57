"""The standard evaluation protocol of dataset distillation (DC, DSA, DM, IDC; shared/config.py
`EvaluationConfig`): ConvNet-3 evaluators trained from scratch on a set alone, scored on the full test
set, mean and std over evaluator seeds. `--protocol standard` of `fedcondense student` and the bench.

Evaluators of sets of equal size train side by side in one `EnsembleConvNet` (a member is initialised
and trained exactly as a lone ConvNet would be), so a GPU trains dozens in one pass. An epoch is one
shuffled pass over the set in batches of 256; the learning rate drops x0.1 at half the epochs.

Under torchrun (`torchrun --nproc-per-node N -m server.cli student --protocol standard ...`) the passes are
shared out, pass i to worker i mod N, and the accuracies gathered: a pass's seed and members do not depend on
which worker trains it, so N workers score every evaluator as one worker does (bit for bit on the CPU with
one thread per worker, `tests/test_training_workers.py`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from server.condense.formation import expand
from shared.augment import apply_dsa, draw_dsa
from shared.cache import config_hash, fingerprint, to_jsonable
from shared.checkpoint import LoopCheckpoint
from shared.config import EvaluationConfig
from shared.device import autocast
from shared.models.students import EnsembleConvNet
from shared.progress import progress
from shared.workers import gathered, world


@dataclass
class LabelledSet:
    """A set to evaluate: stored images (N, C, S, S) in [-1, 1], labels (N, K) rows summing to 1, and
    its formation factor (server/condense/formation.py; 1: plain images)."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    factor: int = 1

    def training_data(self, label_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = expand(self.images.float(), self.labels.float(), self.factor)
        if label_mode == "hard":
            y = F.one_hot(y.argmax(1), y.shape[1]).float()
        elif label_mode != "soft":
            raise ValueError(f"labels must be 'hard' or 'soft', got '{label_mode}'")
        return x, y


def members_per_pass(cfg: EvaluationConfig, device: torch.device) -> int:
    return cfg.max_members or (32 if device.type == "cuda" else 1)


def train_members(xs: torch.Tensor, ys: torch.Tensor, cfg: EvaluationConfig, device: torch.device, seed: int,
                  desc: str = "evaluators", checkpoint: Path | None = None, own: bool = False) -> EnsembleConvNet:
    """xs (M, N, C, S, S), ys (M, N, K): member m trains on set m for cfg.epochs. With `checkpoint`, the
    loop's state is kept there every minute and a restarted call resumes it (shared/checkpoint.py)."""
    m, n, c, s, _ = xs.shape
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = EnsembleConvNet(m, c, ys.shape[-1], cfg.width, cfg.depth, s).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [cfg.epochs // 2], 0.1)
    xs, ys = xs.to(device), ys.to(device)
    rows = torch.arange(m, device=device)[:, None]
    state = LoopCheckpoint(checkpoint, config_hash([fingerprint(xs), fingerprint(ys), to_jsonable(cfg), seed,
                                                     str(device)]), own=own)
    first = state.restore(net, opt, sched, [gen])
    net.train()
    for epoch in progress(range(first, cfg.epochs), desc=desc, unit="epoch", initial=first, total=cfg.epochs):
        order = torch.argsort(torch.rand(m, n, generator=gen), dim=1).to(device)
        for lo in range(0, n, cfg.batch_size):
            idx = order[:, lo:lo + cfg.batch_size]
            b = idx.shape[1]
            x = xs[rows, idx].reshape(m * b, c, s, s)
            if cfg.augment == "dsa":
                x = apply_dsa(x, draw_dsa(m * b, gen, torch.arange(m).repeat_interleave(b)))
            with autocast(device, cpu_bf16=True):
                logits = net(x.view(m, b, c, s, s).transpose(0, 1).reshape(b, m * c, s, s)).float()
            loss = -(ys[rows, idx] * F.log_softmax(logits, -1)).sum(-1).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        state.tick(epoch + 1, net, opt, sched, [gen])
    state.finish()
    return net.eval()


@torch.no_grad()
def member_accuracy(net: EnsembleConvNet, test_images: torch.Tensor, test_labels: torch.Tensor,
                    device: torch.device, batch: int = 500) -> list[float]:
    correct = torch.zeros(net.members, dtype=torch.long)
    for lo in range(0, len(test_images), batch):
        x = test_images[lo:lo + batch].to(device)
        with autocast(device, cpu_bf16=True):
            logits = net(x.repeat(1, net.members, 1, 1))
        correct += (logits.argmax(-1).cpu() == test_labels[lo:lo + batch][None]).sum(1)
    return (correct.float() / len(test_images)).tolist()


def evaluate_sets(sets: list[LabelledSet], test, cfg: EvaluationConfig, device: torch.device,
                  work: Path | None = None) -> dict:
    """Every set x `cfg.evaluators` seeds; returns {name: {"accuracy": [...], "mean", "std", ...}}.
    Sets of equal training size share passes; evaluator e of every set uses seed cfg.seed + e's pass.
    `work`: a folder for each pass's training checkpoint (a killed evaluation resumes there)."""
    start = time.time()
    jobs = []                                               # (set name, evaluator, x, y)
    for st in sets:
        x, y = st.training_data(cfg.labels)
        jobs += [(st.name, e, x, y) for e in range(cfg.evaluators)]
    by_shape: dict = {}
    for job in jobs:
        by_shape.setdefault(tuple(job[2].shape) + (job[3].shape[1],), []).append(job)
    width = members_per_pass(cfg, device)
    passes = [(shape, lo, group[lo:lo + width]) for shape, group in by_shape.items() for lo in range(0, len(group), width)]
    rank, workers = world()
    mine = []                                               # (set name, evaluator, accuracy, pass index)
    for i, (shape, lo, part) in enumerate(passes):
        if i % workers != rank:
            continue
        net = train_members(torch.stack([j[2] for j in part]), torch.stack([j[3] for j in part]), cfg, device,
                            seed=cfg.seed + 1000 * lo + shape[0], desc=f"evaluators x{len(part)} on {shape[0]} images",
                            checkpoint=Path(work) / f"pass-{shape[0]}-{lo}.pt" if work else None, own=workers > 1)
        mine += [(name, e, a, i) for (name, e, _, _), a in zip(part, member_accuracy(net, test.images, test.labels,
                                                                                    device))]
    acc: dict = {st.name: [None] * cfg.evaluators for st in sets}
    trained_by = [None] * len(passes)
    for worker, scored in enumerate(gathered(mine)):
        for name, e, a, i in scored:
            acc[name][e], trained_by[i] = a, worker
    out = {}
    for st in sets:
        a = torch.tensor(acc[st.name])
        out[st.name] = {"accuracy": acc[st.name], "mean": float(a.mean()),
                        "std": float(a.std()) if len(a) > 1 else 0.0, "training_images": len(st.images) * st.factor ** 2,
                        "stored_images": len(st.images), "factor": st.factor}
    return {"sets": out, "seconds": time.time() - start, "protocol": "standard", "workers": workers,
            "passes": [{"images": shape[0], "members": len(part), "worker": w}
                       for (shape, _, part), w in zip(passes, trained_by)],
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
