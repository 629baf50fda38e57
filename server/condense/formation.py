"""Multi-image formation (Kim et al., "Dataset Condensation via Efficient Synthetic-Data
Parameterization", ICML 2022, IDC): one stored S x S image holds factor^2 images of side S / factor,
tiled; training expands each stored image into its tiles, each upsampled back to S x S.

The stored set keeps its size in bytes (images per class counts stored images); a set is formed or
not, and `expand` is the decoding step IDC's evaluation applies to its own sets, applied here to any
set that says it is formed (`factor` > 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def form(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(N * factor^2, C, S, S) -> (N, C, S, S): groups of factor^2 consecutive images, each shrunk to
    S / factor (area averaging), tiled row by row."""
    if factor == 1:
        return images
    n, c, s, _ = images.shape
    if n % factor ** 2 or s % factor:
        raise ValueError(f"cannot form {n} images of side {s} by {factor}: need a multiple of {factor ** 2} "
                         f"images and a side divisible by {factor}")
    small = F.interpolate(images, scale_factor=1 / factor, mode="area")
    tiles = small.view(n // factor ** 2, factor, factor, c, s // factor, s // factor)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(n // factor ** 2, c, s, s)


def expand(images: torch.Tensor, labels: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, S, S) stored images -> (N * factor^2, C, S, S) training images (bilinear upsampling), with
    each stored image's label repeated for its tiles (the stored label is its tiles' mean)."""
    if factor == 1:
        return images, labels
    n, c, s, _ = images.shape
    tiles = images.view(n, c, factor, s // factor, factor, s // factor).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n * factor ** 2, c, s // factor, s // factor)
    up = F.interpolate(tiles, size=(s, s), mode="bilinear", align_corners=False)
    return up, labels.repeat_interleave(factor ** 2, dim=0)
