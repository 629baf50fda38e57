"""Client-side Gaussian mechanism on latents (issue 4 §1), applied before sealing.

Each latent is clipped to L2 norm <= C, then N(0, (sigma*C)^2) noise is added per coordinate. With the
neighbouring relation 'replace one image' (one latent changes) the L2 sensitivity of the released
latent is 2C under clipping; add/remove of one image gives C (see docs/privacy.md and shared/accounting).
"""
from __future__ import annotations

import torch


def clip_latents(latents: torch.Tensor, clip_norm: float) -> torch.Tensor:
    flat = latents.flatten(1)
    scale = (clip_norm / flat.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return (flat * scale[:, None]).view_as(latents)


def gaussian_mechanism(latents: torch.Tensor, clip_norm: float, noise_multiplier: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip to `clip_norm`, add Gaussian noise of std `noise_multiplier * clip_norm`. C <= 0: identity."""
    if clip_norm <= 0:
        return latents
    clipped = clip_latents(latents, clip_norm)
    if noise_multiplier <= 0:
        return clipped
    noise = torch.randn(clipped.shape, generator=generator) * (noise_multiplier * clip_norm)
    return clipped + noise.to(clipped.device)
