"""Checkpoint cache under ~/.cache/fedcondense, keyed by a hash of the config that built it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path


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
    path = cache_root() / f"{kind}-{config_hash(*parts)}"
    return path
