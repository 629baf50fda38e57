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
ROOT = Path(__file__).resolve().parents[1] / "shared" / "checkpoints"


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
            return root / entry["dir"], {**entry, "manifest": str(root / "manifest.json"), "recipe": manifest["recipe"]}
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
    return {k: entry[k] for k in ("manifest", "recipe")} | {"committed": str(folder)}


def export(cache: Path, name: str, recipe: str, data_cfg, autoencoder_cfg, chain_cfg, teacher_steps: int,
           rebuild: str, trained_on: str) -> Path:
    """Copy a recipe's autoencoder, chain and teacher from a cache folder into shared/checkpoints/NAME with
    their manifest (what they match, SHA-256 of every file, how to rebuild them)."""
    import torch

    from server.baseline_cache import state_fingerprint
    from server.pretrain import fingerprint, load_chain
    from shared.cache import to_jsonable
    from shared.data import load_dataset
    from shared.models.first_encoder import FirstEncoder
    shared_cfg = to_jsonable(chain_cfg) | {"layout": "shared", "module_steps": 0}
    pick = lambda kind, ok: [p for p in sorted(Path(cache).glob(f"{kind}-*")) if p.is_dir() and ok(p)]
    meta = lambda p: json.loads((p / "meta.json").read_text())
    ae = pick("autoencoder", lambda p: meta(p)["config"] == to_jsonable(autoencoder_cfg))
    chain = pick("chain", lambda p: meta(p)["config"] == shared_cfg)
    teacher = pick("teacher", lambda p: (p / "teacher.pt").exists())
    if len(ae) != 1 or len(chain) != 1 or len(teacher) != 1:
        raise ValueError(f"{cache} must hold exactly one autoencoder, chain and teacher of recipe '{recipe}'; "
                         f"found {len(ae)}, {len(chain)}, {len(teacher)}")
    e1 = FirstEncoder.from_pretrained(ae[0] / "first_encoder", low_cpu_mem_usage=False)
    e2, _ = load_chain(chain[0], torch.device("cpu"))
    e1_fp = state_fingerprint(e1)
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    entries = {}
    for kind, src, match in (
            ("autoencoder", ae[0], {"config": to_jsonable(autoencoder_cfg),
                                    "public_fingerprint": fingerprint(load_dataset(data_cfg).public.images)}),
            ("chain", chain[0], {"config": shared_cfg, "e1_fingerprint": e1_fp}),
            ("teacher", teacher[0], {"steps": teacher_steps, "e1_fingerprint": e1_fp,
                                     "e2_fingerprint": fingerprint(torch.cat([p.flatten() for p in e2.parameters()]))})):
        shutil.copytree(src, out / kind)
        entries[kind] = {"dir": kind, **match, "sha256": file_hashes(out / kind)}
    manifest = {"recipe": recipe, "data": to_jsonable(data_cfg), "trained_on": trained_on, "rebuild": rebuild,
                "entries": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
