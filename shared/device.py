"""Device selection (`--device auto|cpu|cuda`) and reproducible seeding."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{os.cpu_count()} cores,{torch.get_num_threads()} threads"


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
