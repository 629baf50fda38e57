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
The central curve (`--threat-model central`) runs, at each epsilon, beside ours: DP-MERF (benchmarks/dp_merf.py),
a one-release synthetic-data method, sampled at the same images per class; and DP-SGD on the private images
(benchmarks/dp_sgd.py), a model rather than a set, scored on the same test images.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.dp_merf import DPMERFConfig, dp_merf_sets
from benchmarks.dp_sgd import DPSGDConfig, train_dp_sgd
from benchmarks.standard import machine_name, random_per_class
from client.encode import encode_images
from client.privacy import release_records
from server.condense.chain import decode_latents, refined, refined_to_private_means, run_chains
from server.condense.private_target import (CENTRAL_NEIGHBOURING, EmbeddingBank, class_sums, clip_norm_from_public,
                                            release_class_means)
from server.condense.pretrain import load_or_train_autoencoder, load_or_train_chain
from server.distill.evaluate import LabelledSet, evaluate_sets
from server.distill.student import fit_and_score
from server.distill.teacher import load_or_train_teacher
from server.pipeline import committed_match, released_pool, server_teacher
from shared.accounting import ImageRelease, calibrate, noise_for_epsilon
from shared.config import DemoConfig
from shared.data import ImageSplit, load_dataset
from shared.device import device_name, resolve_device
from shared.partition import partition
from shared.recipe import apply_recipe

PUBLISHED = {  # Fashion-MNIST; central DP unless said otherwise (each paper's table)
    "DP-SGD on the data, CNN, eps 3 (Tramer & Boneh, ICLR 2021)": 86.0,
    "DP-SGD on ScatterNet features, eps 3 (Tramer & Boneh, ICLR 2021)": 89.7,
}
CENTRAL_ARMS = ("ours", "dp_merf", "dp_sgd")
KD_SUFFIX = "_kd"                        # result arms scored by the teacher-KD student rather than the standard protocol


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
    threat_model: str = "local"          # 'local': curious server, DP on the device | 'central': trusted server
    central_arms: tuple = CENTRAL_ARMS   # central: which of ours and the DP baselines run at each epsilon
    dp_merf: DPMERFConfig = DPMERFConfig()
    dp_sgd: DPSGDConfig = DPSGDConfig()
    dp_sgd_seeds: tuple = (0,)           # ~10 min per model on 2 CPU cores at the published 40 epochs
    teacher_kd: bool = False             # central: also score each set by the teacher-KD student (the public teacher)
    unnoised: bool = True                # central: also fit the set to the un-noised statistic (a reference, no guarantee)


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
        sets.append(LabelledSet(f"{name}|s{s}", decode_latents(decoder, released.images[idx], dev),
                                torch.nn.functional.one_hot(released.labels[idx], num_classes).float()))
    return sets


class CurveRun:
    """What both curves share: data, E1 / D, the clean private latents, the result file and the scorer."""

    def __init__(self, cfg: PrivacyCurveConfig, out_dir: Path, kind: str, threat_model: str):
        demo = cfg.demo
        self.cfg, self.demo = cfg, demo
        self.dev = dev = resolve_device(demo.device)
        self.ds = ds = load_dataset(demo.data)
        self.e1, self.dec, _ = load_or_train_autoencoder(ds.public.images, demo.autoencoder, dev)
        self.clean = encode_images(self.e1, ds.private.images, device=dev)
        self.public = ImageSplit(encode_images(self.e1, ds.public.images, device=dev), ds.public.labels, ds.public.ids)
        out_dir.mkdir(parents=True, exist_ok=True)
        ipc = "" if cfg.ipc == PrivacyCurveConfig.ipc else f"-ipc{cfg.ipc}"
        self.path = out_dir / f"fmnist-privacy-curve-{kind}{ipc}-{machine_name(dev)}.json"
        self.doc = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "protocol": "standard", "threat_model": threat_model,
                    "recipe": demo.recipe, "device": device_name(dev), "machine": machine_name(dev),
                    "config": json.loads(json.dumps(asdict(cfg), default=str)), "published": PUBLISHED,
                    "points": [], "results": [], "skipped": []}
        self.start = time.time()
        self.ecfg = replace(demo.evaluation, evaluators=cfg.evaluators, epochs=cfg.epochs)
        self.kd_teacher = None                                     # set once a public teacher exists (central)

    def score(self, sets: list[LabelledSet], point: dict) -> None:
        result = evaluate_sets(sets, self.ds.test, self.ecfg, self.dev)
        for name, r in result["sets"].items():
            arm, seed = name.split("|")
            self.doc["results"].append({**point, "arm": arm, "seed": int(seed[1:]), **r})
        self.save()
        if self.kd_teacher is not None:
            self.score_teacher_kd(sets, point)

    def score_teacher_kd(self, sets: list[LabelledSet], point: dict) -> None:
        """The teacher-KD protocol on each set: the recipe's student distils from `kd_teacher` (trained on the
        public split only, so the guarantee of a released set carries over) and is scored on the test set."""
        student = self.demo.student
        for st in sets:
            arm, seed = st.name.split("|")
            r = fit_and_score(st.images, st.labels, self.ds.test, student, self.dev, loss=student.loss,
                              desc=f"teacher-KD student {st.name}", teacher=self.kd_teacher)
            self.doc["results"].append({**point, "arm": arm + KD_SUFFIX, "seed": int(seed[1:]), "protocol": "teacher-kd",
                                        "accuracy": [r["accuracy"]], "mean": r["accuracy"], "std": 0.0,
                                        "steps": r["steps"], "loss": student.loss, "seconds": r["seconds"]})
            self.save()

    def save(self, complete: bool = False) -> Path:
        self.doc["elapsed_s"] = time.time() - self.start
        if complete:
            self.doc["complete"] = not self.doc["skipped"]
        self.path.write_text(json.dumps(self.doc, indent=1))
        return self.path

    def over_budget(self, what: str) -> bool:
        if time.time() - self.start > self.cfg.budget_s:
            self.doc["skipped"].append(f"{what}: budget spent")
            return True
        return False

    def random_real(self) -> list[LabelledSet]:
        ds = self.ds
        return [LabelledSet(f"random_real|s{s}", ds.private.images[idx], torch.nn.functional.one_hot(
            ds.private.labels[idx], ds.num_classes).float()) for s in self.cfg.seeds
            for idx in [random_per_class(ds.private.labels, self.cfg.ipc, s)]]

    def public_only(self) -> tuple[dict, list]:
        """The chain and teacher trained on the public split, its unrefined chain sets, and the public-only arm
        (those sets refined against the public split): what a release must beat for the devices to matter."""
        demo, cfg, dev = self.demo, self.cfg, self.dev
        models, teacher = chain_models_for(self.e1, self.dec, self.public, self.ds, demo, dev)
        start = time.time()
        chains = [run_chains(self.public.images, self.public.labels, self.public.ids, self.ds.num_classes, models,
                             demo.chain, replace(demo.condense, ipc=cfg.ipc, seed=s), dev) for s in cfg.seeds]
        sets = refined(chains, self.public.images, self.public.labels, self.ds.num_classes, models["decoder"],
                       replace(demo.condense, ipc=cfg.ipc, seed=cfg.seeds[0]), dev)
        self.doc["points"].append({"epsilon": 0, "group_size": 0, "seconds": time.time() - start,
                                   "released": len(self.public), "teacher": teacher})
        self.public_sets = [LabelledSet(f"public_only|s{s}", syn.images, syn.labels) for s, syn in zip(cfg.seeds, sets)]
        self.score(self.public_sets, {"epsilon": 0, "group_size": 0})
        return models, chains


def run_privacy_curve(cfg: PrivacyCurveConfig, out_dir: Path) -> Path:
    if cfg.threat_model == "central":
        return run_central_curve(cfg, out_dir)
    if cfg.threat_model != "local":
        raise ValueError(f"unknown threat model '{cfg.threat_model}'; use 'local' (curious server) or 'central'")
    run = CurveRun(cfg, out_dir, "local-dp", "curious server (local DP on the device)")
    demo, ds, dev, e1, dec, clean = run.demo, run.ds, run.dev, run.e1, run.dec, run.clean
    clip = float(run.public.images[:2000].flatten(1).norm(dim=1).median())
    run.doc["clip_norm"] = clip
    clean_pool = ImageSplit(clean, ds.private.labels, ds.private.ids)
    models, _ = chain_models_for(e1, dec, clean_pool, ds, demo, dev, committed=committed_match(e1, clean_pool, ds, False))
    sets, info = condensed_sets("ours", clean_pool, models, ds.num_classes, demo, cfg, dev)
    run.doc["points"].append({"epsilon": "inf", "group_size": 1, **info})
    run.score(sets + run.random_real(), {"epsilon": "inf", "group_size": 1})
    run.public_only()
    for eps in cfg.epsilons:
        for k in cfg.group_sizes:
            if run.over_budget(f"epsilon {eps}, k {k}"):
                continue
            release = calibrate(eps, cfg.delta, label_mechanism=cfg.label_mechanism, clip_norm=clip, group_size=k)
            raw = device_releases(ds, clean, release, cfg)
            pool, chain_source, notes = released_pool(ds, e1, raw, release, dev)
            models, teacher = chain_models_for(e1, dec, pool, ds, demo, dev, chain_source=chain_source)
            sets, info = condensed_sets("ours", pool, models, ds.num_classes, demo, cfg, dev)
            point = {"epsilon": eps, "group_size": k}
            run.doc["points"].append({**point, **info, **notes, "epsilon_pld": release.epsilon("pld"),
                                      "noise_multiplier": release.noise_multiplier, "teacher": teacher})
            run.score(sets + released_subsets("released_real", raw, dec, ds.num_classes, cfg, dev), point)
    return run.save(complete=True)


def run_central_curve(cfg: PrivacyCurveConfig, out_dir: Path) -> Path:
    """Trusted server, untrusted consumers (server/condense/private_target.py): per epsilon, the public chain's
    sets fitted to one Gaussian release of the private class-mean embeddings; beside them the same fit to the
    un-noised statistic (epsilon inf, no guarantee), the public split alone, a random real subset, and the
    DP baselines of `cfg.central_arms`."""
    unknown = set(cfg.central_arms) - set(CENTRAL_ARMS)
    if unknown:
        raise ValueError(f"unknown central arm(s) {sorted(unknown)}; choose from {' '.join(CENTRAL_ARMS)}")
    kind = "central-dp" + ("" if set(cfg.central_arms) == set(CENTRAL_ARMS) else
                           "-" + "-".join(a.replace("_", "") for a in cfg.central_arms))
    run = CurveRun(cfg, out_dir, kind, "trusted server, untrusted consumers (central DP on the server)")
    if "ours" in cfg.central_arms:
        central_release_arm(run)
    run.score(run.random_real(), {"epsilon": "inf", "group_size": 0})
    for eps in cfg.epsilons:
        if "dp_merf" in cfg.central_arms and not run.over_budget(f"DP-MERF epsilon {eps}"):
            dp_merf_arm(run, eps)
        if "dp_sgd" in cfg.central_arms and not run.over_budget(f"DP-SGD epsilon {eps}"):
            dp_sgd_arm(run, eps)
    return run.save(complete=True)


def central_release_arm(run: CurveRun) -> None:
    """Ours: the public split alone, then per epsilon (and inf, unless `cfg.unnoised` is off) the chain's sets
    fitted to the release."""
    cfg, demo, ds, dev = run.cfg, run.demo, run.ds, run.dev
    models, chains = run.public_only()
    if cfg.teacher_kd:                                       # the public teacher; public_only's sets get scored now
        run.kd_teacher = models["teacher"] or load_or_train_teacher(
            models, run.public.images, run.public.labels, ds.num_classes, dev, demo.student.teacher_steps)[0]
        run.score_teacher_kd(run.public_sets, {"epsilon": 0, "group_size": 0})
    central = demo.central                                   # the release's networks and the fit's iterations
    bank = EmbeddingBank(central.nets, central.width, demo.data.seed)
    nets = bank.build(ds.public.images.shape[1], ds.public.images.shape[-1], dev)
    clip = clip_norm_from_public(nets, decode_latents(run.dec, run.public.images, dev), dev)
    stat = class_sums(run.dec, run.clean, ds.private.labels, ds.num_classes, nets, clip, dev)
    run.doc.update(clip_norm=clip, neighbouring=CENTRAL_NEIGHBOURING, class_sums_seconds=stat.seconds)
    ccfg = replace(demo.condense, ipc=cfg.ipc, seed=cfg.seeds[0])
    for eps in ("inf", *cfg.epsilons) if cfg.unnoised else cfg.epsilons:
        if run.over_budget(f"epsilon {eps}"):
            continue
        sigma = 0.0 if eps == "inf" else noise_for_epsilon(eps, cfg.delta)
        start = time.time()
        target = release_class_means(stat, sigma)
        sets = refined_to_private_means(chains, run.dec, target, nets, ccfg, dev, central.iterations)
        point = {"epsilon": eps, "group_size": 0}
        run.doc["points"].append({**point, "noise_multiplier": sigma, "noise_std": target.noise_std,
                                  "seconds": time.time() - start, "released": target.meta,
                                  "noised_counts": target.counts.tolist(),
                                  "epsilon_pld": None if eps == "inf" else
                                  ImageRelease(clip, sigma, cfg.delta, "public").epsilon("pld")})
        run.score([LabelledSet(f"central|s{s}", syn.images, syn.labels) for s, syn in zip(cfg.seeds, sets)], point)


def dp_merf_arm(run: CurveRun, eps: float) -> None:
    """DP-MERF on the private pixels at `eps` (the same exact Gaussian calibration as ours), `ipc` samples per
    class per seed, scored like every set."""
    cfg, ds = run.cfg, run.ds
    sigma = noise_for_epsilon(eps, cfg.delta)
    sets, info = dp_merf_sets(ds.private, ds.num_classes, sigma, cfg.ipc, cfg.seeds, ds.private.images.shape[-1],
                              cfg.dp_merf)
    point = {"epsilon": eps, "group_size": 0}
    run.doc["points"].append({**point, "arm": "dp_merf", "noise_multiplier": sigma, **info})
    run.score([LabelledSet(f"dp_merf|s{s}", x, torch.nn.functional.one_hot(y, ds.num_classes).float())
               for s, (x, y) in zip(cfg.seeds, sets)], point)


def dp_sgd_arm(run: CurveRun, eps: float) -> None:
    """DP-SGD on the private pixels at `eps`: a model, not a set; its own test accuracy per seed."""
    cfg, ds = run.cfg, run.ds
    point = {"epsilon": eps, "group_size": 0}
    for s in cfg.dp_sgd_seeds:
        r = train_dp_sgd(ds.private, ds.test, eps, cfg.delta, s, cfg.dp_sgd)
        run.doc["points"].append({**point, "arm": "dp_sgd", "seed": s, **{k: v for k, v in r.items() if k != "accuracy"}})
        run.doc["results"].append({**point, "arm": "dp_sgd", "seed": s, "accuracy": [r["accuracy"]],
                                   "mean": r["accuracy"], "std": 0.0, "training_images": r["records"]})
        run.save()


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
             "random_real": "random real subset (no DP)", "public_only": "public split alone (no device data)",
             "central": "ours, fitted to the central-DP release",
             "dp_merf": "DP-MERF, sampled at the same images per class",
             "dp_sgd": "DP-SGD on the private images (a model, not a set)"}


def arm_name(arm: str) -> str:
    if arm.endswith(KD_SUFFIX):
        return ARM_NAMES.get(arm[:-len(KD_SUFFIX)], arm) + ", teacher-KD student"
    return ARM_NAMES.get(arm, arm)


def markdown(doc: dict) -> str:
    """The curve as a table: one row per epsilon, one column per (group size, arm)."""
    rows = summary(doc)
    fixed = ("inf", "0")
    cols = sorted({(r["group_size"], r["arm"]) for r in rows if r["epsilon"] not in fixed})
    labels = ("inside the guarantee" if doc["threat_model"].startswith("trusted")
              else doc["config"]["label_mechanism"])
    lines = [f"Standard protocol, IPC {doc['config']['ipc']}, {doc['config']['epochs']} epochs, labels "
             f"{labels}, delta {doc['config']['delta']}; mean ± std over seeds x "
             f"evaluators ({doc['machine']}).", "",
             "| epsilon | " + " | ".join(f"{f'k={k}: ' if k else ''}{arm_name(a)} %" for k, a in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for eps in [str(e) for e in sorted(doc["config"]["epsilons"])]:
        cell = {(r["group_size"], r["arm"]): f"{r['mean']:.2f} ± {r['std']:.2f}" for r in rows if r["epsilon"] == eps}
        if cell:
            lines.append(f"| {eps} | " + " | ".join(cell.get(c, "-") for c in cols) + " |")
    ref = {arm_name(r["arm"]) + (" (epsilon inf)" if r["epsilon"] == "inf" else ""):
           f"{r['mean']:.2f} ± {r['std']:.2f}" for r in rows if r["epsilon"] in fixed}
    lines += ["", "References: " + ", ".join(f"{a} {v}" for a, v in ref.items())]
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
                    label=arm_name(arm) + (f", k={k}" if k else ""))
    styles = {"random_real": ("grey", "--"), "ours": ("black", "--"), "public_only": ("tab:red", ":"),
              "central": ("black", "--")}
    for r in rows:
        if r["epsilon"] in fixed:
            color, ls = styles.get(r["arm"], ("black", "-."))
            name = arm_name(r["arm"])
            ax.axhline(r["mean"], ls=ls, lw=1, color=color,
                       label=name + (", no DP" if r["epsilon"] == "inf" and "no DP" not in name else ""))
    ax.set_xscale("log")
    where = "central DP on the server" if doc["threat_model"].startswith("trusted") else "local DP on the device"
    ax.set_xlabel(f"per-record epsilon (delta {doc['config']['delta']}), {where}")
    ax.set_ylabel("test accuracy % (ConvNet-3 on the set alone)")
    ax.set_title(f"Fashion-MNIST, IPC {doc['config']['ipc']}, " + ("labels inside the guarantee" if where.startswith("central")
                 else f"labels {doc['config']['label_mechanism']}"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
