"""Checkpoint cache under ~/.cache/fedcondense, keyed by a hash of the config that built it."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:                # not POSIX: entries are still written atomically, only not waited for
    fcntl = None


def cache_root() -> Path:
    root = Path(os.environ.get("FEDCONDENSE_CACHE", Path.home() / ".cache" / "fedcondense"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def config_hash(*parts) -> str:
    blob = json.dumps([to_jsonable(p) for p in parts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir(kind: str, *parts) -> Path:
    """Directory for one cached artefact; it holds `config.json` describing what built it."""
    return cache_root() / f"{kind}-{config_hash(*parts)}"


@contextlib.contextmanager
def building(path: Path):
    """Hold one cache entry while checking for it and building it: a second process that wants the same
    checkpoint (two runs, or test workers, sharing a cache) waits, then loads the first one's instead of
    training it again and racing it for the same temporary folder. An flock on `<entry>.lock`: the
    kernel releases it when its holder exits, crashed or not."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process building {path.name} ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fingerprint(tensor) -> str:
    """A short SHA-256 of a tensor's bytes (cache keys: the data a model was trained on)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def state_fingerprint(module) -> str | None:
    """A hash of a module's parameters and buffers, by name; None for no module."""
    if module is None:
        return None
    return config_hash([(name, fingerprint(tensor)) for name, tensor in module.state_dict().items()])
