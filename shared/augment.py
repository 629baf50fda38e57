"""Differentiable augmentations for training on small (synthetic) sets.

- `dsa`: Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021) as its code parameterises it
  (`ParamDiffAug`): one family per batch, drawn from color (brightness +-0.5, saturation x[0, 2],
  contrast x[0.5, 1.5]), crop (translation by up to 1/8 of the side, zero fill), cutout (a zeroed
  square of half the side), scale (x[1/1.2, 1.2] per axis) and rotate (+-15 degrees); parameters per
  image. Flip is left out, as for grey-scale digits and clothing. The standard evaluation protocol
  (server/distill/evaluate.py) and DM use it. `draw_dsa` + `apply_dsa` share one draw between two batches
  (siamese: real and synthetic images augmented alike).
- `affine`: a random affine per image (scale, rotation, translation) and horizontal flip, with a
  `strength` that scales every range (weak views for a teacher, strong for a student); the
  teacher-KD student recipe uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.registry import Registry

AUGMENTATIONS: Registry = Registry("augmentation")
DSA_FAMILIES = ("color", "crop", "cutout", "scale", "rotate")
SCALE, ROTATE, CROP, CUTOUT = 1.2, 15.0, 0.125, 0.5
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5


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


def warp(x: torch.Tensor, theta: torch.Tensor, padding_mode: str = "border", align_corners: bool = False) -> torch.Tensor:
    """Apply per-sample affine matrices (differentiable in x)."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, padding_mode=padding_mode, align_corners=align_corners)


def random_affine(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None,
                  flip: bool = True) -> torch.Tensor:
    return warp(x, affine_theta(x.shape[0], strength, generator, flip))


@AUGMENTATIONS.register("affine")
def affine(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    return random_affine(x, strength, generator)


@AUGMENTATIONS.register("none")
def no_augment(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    return x


@dataclass
class DsaDraw:
    """One DSA draw for n images: the family per image and every family's per-image parameters."""
    family: torch.Tensor          # (n,) index into DSA_FAMILIES
    u: torch.Tensor               # (n, 6) uniforms in [0, 1): the family's parameters

    def subset(self, idx: torch.Tensor) -> "DsaDraw":
        return DsaDraw(self.family[idx], self.u[idx])


def draw_dsa(n: int, generator: torch.Generator | None = None, groups: torch.Tensor | None = None) -> DsaDraw:
    """One family per group of images (one group: the whole batch, as DSA's single mode draws one per
    batch; `groups` (n,) with values 0..G-1: one per group, for models trained side by side)."""
    groups = torch.zeros(n, dtype=torch.long) if groups is None else groups.cpu()
    per_group = torch.randint(0, len(DSA_FAMILIES), (int(groups.max()) + 1 if n else 1,), generator=generator)
    return DsaDraw(per_group[groups], torch.rand(n, 6, generator=generator))


def _color(x, u):
    x = x + (u[:, 0, None, None, None] - 0.5) * BRIGHTNESS
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (u[:, 1, None, None, None] * SATURATION) + mean_c
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean_all) * (u[:, 2, None, None, None] + CONTRAST) + mean_all


def _crop(x, u):
    h, w = x.shape[-2:]
    sx = torch.floor(u[:, 0] * (2 * int(w * CROP + 0.5) + 1)) - int(w * CROP + 0.5)
    sy = torch.floor(u[:, 1] * (2 * int(h * CROP + 0.5) + 1)) - int(h * CROP + 0.5)
    theta = torch.zeros(len(x), 2, 3, device=u.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = -2 * sx / w, -2 * sy / h          # shift by whole pixels, zero fill
    return warp(x, theta, padding_mode="zeros", align_corners=False)


def _cutout(x, u):
    h, w = x.shape[-2:]
    size = int(h * CUTOUT + 0.5)
    cx = torch.floor(u[:, 0] * (w + (1 - size % 2))).long()
    cy = torch.floor(u[:, 1] * (h + (1 - size % 2))).long()
    xs, ys = torch.arange(w, device=x.device), torch.arange(h, device=x.device)
    inside_x = (xs[None] >= (cx - size // 2)[:, None].to(x.device)) & (xs[None] < (cx - size // 2 + size)[:, None].to(x.device))
    inside_y = (ys[None] >= (cy - size // 2)[:, None].to(x.device)) & (ys[None] < (cy - size // 2 + size)[:, None].to(x.device))
    mask = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return x * mask[:, None].to(x.dtype)


def _scale(x, u):
    sx = u[:, 0] * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    sy = u[:, 1] * (SCALE - 1.0 / SCALE) + 1.0 / SCALE
    theta = torch.zeros(len(x), 2, 3, device=u.device)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return warp(x, theta, padding_mode="zeros", align_corners=True)


def _rotate(x, u):
    angle = (u[:, 0] - 0.5) * 2 * ROTATE / 180 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, sin, torch.zeros_like(cos)], 1),
                         torch.stack([-sin, cos, torch.zeros_like(cos)], 1)], 1)
    return warp(x, theta, padding_mode="zeros", align_corners=True)


_FAMILY_FNS = (_color, _crop, _cutout, _scale, _rotate)


def apply_dsa(x: torch.Tensor, draw: DsaDraw) -> torch.Tensor:
    """The drawn family with its parameters on every image (differentiable in x). Every family present is
    computed on the whole batch and selected by mask: each image's result is the same as alone, and no
    step waits on the device to learn which images took which family."""
    u = draw.u.to(x.device, torch.float32)
    present = draw.family.unique().tolist()
    if len(present) == 1:
        return _FAMILY_FNS[present[0]](x, u)
    family = draw.family.to(x.device)
    out = x
    for f in present:
        mask = (family == f).view(-1, *([1] * (x.dim() - 1)))
        out = torch.where(mask, _FAMILY_FNS[f](x, u).to(x.dtype), out)
    return out


@AUGMENTATIONS.register("dsa")
def dsa(x: torch.Tensor, strength: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DSA's single mode on one batch (`strength` is not used: DSA's ranges are fixed)."""
    return apply_dsa(x, draw_dsa(len(x), generator))
