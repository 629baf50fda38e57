"""`fedcondense bench`: ours vs baselines side by side in one run.

Arms per IPC and seed, all evaluated by the same student recipe (ConvNet-3, same steps):
ours (default T, layout, selection, plus variants), random real subset, DM (benchmarks/dm.py), full
real. Costs in the same run: condensation wall time and peak RSS for ours vs DM at equal IPC; client
encode images/s on one core and uplink bytes per image; scaling of our condensation time with the
number of real latents and with T. Output: JSON + PNG plots; `fedcondense bench-table` renders the
README table from the JSON.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.dm import distribution_matching
from client.encode import encode_images
from server.condense.chain import condense
from server.pipeline import random_real_like, server_teacher
from server.condense.pretrain import load_or_train_autoencoder, load_or_train_chain
from server.distill.student import fit_and_score, one_hot
from shared.config import AutoencoderConfig, ChainConfig, CondenseConfig, DataConfig, StudentConfig
from shared.data import ImageSplit, load_dataset
from shared.device import device_name, gpu_peak_mb, resolve_device
from shared.sealing import encode_payload, raw_public, seal


ARMS = ("ours", "ours_t10", "ours_random", "ours_one_to_one", "ours_cluster", "ours_shared", "random_real", "dm",
        "full_real")


@dataclass
class BenchConfig:
    ipcs: tuple = (1, 10, 50)
    seeds: tuple = (0, 1, 2)
    arms: tuple = ARMS
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    dm_iterations: int = 200
    full_steps: int = 400
    scaling_sizes: tuple = (1000, 5000, 20000, 0)     # 0 = all
    scaling_T: tuple = ()                             # extra T values to train chains for (costly on CPU)
    speed_images: int = 1000                          # the time-vs-T curve condenses this many (1,000 at T=20)
    device: str = "auto"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled from /proc every 5 ms (MB); on CUDA also
    the peak of torch's GPU allocations (`gpu_mb`)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def __enter__(self):
        self.gpu_base = gpu_peak_mb(self.device, reset=True)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mb = self.peak - self.base
        self.gpu_mb = gpu_peak_mb(self.device) - self.gpu_base


OURS_SELECTION = {"ours_random": "random", "ours_one_to_one": "one-to-one", "ours_cluster": "cluster"}   # else the default


def make_set(arm, ipc, seed, ctx) -> dict:
    """Returns images, (soft) labels, condensation seconds and peak MB for one arm."""
    ds, pool, cfg, dev = ctx["ds"], ctx["pool"], ctx["cfg"], ctx["device"]
    if arm.startswith("ours"):
        models, chain_cfg = ctx["models"][arm]
        ccfg = replace(CondenseConfig(), ipc=ipc, seed=seed, selection=OURS_SELECTION.get(arm, CondenseConfig.selection))
        with PeakRSS(dev) as mem:
            syn = condense(pool.images, pool.labels, pool.ids, ds.num_classes, models, chain_cfg, ccfg, dev)
        return {"images": syn.images, "labels": syn.labels, "seconds": syn.meta["seconds"], "peak_mb": mem.mb,
                "peak_gpu_mb": mem.gpu_mb}
    if arm == "dm":
        with PeakRSS(dev) as mem:
            out = distribution_matching(ds.private.images, ds.private.labels, [(ipc, seed)], cfg.dm_iterations, dev)
        made = out[(ipc, seed)]
        return {"images": made["images"], "labels": one_hot(made["labels"], ds.num_classes), "seconds": out["seconds"],
                "peak_mb": mem.mb, "peak_gpu_mb": mem.gpu_mb}
    if arm == "random_real":
        ref = ctx["reference_counts"][ipc]
        real = random_real_like(ds.private, ref, seed)
        return {"images": real.images, "labels": one_hot(real.labels, ds.num_classes), "seconds": 0.0, "peak_mb": 0.0,
                "peak_gpu_mb": 0.0}
    raise KeyError(arm)


def client_costs(e1, ds) -> dict:
    torch.set_num_threads(1)
    x = ds.private.images[:4096]
    start = time.time()
    z = encode_images(copy.deepcopy(e1).cpu(), x)     # a copy: the server's E1 stays on its device
    rate = len(x) / (time.time() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    key = __import__("cryptography.hazmat.primitives.asymmetric.x25519", fromlist=["X"]).X25519PrivateKey.generate()
    env = seal(encode_payload(z[:2048], ds.private.labels[:2048]), raw_public(key.public_key()), "bench", 1, 0, 0, 1)
    return {"encode_images_per_s_1_core": rate, "uplink_bytes_per_image": len(env["ciphertext"]) / 2048,
            "raw_bytes_per_image": ds.raw_bytes_per_image}


def scaling_sizes(sizes, pool_size: int) -> list[int]:
    """The pool sizes of the scaling curve: 0 means the whole pool; sizes beyond the pool (a run with
    --train-limit) are cut to it, and repeats dropped."""
    return sorted({min(n or pool_size, pool_size) for n in sizes})


def scaling(ctx) -> dict:
    ds, pool, dev = ctx["ds"], ctx["pool"], ctx["device"]
    models, chain_cfg = ctx["models"]["ours"]
    rows = []
    ccfg = CondenseConfig(ipc=None, max_coverage=True, selection="one-to-one", seed=0)
    for n in scaling_sizes(ctx["cfg"].scaling_sizes, len(pool)):
        part = pool.subset(torch.arange(n))
        syn = condense(part.images, part.labels, part.ids, ds.num_classes, models, chain_cfg, ccfg, dev)
        rows.append({"real_latents": n, "synthetic_images": len(syn), "seconds": syn.meta["seconds"],
                     "images_per_s": len(syn) / syn.meta["seconds"]})
    by_T, chains = [], dict(ctx.get("models_by_T", {}))
    for arm in ("ours", "ours_t10"):                   # chains trained anyway join the time-vs-T curve
        if arm in ctx["models"]:
            chains.setdefault(ctx["models"][arm][1].T, ctx["models"][arm])
    speed = CondenseConfig(ipc=max(1, ctx["cfg"].speed_images // ds.num_classes))
    for T, (models_T, cfg_T) in sorted(chains.items()):
        syn = condense(pool.images, pool.labels, pool.ids, ds.num_classes, models_T, cfg_T, speed, dev)
        by_T.append({"T": T, "synthetic_images": len(syn), "seconds": syn.meta["seconds"]})
    return {"vs_real_latents": rows, "vs_T": by_T}


def prepare(cfg: BenchConfig) -> dict:
    dev = resolve_device(cfg.device)
    ds = load_dataset(cfg.data)
    e1, dec, ae_info = load_or_train_autoencoder(ds.public.images, cfg.autoencoder, dev)
    pool = ImageSplit(encode_images(e1, ds.private.images, device=dev), ds.private.labels, ds.private.ids)
    models, pretrain = {}, {"autoencoder_s": ae_info["seconds"]}
    bundle = lambda e2, est: {"first_encoder": e1, "decoder": dec, "second_encoder": e2, "noise_estimators": est}
    variants = [(arm, cfg.chain) for arm in ("ours", *OURS_SELECTION)]          # same chain, other rules
    variants += [("ours_shared", replace(cfg.chain, layout="shared")), ("ours_t10", replace(cfg.chain, T=10))]
    for arm, chain_cfg in variants:
        if arm in cfg.arms or arm == "ours":
            e2, est, info = load_or_train_chain(pool.images, chain_cfg, dev)
            pretrain.setdefault(f"chain_T{chain_cfg.T}_{chain_cfg.layout}_s", info["seconds"])   # the first load trains
            models[arm] = (bundle(e2, est), chain_cfg)
    by_T = {}
    for T in cfg.scaling_T:
        cT = replace(cfg.chain, T=T)
        e2, est, info = load_or_train_chain(pool.images, cT, dev)
        pretrain[f"chain_T{T}_{cT.layout}_s"] = info["seconds"]
        by_T[T] = (bundle(e2, est), cT)
    # the same student recipe for every arm, the demo's teacher included
    teacher, teacher_info = server_teacher(models["ours"][0], pool, ds, cfg.student, dev, CondenseConfig().guidance)
    for bundle, _ in (*models.values(), *by_T.values()):      # every chain samples under the same guidance
        bundle["teacher"] = teacher
    return {"ds": ds, "pool": pool, "cfg": cfg, "device": dev, "models": models, "models_by_T": by_T, "e1": e1,
            "teacher": teacher, "teacher_info": teacher_info, "pretrain": pretrain}


def run_bench(cfg: BenchConfig, out_dir: Path) -> Path:
    """Runs every arm; the JSON is rewritten after each result ('complete': false until the end), so a
    run cut short keeps what it measured."""
    unknown = set(cfg.arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown bench arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    ctx = prepare(cfg)
    ds, dev = ctx["ds"], ctx["device"]
    results = []
    doc = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_name(dev), "device": device_name(dev),
           "config": json.loads(json.dumps(asdict(cfg), default=str)), "results": results, "summary": [],
           "client": client_costs(ctx["e1"], ds), "scaling": scaling(ctx), "teacher": ctx["teacher_info"],
           "pretrain_seconds": ctx["pretrain"], "student_loss": cfg.student.loss, "complete": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y-%m-%d')}-{doc['machine']}.json"

    def record(row: dict) -> None:
        results.append(row)
        doc["summary"] = summarise(results)
        path.write_text(json.dumps(doc, indent=2))

    for ipc in cfg.ipcs:
        ctx.setdefault("reference_counts", {})
        ref = condense(ctx["pool"].images, ctx["pool"].labels, ctx["pool"].ids, ds.num_classes, *ctx["models"]["ours"],
                       CondenseConfig(ipc=ipc), dev)
        ctx["reference_counts"][ipc] = ref
        for arm in [a for a in cfg.arms if a != "full_real"]:
            for seed in cfg.seeds:
                made = make_set(arm, ipc, seed, ctx)
                score = fit_and_score(made["images"], made["labels"], ds.test, replace(cfg.student, seed=seed), dev,
                                      loss=cfg.student.loss, desc=f"{arm} ipc{ipc} s{seed}", teacher=ctx["teacher"])
                record({"arm": arm, "ipc": ipc, "seed": seed, "accuracy": score["accuracy"],
                        "condense_seconds": made["seconds"], "condense_peak_mb": made["peak_mb"],
                        "condense_peak_gpu_mb": made["peak_gpu_mb"], "images": len(made["images"])})
    if "full_real" in cfg.arms:
        for seed in cfg.seeds:
            score = fit_and_score(ds.private.images, one_hot(ds.private.labels, ds.num_classes), ds.test,
                                  replace(cfg.student, seed=seed), dev, steps=cfg.full_steps, loss=cfg.student.loss,
                                  desc=f"full s{seed}", teacher=ctx["teacher"])
            record({"arm": "full_real", "ipc": None, "seed": seed, "accuracy": score["accuracy"],
                    "images": len(ds.private)})
    doc["complete"] = True
    path.write_text(json.dumps(doc, indent=2))
    plot(doc, path.with_suffix(""))
    return path


def machine_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).replace(" ", "-")
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def summarise(results: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in results:
        groups.setdefault((r["arm"], r["ipc"]), []).append(r)
    rows = []
    for (arm, ipc), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        secs = [r.get("condense_seconds", 0.0) or 0.0 for r in rs]
        rows.append({"arm": arm, "ipc": ipc, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": len(accs),
                     "condense_seconds": statistics.mean(secs),
                     "condense_peak_mb": max((r.get("condense_peak_mb") or 0.0) for r in rs),
                     "condense_peak_gpu_mb": max((r.get("condense_peak_gpu_mb") or 0.0) for r in rs)})
    return rows


def plot(doc: dict, stem: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    arms = sorted({r["arm"] for r in doc["summary"] if r["ipc"] is not None})
    for arm in arms:
        rows = sorted((r for r in doc["summary"] if r["arm"] == arm), key=lambda r: r["ipc"])
        axes[0].errorbar([r["ipc"] for r in rows], [r["mean"] for r in rows], [r["std"] for r in rows], marker="o", label=arm)
        if any(r["condense_seconds"] for r in rows):
            axes[1].plot([r["ipc"] for r in rows], [r["condense_seconds"] for r in rows], marker="o", label=arm)
    axes[0].set(xscale="log", xlabel="images per class", ylabel="test accuracy", title="Accuracy")
    axes[1].set(xscale="log", yscale="log", xlabel="images per class", ylabel="seconds", title="Condensation time")
    sc = doc["scaling"]["vs_real_latents"]
    axes[2].plot([r["real_latents"] for r in sc], [r["seconds"] for r in sc], marker="o")
    axes[2].set(xscale="log", yscale="log", xlabel="real latents (max coverage)", ylabel="seconds", title="Scaling")
    by_T = doc["scaling"].get("vs_T", [])
    axes[3].plot([r["T"] for r in by_T], [r["seconds"] for r in by_T], marker="o")
    images = f"{by_T[0]['synthetic_images']:,}" if by_T else "the"
    axes[3].set(xlabel="T (real images per synthetic image)", ylabel=f"seconds for {images} images", title="Time vs T")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)


COMPARABLE = ("student", "data", "autoencoder", "chain", "dm_iterations", "full_steps")


def merge_runs(docs: list[dict]) -> dict:
    """Several runs of one machine and one recipe as one document: results pooled (a later run's row
    replaces an earlier one for the same arm, IPC and seed) and summarised again. Client, scaling,
    teacher and pretraining figures come from the first run. Raises on runs that are not comparable."""
    first = docs[0]
    for doc in docs[1:]:
        if doc["machine"] != first["machine"]:
            raise ValueError(f"cannot merge runs of different machines: {first['machine']} vs {doc['machine']}")
        for key in COMPARABLE:
            if doc["config"][key] != first["config"][key]:
                raise ValueError(f"cannot merge runs with different '{key}' settings: the rows would not be comparable")
    rows = {}
    for doc in docs:
        for r in doc["results"]:
            rows[(r["arm"], r["ipc"], r["seed"])] = {**r, "source": doc.get("source", doc["created"])}
    merged = copy.deepcopy(first)
    merged.pop("source", None)                         # the merged document lists every run in 'sources'
    merged["results"] = list(rows.values())
    merged["summary"] = summarise(merged["results"])
    merged["created"] = " + ".join(d["created"] for d in docs)
    merged["sources"] = [d.get("source", d["created"]) for d in docs]
    merged["config"]["ipcs"] = sorted({i for d in docs for i in d["config"]["ipcs"]})
    merged["config"]["arms"] = [a for a in ARMS if any(a in d["config"]["arms"] for d in docs)]
    merged["config"]["seeds"] = sorted({s for d in docs for s in d["config"]["seeds"]})
    merged["complete"] = not missing_cells(merged)
    return merged


def missing_cells(doc: dict) -> list[str]:
    """The cells of the configured grid (arm x IPC; full_real once) that have fewer rows than seeds."""
    cfg, have = doc["config"], {}
    for r in doc["results"]:
        have[(r["arm"], r["ipc"])] = have.get((r["arm"], r["ipc"]), 0) + 1
    grid = [(a, None) if a == "full_real" else (a, i) for a in cfg["arms"] for i in
            ([None] if a == "full_real" else cfg["ipcs"])]
    seeds = len(cfg["seeds"])
    return [f"{a}{f' IPC {i}' if i else ''} ({have.get((a, i), 0)}/{seeds} seeds)"
            for a, i in grid if have.get((a, i), 0) < seeds]


def markdown_table(doc: dict) -> str:
    missing = missing_cells(doc)
    cut = f" **Not run (CPU time): {'; '.join(missing)}.**" if missing else ""
    lines = [f"Machine: {doc['device']}, {doc['created']}; ConvNet-3 evaluator, {doc['config']['student']['steps']} steps, "
             f"seeds {doc['config']['seeds']}. Generated by `fedcondense bench-table` from the JSON"
             f"{' (merged runs: ' + ', '.join(doc['sources']) + ')' if doc.get('sources') else ''}.{cut}", "",
             "| arm | IPC | accuracy (mean ± std) | condense s | peak RSS above start, MB | peak GPU MB |",
             "|---|---|---|---|---|---|"]
    for r in sorted(doc["summary"], key=lambda r: (r["ipc"] or 10**9, r["arm"])):
        gpu = f"{r.get('condense_peak_gpu_mb', 0.0):.0f}" if "cuda" in doc["device"] else "-"
        lines.append(f"| {r['arm']} | {r['ipc'] if r['ipc'] is not None else 'all'} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} "
                     f"| {r['condense_seconds']:.1f} | {r['condense_peak_mb']:.0f} | {gpu} |")
    lines += [""] + [headline(doc, ipc) for ipc in sorted({r["ipc"] for r in doc["summary"] if r["ipc"]})
                     if headline(doc, ipc)]
    c = doc["client"]
    lines += ["", f"Client: {c['encode_images_per_s_1_core']:.0f} images/s on 1 core; uplink "
                  f"{c['uplink_bytes_per_image']:.0f} B/image vs {c['raw_bytes_per_image']} B raw."]
    return "\n".join(lines) + "\n"


def headline(doc: dict, ipc: int) -> str:
    """'ours vs DM' at one IPC from the same run: accuracy gap and condensation-time ratio."""
    rows = {r["arm"]: r for r in doc["summary"] if r["ipc"] == ipc}
    if "ours" not in rows or "dm" not in rows:
        return ""
    ours, dm = rows["ours"], rows["dm"]
    ratio = dm["condense_seconds"] / max(ours["condense_seconds"], 1e-9)
    return (f"IPC {ipc}: ours {100 * ours['mean']:.2f} % vs DM {100 * dm['mean']:.2f} % "
            f"({100 * (ours['mean'] - dm['mean']):+.2f} points); DM/ours condensation time {ratio:.1f}x.")


def update_readme(doc: dict, readme: Path) -> None:
    text = readme.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text:
        raise ValueError(f"{readme} has no '{start}' marker")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + markdown_table(doc) + end + tail)
