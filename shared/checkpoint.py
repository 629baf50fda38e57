"""Training loops that survive `kill -9`: their whole state, written atomically every `every_s` seconds.

A `LoopCheckpoint` keeps, in one file, the model, the optimiser, the scheduler, every random generator the
loop draws from (its own `torch.Generator`s and torch's global state) and the position reached. A loop
started again with the same `key` (a fingerprint of its inputs and settings) restores that state and
continues from the position, so the trained model is bit-identical to an uninterrupted run's; a file
written under another key is ignored and replaced. The file goes when the loop finishes.
`FEDCONDENSE_CHECKPOINT_S` sets the interval (default 60 s; 0: after every unit).

Under torchrun a loop is either shared (every worker trains the same model on its slice of each batch:
rank 0 writes, every worker restores) or the worker's own (`own=True`: e.g. one evaluator pass among many,
written and removed by the worker that runs it).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from shared.durable import fsync_dir
from shared.workers import world


class LoopCheckpoint:
    def __init__(self, path: Path | None, key: str, every_s: float | None = None, own: bool = False):
        if every_s is None:
            every_s = float(os.environ.get("FEDCONDENSE_CHECKPOINT_S", "60"))
        self.path, self.key, self.every_s = (Path(path) if path else None), key, every_s
        self.writes = own or world()[0] == 0          # a shared loop: rank 0 writes, every worker restores
        self.last = time.time()
        self.restored_at = 0

    def restore(self, model, opt, sched, gens: list[torch.Generator]) -> int:
        """The position to start from: 0, or where a matching checkpoint left off (its state loaded)."""
        if self.path is None or not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("key") != self.key:
            return 0
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for gen, gen_state in zip(gens, state["generators"]):
            gen.set_state(gen_state)
        torch.set_rng_state(state["torch_rng"])
        self.restored_at = int(state["position"])
        return self.restored_at

    def tick(self, position: int, model, opt, sched, gens: list[torch.Generator]) -> None:
        """After `position` units are done: save when `every_s` seconds have passed since the last save."""
        if self.path is None or time.time() - self.last < self.every_s or not self.writes:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            torch.save({"key": self.key, "position": position, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "generators": [g.get_state() for g in gens], "torch_rng": torch.get_rng_state()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.last = time.time()

    def finish(self) -> None:
        if self.path is not None and self.writes:
            self.path.unlink(missing_ok=True)
