"""`fedcondense bench --privacy-curve`: the released set's quality against the devices' epsilon (local DP).

For each epsilon and group size k, every simulated device (the demo's Dirichlet split) releases its records
chunk by chunk through the device's own mechanism (client/privacy.py: `release_records`, the function the
ClientApp runs), and the server condenses the pool as a federated run does (server/pipeline.py:
`released_pool`: chain trained on the public split, posterior-mean filter, guided chain, latent refinement).
Scored under the standard protocol (ConvNet-3 from scratch on the set alone, hard labels, DSA) beside:
- `released_real`: a random subset of equal per-class size of what the devices released, decoded: what
  the server would hold without condensing, under the same budget;
- at epsilon inf (no noise): the same pipeline on clean latents, and a random real subset (pixels);
- at epsilon 0 (`public_only`): the same pipeline on the server's public split alone, no device involved:
  what a released set must beat for the devices' data to have added anything.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.standard import machine_name, random_per_class
from client.encode import encode_images
from client.privacy import release_records
from server.condense.chain import refined, run_chains
from server.condense.pretrain import load_or_train_autoencoder, load_or_train_chain
from server.distill.evaluate import LabelledSet, evaluate_sets
from server.pipeline import committed_match, released_pool, server_teacher
from shared.accounting import calibrate
from shared.config import DemoConfig
from shared.data import ImageSplit, load_dataset
from shared.device import device_name, resolve_device
from shared.partition import partition
from shared.recipe import apply_recipe

PUBLISHED = {  # Fashion-MNIST; central DP unless said otherwise (each paper's table)
    "DP-SGD on the data, CNN, eps 3 (Tramer & Boneh, ICLR 2021)": 86.0,
    "DP-SGD on ScatterNet features, eps 3 (Tramer & Boneh, ICLR 2021)": 89.7,
}


@dataclass
class PrivacyCurveConfig:
    epsilons: tuple = (0.5, 1.0, 3.0, 8.0, 10.0)
    group_sizes: tuple = (1, 16)
    label_mechanism: str = "public"
    delta: float = 1e-5
    ipc: int = 10
    seeds: tuple = (0, 1)
    evaluators: int = 2
    epochs: int = 300
    clients: int = 10
    alpha: float = 0.5
    chunk_size: int = 2048
    demo: DemoConfig = field(default_factory=lambda: apply_recipe(DemoConfig(), "demo"))   # models and condensation
    budget_s: float = math.inf


def device_releases(ds, latents: torch.Tensor, release, cfg: PrivacyCurveConfig) -> ImageSplit:
    """What every device of the split releases, chunk by chunk, concatenated in device order."""
    parts = partition(ds.private.labels.numpy(), cfg.clients, iid=False, alpha=cfg.alpha, seed=0)
    zs, ys = [], []
    for rows in parts:
        rows = torch.as_tensor(rows, dtype=torch.long)
        for start in range(0, len(rows), cfg.chunk_size):
            chunk = rows[start:start + cfg.chunk_size]
            z, y = release_records(latents[chunk], ds.private.labels[chunk], release)
            zs.append(z.float())
            ys.append(y.long())
    z, y = torch.cat(zs), torch.cat(ys)
    return ImageSplit(z, y, torch.arange(len(y)))


def decoded(decoder, latents: torch.Tensor, dev) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([decoder(latents[i:i + 256].to(dev)).clamp(-1, 1).float().cpu()
                          for i in range(0, len(latents), 256)])


def condensed_sets(name: str, pool: ImageSplit, models: dict, k: int, demo: DemoConfig, cfg: PrivacyCurveConfig,
                   dev) -> tuple[list[LabelledSet], dict]:
    """The guided chain then the refinement, one set per seed (the seeds' sets refined in one loop)."""
    start = time.time()
    chains = [run_chains(pool.images, pool.labels, pool.ids, k, models, demo.chain,
                         replace(demo.condense, ipc=cfg.ipc, seed=s), dev) for s in cfg.seeds]
    sets = refined(chains, pool.images, pool.labels, k, models["decoder"],
                   replace(demo.condense, ipc=cfg.ipc, seed=cfg.seeds[0]), dev)
    out = [LabelledSet(f"{name}|s{s}", syn.images, syn.labels) for s, syn in zip(cfg.seeds, sets)]
    return out, {"seconds": time.time() - start, "released": len(pool)}


def released_subsets(name: str, released: ImageSplit, decoder, num_classes: int, cfg: PrivacyCurveConfig, dev
                     ) -> list[LabelledSet]:
    sets = []
    for s in cfg.seeds:
        idx = random_per_class(released.labels, cfg.ipc, s)
        sets.append(LabelledSet(f"{name}|s{s}", decoded(decoder, released.images[idx], dev),
                                torch.nn.functional.one_hot(released.labels[idx], num_classes).float()))
    return sets


def run_privacy_curve(cfg: PrivacyCurveConfig, out_dir: Path) -> Path:
    demo = cfg.demo
    dev = resolve_device(demo.device)
    ds = load_dataset(demo.data)
    e1, dec, _ = load_or_train_autoencoder(ds.public.images, demo.autoencoder, dev)
    clean = encode_images(e1, ds.private.images, device=dev)
    clip = float(encode_images(e1, ds.public.images[:2000], device=dev).flatten(1).norm(dim=1).median())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fmnist-privacy-curve-local-dp-{machine_name(dev)}.json"
    doc = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "protocol": "standard", "threat_model": "curious server "
           "(local DP on the device)", "recipe": demo.recipe, "device": device_name(dev), "machine": machine_name(dev),
           "config": json.loads(json.dumps(asdict(cfg), default=str)), "clip_norm": clip, "published": PUBLISHED,
           "points": [], "results": [], "skipped": []}
    start = time.time()
    ecfg = replace(demo.evaluation, evaluators=cfg.evaluators, epochs=cfg.epochs)

    def score(sets: list[LabelledSet], point: dict) -> None:
        result = evaluate_sets(sets, ds.test, ecfg, dev)
        for name, r in result["sets"].items():
            arm, seed = name.split("|")
            doc["results"].append({**point, "arm": arm, "seed": int(seed[1:]), **r})
        doc["elapsed_s"] = time.time() - start
        path.write_text(json.dumps(doc, indent=1))

    clean_pool = ImageSplit(clean, ds.private.labels, ds.private.ids)
    models, _ = chain_models_for(e1, dec, clean_pool, ds, demo, dev, committed=committed_match(e1, clean_pool, ds, False))
    sets, info = condensed_sets("ours", clean_pool, models, ds.num_classes, demo, cfg, dev)
    real = [LabelledSet(f"random_real|s{s}", ds.private.images[idx], torch.nn.functional.one_hot(
        ds.private.labels[idx], ds.num_classes).float()) for s in cfg.seeds for idx in [random_per_class(ds.private.labels, cfg.ipc, s)]]
    doc["points"].append({"epsilon": "inf", "group_size": 1, **info})
    score(sets + real, {"epsilon": "inf", "group_size": 1})
    public = ImageSplit(encode_images(e1, ds.public.images, device=dev), ds.public.labels, ds.public.ids)
    models, teacher = chain_models_for(e1, dec, public, ds, demo, dev)
    sets, info = condensed_sets("public_only", public, models, ds.num_classes, demo, cfg, dev)
    doc["points"].append({"epsilon": 0, "group_size": 0, **info, "teacher": teacher})
    score(sets, {"epsilon": 0, "group_size": 0})
    for eps in cfg.epsilons:
        for k in cfg.group_sizes:
            if time.time() - start > cfg.budget_s:
                doc["skipped"].append(f"epsilon {eps}, k {k}: budget spent")
                continue
            release = calibrate(eps, cfg.delta, label_mechanism=cfg.label_mechanism, clip_norm=clip, group_size=k)
            raw = device_releases(ds, clean, release, cfg)
            pool, chain_source, notes = released_pool(ds, e1, raw, release, dev)
            models, teacher = chain_models_for(e1, dec, pool, ds, demo, dev, chain_source=chain_source)
            sets, info = condensed_sets("ours", pool, models, ds.num_classes, demo, cfg, dev)
            point = {"epsilon": eps, "group_size": k}
            doc["points"].append({**point, **info, **notes, "epsilon_pld": release.epsilon("pld"),
                                  "noise_multiplier": release.noise_multiplier, "teacher": teacher})
            score(sets + released_subsets("released_real", raw, dec, ds.num_classes, cfg, dev), point)
    doc["complete"] = not doc["skipped"]
    path.write_text(json.dumps(doc, indent=1))
    return path


def chain_models_for(e1, dec, pool: ImageSplit, ds, demo: DemoConfig, dev, committed=None, chain_source=None
                     ) -> tuple[dict, dict]:
    """E1 / D, E2 + chain trained on `chain_source` (default: the pool), and the guidance teacher trained on
    the pool (with its test accuracy)."""
    e2, est, _ = load_or_train_chain((chain_source or pool).images, demo.chain, dev, committed)
    models = {"first_encoder": e1, "decoder": dec, "second_encoder": e2, "noise_estimators": est}
    teacher, info = server_teacher(models, pool, ds, demo.student, dev, demo.condense.guidance, committed,
                                   demo.protocol)
    models["teacher"] = teacher
    return models, info


def summary(doc: dict) -> list[dict]:
    """Mean and std (percent) per (epsilon, group size, arm) over seeds and evaluators."""
    rows: dict = {}
    for r in doc["results"]:
        rows.setdefault((str(r["epsilon"]), r["group_size"], r["arm"]), []).extend(r["accuracy"])
    out = []
    for (eps, k, arm), acc in rows.items():
        t = torch.tensor(acc, dtype=torch.float64)
        out.append({"epsilon": eps, "group_size": k, "arm": arm, "mean": 100 * float(t.mean()),
                    "std": 100 * float(t.std()) if len(t) > 1 else 0.0, "models": len(acc)})
    return out


ARM_NAMES = {"ours": "ours (chain + guidance + refinement)", "released_real": "released records, random subset",
             "random_real": "random real subset (no DP)", "public_only": "public split alone (no device data)"}


def markdown(doc: dict) -> str:
    """The curve as a table: one row per epsilon, one column per (group size, arm)."""
    rows = summary(doc)
    fixed = ("inf", "0")
    cols = sorted({(r["group_size"], r["arm"]) for r in rows if r["epsilon"] not in fixed})
    lines = [f"Standard protocol, IPC {doc['config']['ipc']}, {doc['config']['epochs']} epochs, labels "
             f"{doc['config']['label_mechanism']}, delta {doc['config']['delta']}; mean ± std over seeds x "
             f"evaluators ({doc['machine']}).", "",
             "| epsilon | " + " | ".join(f"k={k}: {ARM_NAMES.get(a, a)} %" for k, a in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for eps in [str(e) for e in doc["config"]["epsilons"]]:
        cell = {(r["group_size"], r["arm"]): f"{r['mean']:.2f} ± {r['std']:.2f}" for r in rows if r["epsilon"] == eps}
        if cell:
            lines.append(f"| {eps} | " + " | ".join(cell.get(c, "-") for c in cols) + " |")
    ref = {r["arm"]: f"{r['mean']:.2f} ± {r['std']:.2f}" for r in rows if r["epsilon"] in fixed}
    lines += ["", "References: " + ", ".join(f"{ARM_NAMES.get(a, a)} {v}" for a, v in ref.items())]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary(doc)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fixed = ("inf", "0")
    for k, arm in sorted({(r["group_size"], r["arm"]) for r in rows if r["epsilon"] not in fixed}):
        pts = sorted((float(r["epsilon"]), r["mean"], r["std"]) for r in rows
                     if r["epsilon"] not in fixed and r["group_size"] == k and r["arm"] == arm)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=f"{ARM_NAMES.get(arm, arm)}, k={k}")
    styles = {"random_real": ("grey", "--"), "ours": ("black", "--"), "public_only": ("tab:red", ":")}
    for r in rows:
        if r["epsilon"] in fixed:
            color, ls = styles.get(r["arm"], ("black", "-."))
            ax.axhline(r["mean"], ls=ls, lw=1, color=color, label=ARM_NAMES.get(r["arm"], r["arm"]) +
                       (", no DP" if r["epsilon"] == "inf" else ""))
    ax.set_xscale("log")
    ax.set_xlabel("per-record epsilon (delta 1e-5), local DP on the device")
    ax.set_ylabel("test accuracy % (ConvNet-3 on the set alone)")
    ax.set_title(f"Fashion-MNIST, IPC {doc['config']['ipc']}, labels {doc['config']['label_mechanism']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
