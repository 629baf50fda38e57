"""Privacy ledger of a run (issue 4 §2): every release with its mechanism, parameters, epsilon and
delta; what left each device (shapes, dtype, bytes, cipher); versions and seeds."""
from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

from shared.accounting import NEIGHBOURING, GaussianRelease
from shared.cache import to_jsonable
from shared.config import DemoConfig
from shared.sealing import CIPHER

THREAT_MODEL = ("honest-but-curious server that sees every released latent; network attackers see only "
                "AES-GCM ciphertexts. Downstream training, condensation and students are post-processing "
                "of the released latents and spend no further privacy.")


def build_ledger(cfg: DemoConfig, federation: dict, latent_shape: list[int], delta: float | None) -> dict:
    fed = cfg.federation
    dp = fed is not None and fed.noise_multiplier > 0 and fed.clip_norm > 0
    release = GaussianRelease(fed.clip_norm, fed.noise_multiplier, delta) if dp else None
    entry = release.ledger_entry() if release else {
        "mechanism": "none", "epsilon": "inf", "delta": 0.0, "neighbouring": NEIGHBOURING,
        "note": "no differential privacy: latents left the devices without noise; no privacy guarantee is claimed"}
    device_releases = []
    for node, st in (federation.get("clients") or {}).items():
        accepted = int(node) in set(federation.get("accepted_nodes", []))
        device_releases.append({"node_id": int(node), "partition_id": st.get("partition_id"), "accepted": accepted,
                                "latents": st.get("latents"), "shape": [st.get("latents"), *latent_shape],
                                "dtype": "float16", "ciphertext_bytes": st.get("ciphertext_bytes"),
                                "cipher": CIPHER, **entry})
    return {
        "summary": {"epsilon": entry["epsilon"], "delta": entry["delta"], "per": "image (each latent released once)",
                    "neighbouring": NEIGHBOURING, "threat_model": THREAT_MODEL, "mechanism": entry["mechanism"]},
        "releases": device_releases,
        "versions": {p: version(p) for p in ("torch", "diffusers", "flwr", "cryptography", "dp-accounting")}
                    | {"python": platform.python_version()},
        "seeds": {"data": cfg.data.seed, "partition": fed.partition_seed if fed else None,
                  "condense": cfg.condense.seed, "student": cfg.student.seed},
        "federation_config": to_jsonable(fed),
    }


def write_ledger(out: Path, ledger: dict) -> None:
    (Path(out) / "privacy_ledger.json").write_text(json.dumps(ledger, indent=2, allow_nan=False))
