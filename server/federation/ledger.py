"""Privacy ledger of a run (docs/privacy.md): the per-record guarantee, every field that left a device
with how it is covered, each device's release, versions and seeds."""
from __future__ import annotations

import math
import platform
from importlib.metadata import version
from pathlib import Path

from shared.accounting import ImageRelease
from shared.cache import to_jsonable
from shared.config import DemoConfig
from shared.durable import write_json
from shared.release import ledger_table
from shared.sealing import CIPHER

THREAT_MODEL = ("curious server that sees every released latent and label and every value it sends or receives; "
                "network attackers see only AES-GCM ciphertexts. The devices draw their noise from the OS's "
                "CSPRNG, so nothing the server knows regenerates it. Downstream training, condensation and "
                "students are post-processing of the released records and spend no further privacy.")
NOT_RELEASED = ("pixels; encode timings; memory use: they stay in the device's own log. The per-device record count "
                "n is released (chunk count, ciphertext length): under the replace-one relation neighbouring "
                "datasets have the same size, so n is public by definition of the guarantee.")


def guarantee(release: ImageRelease) -> dict:
    if not release.private:
        return {"mechanism": "none", "epsilon": "inf", "delta": 0.0, "neighbouring": release.neighbouring,
                "covers": "nothing", "labels_public": True,
                "note": "NO DIFFERENTIAL PRIVACY: latents and labels left the devices without noise"}
    entry = release.ledger_entry()
    if release.label_mechanism == "public":
        entry["covers"] = "the latent only"
        entry["labels_public"] = True
        entry["note"] = ("**LABELS ARE PUBLIC: they left the devices in the clear. The epsilon covers the latent "
                         "only, against neighbours that replace an image by another of the same label.**")
    else:
        entry["covers"] = "the (latent, label) pair of each record"
        entry["labels_public"] = False
    return entry


def build_ledger(cfg: DemoConfig, federation: dict, latent_shape: list[int], release: ImageRelease) -> dict:
    entry = guarantee(release)
    accepted = set(federation.get("accepted_nodes", []))
    resumed = set(federation.get("resumed_nodes", []))
    device_releases = [{"node_id": int(node), "accepted": int(node) in accepted,
                        "committed_by_an_earlier_run": int(node) in resumed, "released_latents": st.get("latents"),
                        "chunks": st.get("chunks"), "shape": [st.get("latents"), *latent_shape], "dtype": "float16",
                        "ciphertext_bytes": st.get("ciphertext_bytes"), "cipher": CIPHER,
                        "as_the_device_reported": st.get("mechanism")}
                       for node, st in (federation.get("clients") or {}).items()]
    summary = {k: entry.get(k) for k in ("epsilon", "delta", "mechanism", "neighbouring", "covers", "labels_public")}
    per = ("record (image and its label), each released once" if release.group_size == 1 else
           f"record (image and its label); each record joins at most one released mean of {release.group_size} "
           f"same-label latents, formed within one chunk; records left over are not released")
    summary.update(per=per, group_size=release.group_size, threat_model=THREAT_MODEL, note=entry.get("note"))
    return {
        "summary": summary, "guarantee": entry, "fields_leaving_a_device": ledger_table(),
        "not_released": NOT_RELEASED, "encoder_sha256": federation.get("encoder_sha256"),
        "refusals": federation.get("refusals", {}), "releases": device_releases,
        "versions": {p: version(p) for p in ("torch", "diffusers", "flwr", "cryptography", "dp-accounting")}
                    | {"python": platform.python_version()},
        "seeds": {"data": cfg.data.seed, "partition": cfg.federation.partition_seed if cfg.federation else None,
                  "condense": cfg.condense.seed, "student": cfg.student.seed, "device_noise": "os.urandom (unseeded)"},
        "federation_config": to_jsonable(cfg.federation),
    }


def _finite(obj):
    """JSON without NaN/inf: infinite numbers as the string 'inf'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_ledger(out: Path, ledger: dict) -> None:
    write_json(Path(out) / "privacy_ledger.json", _finite(ledger), indent=2, allow_nan=False)
