"""The chain's batches as units of work: kept on disk as they finish, and shared out over workers.

Each synthetic image depends only on its group of T real latents, the models and its batch's random
generator (`batch_generator`: seeded by the condensation seed and the batch's index, never by what ran
before), so a batch computed anywhere, at any time, is the same tensor. Hence:

- **resume**: `BatchStore` writes each finished batch to `work/batch-NNNNN.safetensors` (temporary name,
  fsync, rename) under a key naming everything the batch depends on; a run killed mid-way and started
  again recomputes only the missing batches, and its set is bit-identical to an uninterrupted run;
- **several workers**: under torch.distributed (`torchrun --nproc-per-node N -m server.cli condense ...`),
  rank r computes the batches b with b % N == r into the same folder, waits at a barrier, and every rank
  assembles the whole set from the folder (which the workers must share: one machine, or a shared file
  system). Refinement and saving then run on rank 0.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shared.durable import fsync_dir, write_json
from shared.workers import barrier, world

SEED_STRIDE = 1_000_003        # batch b of seed s draws from seed s + b * SEED_STRIDE; batch 0 from s itself


def batch_generator(seed: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + batch * SEED_STRIDE)


class BatchStore:
    """Finished batches of one condensation, on disk under `key`; a folder holding another key is cleared."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        rank = world()[0]
        marker = self.folder / "key.json"
        if rank == 0:
            if marker.exists() and json.loads(marker.read_text()).get("key") != key:
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob("*.tmp"):
                stale.unlink()
            if not marker.exists():
                write_json(marker, {"key": key})
        barrier()

    def path(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:05d}.safetensors"

    def has(self, batch: int) -> bool:
        return self.path(batch).exists()

    def save(self, batch: int, images: torch.Tensor, finals: torch.Tensor) -> None:
        final = self.path(batch)
        tmp = final.with_suffix(".tmp")
        save_file({"images": images.contiguous(), "finals": finals.contiguous()}, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(self.folder)

    def load(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = load_file(str(self.path(batch)))
        return t["images"], t["finals"]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
