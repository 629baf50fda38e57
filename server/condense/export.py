"""`fedcondense checkpoints`: a recipe's trained models, from a cache folder into shared/checkpoints/NAME
with the manifest that server/condense/committed.py checks before it uses them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from server.condense.committed import ROOT, file_hashes
from server.condense.pretrain import load_chain
from shared.cache import fingerprint, state_fingerprint, to_jsonable
from shared.data import load_dataset
from shared.models.first_encoder import FirstEncoder


def export(cache: Path, name: str, recipe: str, data_cfg, autoencoder_cfg, chain_cfg, teacher_steps: int,
           rebuild: str, trained_on: str) -> Path:
    """Copy a recipe's autoencoder, chain and teacher from a cache folder into shared/checkpoints/NAME with
    their manifest (what they match, SHA-256 of every file, how to rebuild them)."""
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
