"""The server's teacher: a classifier E1 -> E2 -> head over pooled latents.

Trained on latents only (E1 frozen, so training skips it), it classifies pixel images through E1,
which lets it label and distil into students on synthetic images. Its features for feature-level
losses are E2's last feature map.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from server.condense.committed import install
from shared.cache import building, cache_dir, config_hash, fingerprint, state_fingerprint
from shared.checkpoint import LoopCheckpoint
from shared.models.first_encoder import FirstEncoder
from shared.models.second_encoder import SecondEncoder
from shared.device import autocast, cpu_bf16_key
from shared.progress import progress
from shared.workers import agreed, average_gradients, barrier, my_slice, world


class Teacher(nn.Module):
    def __init__(self, first_encoder: FirstEncoder, second_encoder: SecondEncoder, num_classes: int):
        super().__init__()
        self.first_encoder = copy.deepcopy(first_encoder).requires_grad_(False).eval()
        self.second_encoder = copy.deepcopy(second_encoder).requires_grad_(True)
        tokens, dim = second_encoder.config.tokens, second_encoder.config.token_dim
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(tokens * dim, num_classes))

    def classify_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.head(self.second_encoder(latents))

    def classify_rows(self, latents: torch.Tensor, rows: slice) -> torch.Tensor:
        """Training logits of `latents[rows]` only, under the dropout mask the whole batch draws: on a CPU the
        same draws as `classify_latents(latents)[rows]`, so workers that share out a batch train as one."""
        flatten, drop, linear = self.head
        feats = flatten(self.second_encoder(latents[rows]))
        keep = torch.empty((len(latents), feats.shape[1]), dtype=feats.dtype, device=feats.device).bernoulli_(1 - drop.p)
        return linear(feats * keep[rows] / (1 - drop.p))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = self.first_encoder(images)
        return self.classify_latents(latents)


def train_teacher(first_encoder, second_encoder, latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  device: torch.device, steps: int = 800, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                  noise: float = 0.1, checkpoint: Path | None = None) -> tuple[Teacher, dict]:
    """AdamW on (latent + small Gaussian jitter, label); returns the teacher and its training time.
    `checkpoint`: where the whole training state is kept (shared/checkpoint.py), so that a killed run
    continues from it and trains the same teacher, bit for bit. Under torchrun every worker draws the whole
    batch (indices, jitter, dropout mask), trains on its slice and averages gradients (shared/workers.py)."""
    start = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    teacher = Teacher(first_encoder, second_encoder, num_classes).to(device)
    params = [*teacher.second_encoder.parameters(), *teacher.head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    if steps < 4:
        raise ValueError(f"teacher steps must be >= 4 (one-cycle schedule), got {steps}")
    warmup = max(0.1, 2.0 / steps)                       # one-cycle needs >= 1 step up and down
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=warmup)
    state = LoopCheckpoint(checkpoint, config_hash([fingerprint(latents), fingerprint(labels.float()), steps, batch_size,
                                                     lr, seed, noise, state_fingerprint(teacher), str(device)]))
    first = state.restore(teacher, opt, sched, [gen])
    teacher.train()
    mine, workers = my_slice(batch_size), world()[1]
    for step in progress(range(first, steps), desc="teacher", unit="step", initial=first, total=steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        z = latents[idx].to(device)
        z = z + noise * torch.randn(z.shape, generator=gen).to(device)
        with autocast(device, cpu_bf16=True):
            logits = teacher.classify_latents(z) if workers == 1 else teacher.classify_rows(z, mine)
        loss = F.cross_entropy(logits.float(), labels[idx][mine].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        opt.step()
        sched.step()
        state.tick(step + 1, teacher, opt, sched, [gen])
    state.finish()
    teacher.eval()
    return teacher, {"seconds": time.time() - start, "steps": steps, "resumed_at_step": first}


def load_or_train_teacher(models: dict, latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          device: torch.device, steps: int, committed: dict | None = None) -> tuple[Teacher, dict]:
    """`committed`: as for the chain (server/condense/committed.py), for a pool that is the clean private split.
    Under torchrun rank 0 holds and writes the cache entry; every worker trains (`train_teacher`), then loads."""
    e2_fingerprint = fingerprint(torch.cat([p.flatten() for p in models["second_encoder"].parameters()]))
    path = cache_dir("teacher", fingerprint(latents), fingerprint(labels.float()), steps, e2_fingerprint,
                     *cpu_bf16_key(device))
    lead, info = world()[0] == 0, None
    with building(path) if lead else nullcontext():
        used = install("teacher", path, steps=steps, e2_fingerprint=e2_fingerprint, **committed) if (
            lead and committed and not (path / "teacher.pt").exists()) else None
        if agreed(not (path / "teacher.pt").exists()):
            path.mkdir(parents=True, exist_ok=True)
            teacher, info = train_teacher(models["first_encoder"], models["second_encoder"], latents, labels,
                                          num_classes, device, steps=steps, checkpoint=path / "training.pt")
            if lead:
                torch.save(teacher.state_dict(), path / "teacher.pt.tmp")
                (path / "teacher.pt.tmp").rename(path / "teacher.pt")
    barrier()
    if info is not None:
        return teacher, {**info, "path": str(path)}
    teacher = load_teacher(path, models["first_encoder"], models["second_encoder"], num_classes, device)
    used = agreed(used)
    if used:
        return teacher, {"seconds": 0.0, "steps": steps, "path": str(path), "committed": used}
    return teacher, {"seconds": 0.0, "steps": steps, "cached": str(path), "path": str(path)}


def load_teacher(path: Path, first_encoder, second_encoder, num_classes: int, device: torch.device) -> Teacher:
    """A teacher saved by `load_or_train_teacher` (its cache folder)."""
    teacher = Teacher(first_encoder, second_encoder, num_classes).to(device)
    teacher.load_state_dict(torch.load(Path(path) / "teacher.pt", map_location=device))
    return teacher.eval()
