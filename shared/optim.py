"""AdamW with PyTorch's fused kernel: one vectorised update for every parameter instead of a Python loop
over them (torch >= 2.4 on CPU; CUDA too). The same update rule, rounded differently in the last bits.
Measured on the 2-core AVX2 CPU (docs/results.md, session 21): 2.2 ms against 14-21 ms per update of the
chain's UNet, about 5 % of a chain-training step. Used by the chain and the teacher; the autoencoder keeps
the plain loop, so E1, and every pool of latents it makes, stays bit-identical with earlier caches."""
from __future__ import annotations

from typing import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, lr, fused=True, **kwargs)`, or the plain loop where this torch or
    device has no fused kernel (older torch, MPS)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, **kwargs)
