"""Client-side encoding with the cheap first encoder E1 (docs/spec.md §1, federated scenario)."""
from __future__ import annotations

import torch

from shared.device import fixed_conv_kernels
from shared.models.first_encoder import FirstEncoder


@torch.no_grad()
def encode_images(first_encoder: FirstEncoder, images: torch.Tensor, batch_size: int = 512,
                  device: torch.device | None = None) -> torch.Tensor:
    """Images (N, C, S, S) in [-1, 1] -> latents (N, c, s, s) float32 on CPU."""
    device = device or next(first_encoder.parameters()).device
    with fixed_conv_kernels():                   # the same images give the same latents: cache keys repeat
        out = [first_encoder(images[i:i + batch_size].to(device)).float().cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)
