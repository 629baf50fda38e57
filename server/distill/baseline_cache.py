"""Reused evaluation baselines: the random-real and full-real students of a rerun.

A baseline arm's accuracy is a function of its inputs alone: the images and labels it trains on, the
test set, the student recipe and step count, the teacher's weights, and the code and kernels that train
it. A run whose inputs all match an earlier run's reuses that run's result instead of training the same
students again (on the 2-core AVX2 CPU, 4 of a warm `make demo`'s 8 minutes; docs/results.md).
The key hashes every one of those inputs, and with them the source of the `server` and `shared`
packages, the versions of torch, torchvision and diffusers, the device, the CPU's kernel set and the
thread count, so any change to the data, recipe, code or machine trains afresh. The synthetic arm is
never reused: it is what a run measures. `--retrain-baselines` (`DemoConfig.reuse_baselines = False`)
trains them anyway and refreshes the entry; the report names each reused arm and its entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from server.distill.losses import needs_teacher
from server.distill.student import fit_and_score
from shared.cache import building, cache_dir, fingerprint, state_fingerprint, to_jsonable
from shared.config import StudentConfig
from shared.data import ImageSplit
from shared.device import cpu_bf16_key, device_name

PACKAGES = ("server", "shared")
log = logging.getLogger(__name__)


def code_fingerprint(roots: list[Path] | None = None) -> str:
    """sha256 over the project's source files (path and bytes), in a fixed order."""
    roots = roots or [Path(__import__(p).__file__).parent for p in PACKAGES]
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _library_versions() -> dict:
    import diffusers
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "diffusers": diffusers.__version__}


def baseline_key(images, targets, test: ImageSplit, cfg: StudentConfig, device: torch.device, steps, loss: str,
                 teacher) -> dict:
    """Everything a baseline student's accuracy depends on, as a JSON-able dict (stored with the entry)."""
    return {"images": fingerprint(images), "targets": fingerprint(targets),
            "test_images": fingerprint(test.images), "test_labels": fingerprint(test.labels),
            "student": to_jsonable(cfg), "steps": steps or cfg.steps, "loss": loss,
            "teacher": state_fingerprint(teacher) if needs_teacher(loss) else None,
            "code": code_fingerprint(), "libraries": _library_versions(), "device": device_name(device),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "bf16": list(cpu_bf16_key(device))}


def baseline_score(arm: str, images, targets, test: ImageSplit, cfg: StudentConfig, device: torch.device,
                   steps: int | None = None, loss: str = "soft_ce", desc: str = "baseline", teacher=None,
                   reuse: bool = True) -> dict:
    """`fit_and_score` for a baseline arm, reusing a stored result whose key (module docstring) matches.
    A reused result carries `cached` (the entry) and `trained_seconds`; `seconds` is this call's time."""
    start = time.time()
    key = baseline_key(images, targets, test, cfg, device, steps, loss, teacher)
    path = cache_dir(f"baseline-{arm}", key)
    with building(path):
        stored = path / "result.json"
        result = _stored_result(stored) if reuse else None
        if result is not None:
            return {**result, "seconds": time.time() - start, "trained_seconds": result["seconds"],
                    "cached": str(path)}
        result = fit_and_score(images, targets, test, cfg, device, steps, loss, desc, teacher,
                               checkpoint=path / "training.pt")      # a killed run resumes the training here
        path.mkdir(parents=True, exist_ok=True)
        tmp = stored.with_name("result.json.tmp")
        tmp.write_text(json.dumps({"arm": arm, "key": key, "result": result}, indent=2))
        tmp.replace(stored)                       # atomic: a crash never leaves a half-written result
        return result


def _stored_result(stored: Path) -> dict | None:
    """The entry's result, or None (train again) when there is none or it cannot be read."""
    if not stored.exists():
        return None
    try:
        result = json.loads(stored.read_text())["result"]
        float(result["accuracy"]), float(result["seconds"])
        return result
    except (ValueError, KeyError, TypeError) as err:
        log.warning("baseline entry %s is unreadable (%s: %s); training the arm again", stored, type(err).__name__, err)
        return None
