"""Checkpoints committed with the code (shared/checkpoints/NAME/manifest.json): the full recipe's models,
trained on a GPU by `benchmarks/gpu_standard.sh`, so that a CPU run shows full-recipe quality without
hours of training. A run uses an entry only where it is exactly what the run would train:

- the autoencoder: the same config, trained on the same public split (its fingerprint);
- the chain and the teacher: the same config, over latents of the same first encoder, and a pool that
  is the whole private split as released without noise (no DP, every node in). They were trained on the
  E1 latents of those very images; a run whose pool differs (a DP run, a dropped node) trains its own.

An entry is copied into the run's cache under the key the run computes, after its files' SHA-256
match the manifest; the report names it. Rebuild: the manifest's `rebuild` command.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger("fedcondense.committed")
REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "shared" / "checkpoints"


def shown(path: Path) -> str:
    """A path as results name it: from the repository root when inside it, so that files do not carry the
    machine's layout."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _manifests() -> list[tuple[Path, dict]]:
    return [(p.parent, json.loads(p.read_text())) for p in sorted(ROOT.glob("*/manifest.json"))]


def file_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def find(kind: str, **match) -> tuple[Path, dict] | None:
    """The committed entry of `kind` whose manifest fields equal `match`, or None."""
    for root, manifest in _manifests():
        entry = manifest["entries"].get(kind)
        if entry and all(entry.get(k) == v for k, v in match.items()):
            return root / entry["dir"], {**entry, "manifest": shown(root / "manifest.json"), "recipe": manifest["recipe"]}
    return None


def install(kind: str, target: Path, **match) -> dict | None:
    """Copy the matching committed entry to `target` (a cache path) after checking its hashes; returns the
    entry's description, or None when there is no match."""
    found = find(kind, **match)
    if found is None:
        return None
    folder, entry = found
    if file_hashes(folder) != entry["sha256"]:
        raise RuntimeError(f"committed checkpoint {folder} does not match its manifest's SHA-256; restore it from "
                           f"git (`git checkout -- {folder}`) or rebuild it: {entry.get('rebuild', '')}")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    tmp.rename(target)
    log.info("using the committed %s checkpoint %s (%s recipe)", kind, folder, entry["recipe"])
    return {k: entry[k] for k in ("manifest", "recipe")} | {"committed": shown(folder)}

