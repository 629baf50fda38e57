"""Screen guidance schedules on the single-machine pool (`demo --local`'s) or a federated run's pool:
paired seeds, one JSON + plot.

    python -m benchmarks.guidance_screen OUT_DIR [--device auto] [--data-dir DIR] [--pool RUN/pool] [--seeds 10]
        [--variants 0.025:0 0:0 0.025:10 ...] [--student-steps N] [--speed-images 1000] [--time-limit S]

A variant is `guidance:guidance_steps` (CondenseConfig; steps 0 = every step of the chain). Per seed s,
every variant condenses IPC 10 with condense seed + s and trains the default student with student seed
+ s; the random real subset of the same per-class counts is drawn once per seed (as `--eval-seeds`
pairs them). The JSON is rewritten after each seed, so a run cut short keeps what it measured.
`--speed-images N` then times condensing N images at each variant (the chain alone, warm models).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from server.condense import condense
from server.pipeline import (build_models, canonical_pool, chain_models, paired_lead, random_real_like,
                             server_teacher)
from server.pool import LatentPool
from server.pretrain import load_or_train_autoencoder
from server.student import fit_and_score, one_hot
from shared.config import DataConfig, DemoConfig
from shared.data import ImageSplit, load_dataset
from shared.device import device_name, gpu_peak_mb, keep_freed_memory, resolve_device, seed_everything


def federated_models(ds, cfg: DemoConfig, pool_dir: str, device) -> tuple[dict, ImageSplit, dict]:
    """The models and pool of a federated run (`demo`'s OUT/pool), as the run's server built them."""
    e1, dec, ae = load_or_train_autoencoder(ds.public.images, cfg.autoencoder, device)
    pool = canonical_pool(ImageSplit(*LatentPool(Path(pool_dir)).load()))
    models, chain = chain_models(e1, dec, pool, cfg, device)
    return models, pool, {"pretrain": ae["seconds"] + chain["seconds"]}


def parse_variant(text: str) -> tuple[float, int]:
    weight, _, steps = text.partition(":")
    return float(weight), int(steps or 0)


def screen_seed(ds, models, pool, cfg: DemoConfig, variants, s: int, device, teacher) -> dict:
    """One paired seed: every variant's synthetic student, and the random real subset's."""
    student = replace(cfg.student, seed=cfg.student.seed + s)
    row, syn = {"seed": s}, None
    for text in variants:
        weight, steps = parse_variant(text)
        ccfg = replace(cfg.condense, seed=cfg.condense.seed + s, guidance=weight, guidance_steps=steps)
        syn = condense(pool.images, pool.labels, pool.ids, ds.num_classes, models, cfg.chain, ccfg, device)
        row[text] = fit_and_score(syn.images, syn.labels, ds.test, student, device, loss=student.loss,
                                  desc=f"{text} seed {s}", teacher=teacher)["accuracy"]
    real = random_real_like(ds.private, syn, student.seed)
    row["random_real"] = fit_and_score(real.images, one_hot(real.labels, ds.num_classes), ds.test, student,
                                       device, loss=student.loss, desc=f"random real seed {s}",
                                       teacher=teacher)["accuracy"]
    return row


def speed(ds, models, pool, cfg: DemoConfig, variants, n: int, device) -> dict:
    """Seconds to condense n images at each variant (max over classes: n / num_classes per class)."""
    out = {}
    for text in variants:
        weight, steps = parse_variant(text)
        ccfg = replace(cfg.condense, ipc=n // ds.num_classes, guidance=weight, guidance_steps=steps)
        syn = condense(pool.images, pool.labels, pool.ids, ds.num_classes, models, cfg.chain, ccfg, device)
        out[text] = {"images": len(syn), "seconds": syn.meta["seconds"],
                     "images_per_s": len(syn) / syn.meta["seconds"]}
        print("speed", text, json.dumps(out[text]), flush=True)
    return out


def summarise(rows: list[dict], variants) -> dict:
    """Per variant: mean/std over seeds, paired lead over random real and over the first variant."""
    out = {}
    for text in variants:
        acc = {"synthetic": [r[text] for r in rows], "random_real": [r["random_real"] for r in rows]}
        vs_first = paired_lead({"synthetic": acc["synthetic"], "random_real": [r[variants[0]] for r in rows]})
        out[text] = {**paired_lead(acc), "vs_first": vs_first["lead"], "vs_first_se": vs_first["lead_se"]}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result["summary"]
    names = list(s)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.5))
    ax.errorbar(range(len(names)), [100 * s[n]["lead"] for n in names],
                yerr=[100 * s[n]["lead_se"] for n in names], fmt="o", capsize=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_xlabel("guidance per step : guided last steps (0 = all)")
    ax.set_ylabel("paired lead over random real (points)")
    ax.set_title(f"IPC {result['ipc']}, {len(result['rows'])} seeds, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--pool", default=None, help="a federated run's OUT/pool (default: encode locally)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=["0.025:0", "0:0", "0.025:10", "0.05:10", "0.1:5"])
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--speed-images", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=float("inf"), help="start no seed after this many s")
    a = p.parse_args(argv)
    keep_freed_memory()
    start = time.time()
    cfg = DemoConfig(data=DataConfig(data_dir=a.data_dir, train_limit=a.train_limit, test_limit=a.test_limit),
                     federation=None, device=a.device)
    cfg = replace(cfg, condense=replace(cfg.condense, ipc=a.ipc),
                  student=replace(cfg.student, steps=a.student_steps or cfg.student.steps))
    device = resolve_device(cfg.device)
    seed_everything(cfg.data.seed)
    ds = load_dataset(cfg.data)
    models, pool, info = build_models(ds, cfg, device) if a.pool is None else federated_models(ds, cfg, a.pool, device)
    teacher, tinfo = server_teacher(models, pool, ds, cfg.student, device, cfg.condense.guidance)
    models["teacher"] = teacher
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(device), "ipc": a.ipc, "variants": a.variants,
              "pretrain_seconds": info["pretrain"], "teacher": tinfo, "rows": [], "summary": {}}
    for s in range(a.seeds):
        if time.time() - start > a.time_limit:
            break
        result["rows"].append(screen_seed(ds, models, pool, cfg, a.variants, s, device, teacher))
        result["summary"] = summarise(result["rows"], a.variants)
        print(json.dumps(result["rows"][-1]), flush=True)
        (out / "guidance-screen.json").write_text(json.dumps(result, indent=1))
    if a.speed_images:
        result["speed"] = speed(ds, models, pool, cfg, a.variants, a.speed_images, device)
    result["seconds"] = time.time() - start
    result["gpu_peak_mb"] = gpu_peak_mb(device)
    (out / "guidance-screen.json").write_text(json.dumps(result, indent=1))
    if result["rows"]:
        plot(result, out / "guidance-screen.png")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
