"""Refining the chain's latents with a matching objective in latent space (an option beyond
docs/spec.md §1; `CondenseConfig.refine_iterations`, `refine_objective`).

The chain's final latents z are the starting point; they are optimised so that the decoded images
D(z) match, class by class, the distribution of the pool under random ConvNet embeddings (distribution
matching, server/condense/matching.py), as GLaD (Cazenavette et al., CVPR 2023) and LD3M optimise a generator's
latents. The decoder stays frozen. The "real" side is the pool itself, decoded: the server never holds
pixels, so the refinement is post-processing of the released latents and spends no privacy. With
multi-image formation the matched images are the tiles as the evaluator will see them (shrunk to
S / factor, then upsampled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from server.condense.embedders import NETWORK_FIELDS, PoolPlan
from server.condense.matching import Parameterisation, match


@torch.no_grad()
def decoded_pool(decoder, latents: torch.Tensor, labels: torch.Tensor, per_class: int, device: torch.device,
                 seed: int = 0, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `per_class` pool latents per class (a seeded draw), decoded to images on `device`."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    idx = torch.cat(picks)
    images = torch.cat([decoder(latents[idx[i:i + batch]].to(device)).float() for i in range(0, len(idx), batch)])
    return images, labels[idx]


def tile_view(images: torch.Tensor, factor: int) -> torch.Tensor:
    """What a formed tile looks like to the evaluator: shrunk by `factor`, upsampled back."""
    if factor == 1:
        return images
    side = images.shape[-1]
    small = F.interpolate(images, scale_factor=1 / factor, mode="area")
    return F.interpolate(small, size=(side, side), mode="bilinear", align_corners=False)


def refine_latents(zs: list[torch.Tensor], classes: list[torch.Tensor], decoder, pool_latents: torch.Tensor,
                   pool_labels: torch.Tensor, num_classes: int, iterations: int, lr: float, device: torch.device,
                   factor: int = 1, real_per_class: int = 6000, real_batch: int = 256, seed: int = 0,
                   time_limit: float = float("inf"), objective: str = "mean", networks: str = "random",
                   ce_weight: float = 0.0, pool_steps: int = 200) -> dict:
    """Refine several sets of chain latents (e.g. one per seed) in one loop; Adam on the latents, each class
    compared by `objective` (server/condense/matching.py `MATCH_OBJECTIVES`) through `networks`
    (server/condense/embedders.py; a trained pool learns from the decoded pool, `pool_steps` steps per network).
    Returns {'latents': [refined (n, c, s, s) on the CPU per set], 'losses', 'seconds'}."""
    decoder = decoder.eval().requires_grad_(False)
    real, real_labels = decoded_pool(decoder, pool_latents, pool_labels, real_per_class, device, seed)
    real = tile_view(real, factor)
    render = lambda p: tile_view(decoder(p).clamp(-1, 1), factor)
    params = [Parameterisation(f"chain latents {i}", z.detach().clone().to(device).requires_grad_(True), render, cls,
                               lambda ps: torch.optim.Adam(ps, lr=lr)) for i, (z, cls) in enumerate(zip(zs, classes))]
    info = match(params, real, real_labels.to(device), num_classes, iterations, device, real_batch, seed,
                 desc="refine latents", time_limit=time_limit, objective=objective, networks=networks,
                 ce_weight=ce_weight, pool=PoolPlan(steps=pool_steps, every=max(1, pool_steps // 10)))
    decoder.requires_grad_(True)
    return {"latents": [p.params.detach().cpu() for p in params], "losses": [p.losses for p in params],
            "seconds": info["seconds"], "iterations": info["iterations"],
            **{k: info[k] for k in NETWORK_FIELDS if k in info}}
