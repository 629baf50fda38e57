"""Distribution Matching (DM), Zhao & Bilen, WACV 2023, at its published settings by default:
20,000 iterations, real batch 256 per class, image learning rate 1 (DM's normalised pixel units; 0.5 in
ours, server/condense/matching.py), SGD momentum 0.5, DSA augmentation, synthetic images initialised from random
real images of their class. Several (IPC, seed) sets run in one loop (server/condense/matching.py)."""
from __future__ import annotations

import torch

from server.condense.matching import match, pixel_set

DM_ITERATIONS = 20_000
DM_LR = 0.5                     # = DM's 1.0 on mean/std-normalised pixels, in [-1, 1] units


def real_init(labels: torch.Tensor, ipc: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of `ipc` random real images per class (DM's 'real' initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < ipc:
            raise ValueError(f"class {c} has {len(pool)} images, fewer than ipc={ipc}")
        picks.append(pool[torch.randperm(len(pool), generator=gen)[:ipc]])
    return torch.cat(picks)


def distribution_matching(images: torch.Tensor, labels: torch.Tensor, runs: list[tuple[int, int]], iterations: int,
                          device: torch.device, lr: float = DM_LR, real_batch: int = 256,
                          time_limit: float = float("inf")) -> dict:
    """`runs`: (ipc, seed) pairs. Returns {(ipc, seed): {'images', 'labels' (hard), 'losses'}, 'seconds': s,
    'iterations': the iterations run (fewer than asked only where `time_limit` cut them)}."""
    k = int(labels.max()) + 1
    sets, keys = [], []
    for ipc, seed in runs:
        idx = real_init(labels, ipc, k, seed)
        sets.append(pixel_set(f"dm ipc{ipc} s{seed}", images[idx], labels[idx], lr, device))
        keys.append((ipc, seed, labels[idx]))
    real = images.to(device)
    info = match(sets, real, labels, k, iterations, device, real_batch, seed=sum(s for _, s in runs), desc="DM",
                 time_limit=time_limit)
    out = {(ipc, seed): {"images": s.params.detach().cpu(), "labels": y, "losses": s.losses}
           for (ipc, seed, y), s in zip(keys, sets)}
    out["seconds"], out["iterations"] = info["seconds"], info["iterations"]
    return out
