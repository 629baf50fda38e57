"""Differentiable augmentation for small (synthetic) training sets, DSA-style (Zhao & Bilen 2021).

Per-sample random affine (scale, rotation, translation) and horizontal flip through
`affine_grid`/`grid_sample`, so gradients flow to the images when needed. `strength` scales every
range: weak augmentation for a teacher, strong of the same kind for a student (SPEC §2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shared.registry import Registry

AUGMENTATIONS: Registry = Registry("augmentation")


def affine_theta(n: int, strength: float = 1.0, generator: torch.Generator | None = None,
                 flip: bool = True) -> torch.Tensor:
    """n random affine matrices (n, 2, 3) on the CPU: one draw of scale, rotation, translation, flip each."""
    u = lambda: torch.rand(n, generator=generator) * 2 - 1
    scale = 1 + 0.2 * strength * u()
    angle = math.radians(15) * strength * u()
    tx, ty = 0.125 * strength * u(), 0.125 * strength * u()
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos * sign, -sin, tx], 1), torch.stack([sin * sign, cos, ty], 1)], 1)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-sample affine matrices (differentiable in x)."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def random_affine(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None,
                  flip: bool = True) -> torch.Tensor:
    return warp(x, affine_theta(x.shape[0], strength, generator, flip))


@AUGMENTATIONS.register("dsa")
def dsa(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    return random_affine(x, strength, generator)


@AUGMENTATIONS.register("none")
def no_augment(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    return x
