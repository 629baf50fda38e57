"""`fedcondense bench --protocol standard`: condensed sets against their alternatives under the field's
standard evaluation protocol (server/distill/evaluate.py), every arm in the same run on the same machine.

Arms per IPC and condensation seed (each scored by `evaluators` ConvNet-3s trained from scratch):
- ours variants (docs/spec.md §1 chain; options in shared/config.py `CondenseConfig`):
  `ours_patent` (the gradient-free chain: no guidance), `ours` (the recipe's default), `ours_refined`
  (latents refined by distribution matching, the recipe's objective), `ours_refined_mean` /
  `ours_refined_mmd` (the refinement with DM's class-mean match / M3D's kernel MMD, whatever the recipe
  says), `ours_refined_random` / `ours_refined_trained` (the recipe's objective through fresh random
  networks as DM draws them / through trained networks, IDM's model sampling),
  `ours_refined_idm` (IDM: class-mean match through trained networks plus its class-aware term, weight
  0.5 up to IPC 10 and 0.1 above, as IDM's commands set it), `ours_formed` (multi-image formation x2),
  `ours_formed_refined` (both);
- `random_real` (equal per-class count), `random_real_formed` (4 real images per stored image, formed
  alike), `herding`, `k_center` (coresets in the features of a ConvNet-3 trained on all the data),
  `dm` (Distribution Matching at its published settings unless `dm_iterations` says otherwise);
- `full_real`: ConvNet-3s trained on all private images (the upper reference), and the max-coverage arms
  (`MAX_COVERAGE_ARMS`): the 1/T-budget set that uses every private latent once, condensed as the recipe
  says (`max_coverage`) or by the gradient-free chain (`max_coverage_patent`), and a random real subset
  of the same per-class counts (`max_coverage_random_real`).
Work runs in priority order under `budget_s`; what the budget cuts is listed in the JSON as skipped.
The JSON is rewritten after every result.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.coresets import herding, k_center
from benchmarks.dm import distribution_matching
from client.encode import encode_images
from server.condense.chain import condense
from server.distill.evaluate import LabelledSet, evaluate_sets, train_members
from server.condense.embedders import NETWORK_FIELDS
from server.condense.formation import form
from server.pipeline import committed_match, server_teacher
from server.condense.pretrain import load_or_train_autoencoder, load_or_train_chain
from shared.config import (AutoencoderConfig, ChainConfig, CondenseConfig, DataConfig, EvaluationConfig,
                           StudentConfig)
from shared.data import ImageSplit, load_dataset
from shared.device import device_name, resolve_device

PUBLISHED = {  # Fashion-MNIST, ConvNet-3, hard labels, IPC 1 / 10 / 50 (each paper's table)
    "DC (Zhao et al., ICLR 2021)": (70.5, 82.3, 83.6), "DSA (Zhao & Bilen, ICML 2021)": (70.6, 84.6, 88.7),
    "IDC (Kim et al., ICML 2022)": (81.0, 86.0, 86.2), "random real (DC's table)": (51.4, 73.8, 82.5),
    "herding (DC's table)": (67.0, 71.1, 71.9), "k-center (DC's table)": (66.9, 54.7, 68.3),
    "whole dataset (DC's table)": (93.5, 93.5, 93.5)}
OURS = {"ours_patent": dict(guidance=0.0), "ours": {}, "ours_refined": dict(refine=True),
        "ours_refined_mean": dict(refine=True, refine_objective="mean"),
        "ours_refined_mmd": dict(refine=True, refine_objective="mmd"),
        "ours_refined_random": dict(refine=True, refine_networks="random", refine_ce_weight=0.0),
        "ours_refined_trained": dict(refine=True, refine_networks="trained"),
        "ours_refined_idm": dict(refine=True, refine_objective="mean", refine_networks="trained",
                                 refine_ce_weight="idm"),
        "ours_formed": dict(formation=2), "ours_formed_refined": dict(formation=2, refine=True),
        "ours_mixed_refined": dict(class_plan="mixed", refine=True)}
ARMS = (*(a for a in OURS if not a.startswith("ours_refined_")), "random_real", "random_real_formed", "herding",
        "k_center", "dm")                            # the default arms; `ours_refined_<objective>` on request
MAX_COVERAGE_ARMS = {"max_coverage": {}, "max_coverage_patent": dict(guidance=0.0, refine_iterations=0),
                     "max_coverage_random_real": None}


def idm_ce_weight(ipc: int) -> float:
    """IDM's class-aware weight at this IPC: 0.5 at IPC 1 and 10, 0.1 at 50 (its CIFAR-10 commands)."""
    return 0.5 if ipc <= 10 else 0.1


@dataclass
class StandardBenchConfig:
    ipcs: tuple = (10, 1, 50)                       # in priority order (max coverage, then longer evaluations, follow)
    seeds: tuple = (0, 1, 2)                        # condensation seeds
    arms: tuple = ARMS
    epochs: tuple = (300, 1000)                     # 1000-epoch rows for the IPCs in `long_ipcs`
    long_ipcs: tuple = (10,)
    long_arms: tuple = ("ours_refined", "ours_formed_refined", "random_real", "dm")
    evaluators: int = 5
    dm_iterations: int = 20_000
    dm_ipcs: tuple = (10,)                          # DM at its published settings costs minutes per IPC
    refine_iterations: int = 2000
    refine_lr: float = 0.01
    full_epochs: int = 20
    max_coverage: bool = True
    max_coverage_arms: tuple = ("max_coverage",)    # of MAX_COVERAGE_ARMS
    budget_s: float = float("inf")
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    condense: CondenseConfig = field(default_factory=CondenseConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    recipe: str = "demo"
    device: str = "auto"


class Run:
    """The JSON document of one bench run, rewritten after every change; the clock for the budget."""

    def __init__(self, cfg: StandardBenchConfig, path: Path, device: torch.device):
        self.cfg, self.path, self.start = cfg, path, time.time()
        self.doc = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "protocol": "standard", "recipe": cfg.recipe,
                    "device": device_name(device), "machine": machine_name(device),
                    "config": json.loads(json.dumps(asdict(cfg), default=str)), "published": PUBLISHED,
                    "pretrain": {}, "results": [], "condense_seconds": {}, "skipped": [], "complete": False}

    def left(self) -> float:
        return self.cfg.budget_s - (time.time() - self.start)

    def save(self) -> None:
        self.doc["elapsed_s"] = time.time() - self.start
        self.path.write_text(json.dumps(self.doc, indent=1))

    def skip(self, what: str) -> None:
        self.doc["skipped"].append(what)
        self.save()


def machine_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).replace(" ", "-")
    return f"cpu{os.cpu_count()}-{platform.machine()}"


def prepare(cfg: StandardBenchConfig, dev: torch.device, run: Run) -> dict:
    """Data, the recipe's models, the pool (E1 latents of the private split) and the teacher."""
    ds = load_dataset(cfg.data)
    e1, dec, ae = load_or_train_autoencoder(ds.public.images, cfg.autoencoder, dev)
    pool = ImageSplit(encode_images(e1, ds.private.images, device=dev), ds.private.labels, ds.private.ids)
    committed = committed_match(e1, pool, ds, noised=False)      # the clean private split: committed models fit
    e2, est, chain = load_or_train_chain(pool.images, cfg.chain, dev, committed)
    models = {"first_encoder": e1, "decoder": dec, "second_encoder": e2, "noise_estimators": est}
    teacher, t_info = server_teacher(models, pool, ds, cfg.student, dev, cfg.condense.guidance, committed)
    models["teacher"] = teacher
    with torch.no_grad():
        x = ds.test.images[:2000].to(dev)
        mse = F.mse_loss(dec(e1(x)).float(), x).item()
    run.doc["pretrain"] = {"autoencoder": {**ae, "heldout_psnr_db": 10 * torch.log10(torch.tensor(4.0 / mse)).item(),
                                           "curves": _curves(ae["path"])},
                           "chain": {**chain, "curves": _curves(chain["path"])}, "teacher": t_info}
    run.save()
    return {"ds": ds, "pool": pool, "models": models}


def _curves(path: str) -> dict:
    """The loss curves a checkpoint recorded (a separate-layout chain: its shared estimator's)."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    if "curves" in meta:
        return meta["curves"]
    if "second_encoder" in meta:
        return _curves(str(Path(path).parent / Path(meta["second_encoder"]).name))
    return {}


def full_real(ctx: dict, cfg: StandardBenchConfig, dev, run: Run):
    """ConvNet-3s on every private image (`full_epochs`); their features pick the coresets."""
    ds = ctx["ds"]
    ecfg = replace(cfg.evaluation, epochs=cfg.full_epochs)
    y = F.one_hot(ds.private.labels, ds.num_classes).float()
    net = train_members(ds.private.images[None].expand(cfg.evaluators, -1, -1, -1, -1),
                        y[None].expand(cfg.evaluators, -1, -1), ecfg, dev, seed=cfg.evaluation.seed,
                        desc="full real")
    from server.distill.evaluate import member_accuracy
    acc = member_accuracy(net, ds.test.images, ds.test.labels, dev)
    run.doc["results"].append({"arm": "full_real", "ipc": None, "epochs": cfg.full_epochs, "accuracy": acc,
                               "mean": sum(acc) / len(acc), "std": float(torch.tensor(acc).std())})
    run.save()
    with torch.no_grad():
        feats = []
        for lo in range(0, len(ds.private), 2000):
            x = ds.private.images[lo:lo + 2000].to(dev)
            h = net.features(x.repeat(1, net.members, 1, 1))
            feats.append(h.view(len(x), net.members, -1)[:, 0].float().cpu())
    return torch.cat(feats)


def real_subset(ds, idx, num_classes: int, name: str, factor: int = 1) -> LabelledSet:
    images, labels = ds.private.images[idx], F.one_hot(ds.private.labels[idx], num_classes).float()
    if factor > 1:
        order = torch.argsort(ds.private.labels[idx], stable=True)
        images, labels = form(images[order], factor), labels[order][::factor ** 2]
    return LabelledSet(name, images, labels, factor)


def random_per_class(labels: torch.Tensor, n: int | list[int], seed: int) -> torch.Tensor:
    """Indices of n random images of each class (or n[c] of class c)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=gen)[:n if isinstance(n, int) else n[c]]])
    return torch.cat(out)


def ours_sets(ipc: int, ctx: dict, cfg: StandardBenchConfig, dev, run: Run) -> list[LabelledSet]:
    """Every `ours` arm for every seed. The plain and refined arms start from the same chain images, and
    each refinement runs the seeds' sets in one loop (server/condense/refine.py)."""
    from server.condense.chain import formed, refined, run_chains
    pool, k = ctx["pool"], ctx["ds"].num_classes
    wanted = [a for a in cfg.arms if a in OURS]
    chains: dict = {}                                            # (guided, factor) -> [chain set per seed]
    chain_key = lambda opts: (opts.get("guidance", cfg.condense.guidance), opts.get("formation", 1),
                              opts.get("class_plan", cfg.condense.class_plan))
    for arm in wanted:
        key = chain_key(OURS[arm])
        if key in chains:
            continue
        chains[key] = []
        for seed in cfg.seeds:
            ccfg = replace(cfg.condense, ipc=ipc * key[1] ** 2, seed=seed, guidance=key[0], formation=1,
                           class_plan=key[2])
            syn = run_chains(pool.images, pool.labels, pool.ids, k, ctx["models"], cfg.chain, ccfg, dev)
            chains[key].append(syn)
            run.doc["condense_seconds"].setdefault(f"chain|guidance{key[0]}|x{key[1] ** 2}|{key[2]}|ipc{ipc}",
                                                   []).append(syn.meta["seconds"])
    out = []
    for arm in wanted:
        opts = OURS[arm]
        factor = opts.get("formation", 1)
        base = chains[chain_key(opts)]
        if opts.get("refine"):
            settings = {k: v for k, v in opts.items() if k.startswith("refine_")}
            if settings.get("refine_ce_weight") == "idm":
                settings["refine_ce_weight"] = idm_ce_weight(ipc)
            rcfg = replace(cfg.condense, refine_iterations=cfg.refine_iterations, refine_lr=cfg.refine_lr,
                           formation=factor, seed=cfg.seeds[0], **settings)
            base = refined(base, pool.images, pool.labels, k, ctx["models"]["decoder"], rcfg, dev,
                           time_limit=max(30.0, 0.15 * run.left()))
            run.doc["condense_seconds"][f"refine|{arm}|ipc{ipc}"] = [base[0].meta["refine"]["seconds"] / len(base)]
            run.doc.setdefault("refine", {})[f"{arm}|ipc{ipc}"] = {
                "iterations": base[0].meta["refine"]["iterations"], "losses": [b.meta["refine"]["losses"] for b in base],
                **{k: base[0].meta["refine"][k] for k in ("objective", *NETWORK_FIELDS) if k in base[0].meta["refine"]}}
        for seed, syn in zip(cfg.seeds, base):
            syn = formed(syn, factor)
            out.append(LabelledSet(f"{arm}|ipc{ipc}|s{seed}", syn.images, syn.labels, factor))
    run.save()
    return out


def baseline_sets(ipc: int, seed: int, ctx: dict, cfg: StandardBenchConfig) -> list[LabelledSet]:
    ds, k = ctx["ds"], ctx["ds"].num_classes
    sets = []
    for arm in cfg.arms:
        name = f"{arm}|ipc{ipc}|s{seed}"
        if arm == "random_real":
            sets.append(real_subset(ds, random_per_class(ds.private.labels, ipc, seed), k, name))
        elif arm == "random_real_formed":
            sets.append(real_subset(ds, random_per_class(ds.private.labels, 4 * ipc, seed), k, name, factor=2))
        elif arm in ("herding", "k_center") and seed == cfg.seeds[0]:
            if "features" not in ctx:
                raise ValueError("herding and k-center pick in the features of the full-data ConvNets: full_epochs > 0")
            pick = herding if arm == "herding" else k_center
            sets.append(real_subset(ds, pick(ctx["features"], ds.private.labels, ipc), k, name))
        elif arm == "dm" and (ipc, seed) in ctx.get("dm", {}):
            made = ctx["dm"][(ipc, seed)]
            sets.append(LabelledSet(name, made["images"], F.one_hot(made["labels"], k).float()))
    return sets


def save_grids(sets: list[LabelledSet], folder: Path) -> None:
    """One PNG per set (one row per class), for the report page."""
    from server.condense.chain import save_grid
    folder.mkdir(parents=True, exist_ok=True)
    for st in sets:
        save_grid(st.images.clamp(-1, 1), st.labels.argmax(1), folder / f"{st.name.split('|')[0]}.png")


def record(run: Run, result: dict, epochs: int, labels: str) -> None:
    for name, r in result["sets"].items():
        arm, ipc, seed = name.split("|")
        run.doc["results"].append({"arm": arm, "ipc": int(ipc[3:]), "seed": int(seed[1:]), "epochs": epochs,
                                   "labels": labels, **r})
    run.save()


def run_dm(ipc: int, ctx, cfg: StandardBenchConfig, dev, run: Run) -> None:
    if "dm" not in cfg.arms:
        return
    if ipc not in cfg.dm_ipcs:
        run.skip(f"dm ipc{ipc}: not in dm_ipcs (DM at {cfg.dm_iterations} iterations costs minutes per IPC)")
        return
    out = distribution_matching(ctx["ds"].private.images, ctx["ds"].private.labels,
                                [(ipc, s) for s in cfg.seeds], cfg.dm_iterations, dev,
                                time_limit=max(60.0, 0.45 * run.left()))
    ctx.setdefault("dm", {}).update({k: v for k, v in out.items() if k != "seconds"})
    run.doc["condense_seconds"][f"dm|ipc{ipc}"] = [out["seconds"] / len(cfg.seeds)] * len(cfg.seeds)
    run.doc.setdefault("dm", {})[f"ipc{ipc}"] = {"iterations_asked": cfg.dm_iterations, "iterations": out["iterations"],
                                                "seconds_all_seeds": out["seconds"],
                                                "sets_in_one_loop": len(cfg.seeds),
                                                "final_loss": [out[(ipc, s)]["losses"][-1] for s in cfg.seeds]}
    run.save()


def evaluate_ipc(ipc: int, ctx, cfg: StandardBenchConfig, dev, run: Run) -> None:
    """Every arm's sets at this IPC, scored at the first epoch count; the sets of `long_arms` are kept for
    the longer evaluations, which run last (`long_evaluations`)."""
    run_dm(ipc, ctx, cfg, dev, run)
    sets = ours_sets(ipc, ctx, cfg, dev, run) + [st for seed in cfg.seeds for st in baseline_sets(ipc, seed, ctx, cfg)]
    save_grids([s for s in sets if s.name.endswith(f"|s{cfg.seeds[0]}")], run.path.parent / f"grids-ipc{ipc}")
    ecfg = replace(cfg.evaluation, evaluators=cfg.evaluators, epochs=cfg.epochs[0])
    record(run, evaluate_sets(sets, ctx["ds"].test, ecfg, dev), ecfg.epochs, "hard")
    soft = [s for s in sets if s.labels.max(1).values.min() < 1.0]
    if soft:
        record(run, evaluate_sets(soft, ctx["ds"].test, replace(ecfg, labels="soft"), dev), ecfg.epochs, "soft")
    if ipc in cfg.long_ipcs:
        ctx.setdefault("long", {})[ipc] = [s for s in sets if s.name.split("|")[0] in cfg.long_arms]


def long_evaluations(ctx, cfg: StandardBenchConfig, dev, run: Run) -> None:
    for ipc, sets in ctx.get("long", {}).items():
        for epochs in cfg.epochs[1:]:
            if run.left() <= 0:
                run.skip(f"ipc{ipc} {epochs} epochs: budget spent")
                continue
            ecfg = replace(cfg.evaluation, evaluators=cfg.evaluators, epochs=epochs)
            record(run, evaluate_sets(sets, ctx["ds"].test, ecfg, dev), epochs, "hard")


def max_coverage(ctx, cfg: StandardBenchConfig, dev, run: Run) -> None:
    """The max-coverage arms of `cfg.max_coverage_arms`, condensation seed `cfg.seeds[0]`; the random real arm
    draws as many real images of each class as the condensed max-coverage set holds."""
    unknown = set(cfg.max_coverage_arms) - set(MAX_COVERAGE_ARMS)
    if unknown:
        raise ValueError(f"unknown max-coverage arm(s) {sorted(unknown)}; choose from {' '.join(MAX_COVERAGE_ARMS)}")
    pool, ds, seed = ctx["pool"], ctx["ds"], cfg.seeds[0]
    sets, counts = [], None
    for arm in (a for a in cfg.max_coverage_arms if MAX_COVERAGE_ARMS[a] is not None):
        ccfg = replace(cfg.condense, ipc=None, max_coverage=True, selection="one-to-one", seed=seed,
                       **MAX_COVERAGE_ARMS[arm])
        syn = condense(pool.images, pool.labels, pool.ids, ds.num_classes, ctx["models"], cfg.chain, ccfg, dev)
        sets.append(LabelledSet(f"{arm}|ipc0|s{seed}", syn.images, syn.labels))
        counts = torch.bincount(syn.labels.argmax(1), minlength=ds.num_classes)
        run.doc.setdefault("max_coverage_arms", {})[arm] = {"synthetic_images": len(syn), "real_latents":
                                                            syn.meta["real_latents"], "seconds": syn.meta["seconds"]}
        run.doc.setdefault("max_coverage", run.doc["max_coverage_arms"][arm])
    if "max_coverage_random_real" in cfg.max_coverage_arms:
        sets.append(random_real_like(ds.private, counts, seed, ds.num_classes, f"max_coverage_random_real|ipc0|s{seed}"))
    run.save()
    ecfg = replace(cfg.evaluation, evaluators=cfg.evaluators, epochs=cfg.epochs[0])
    record(run, evaluate_sets(sets, ds.test, ecfg, dev), ecfg.epochs, "hard")


def random_real_like(private: ImageSplit, counts: torch.Tensor | None, seed: int, num_classes: int, name: str
                     ) -> LabelledSet:
    """`counts[c]` real images of each class c, drawn with `seed`."""
    if counts is None:
        raise ValueError("max_coverage_random_real copies the class counts of a condensed max-coverage arm: "
                         "list max_coverage or max_coverage_patent with it")
    idx = random_per_class(private.labels, counts.tolist(), seed)
    return LabelledSet(name, private.images[idx], F.one_hot(private.labels[idx], num_classes).float())


def result_path(out_dir: Path, recipe: str, dev: torch.device) -> Path:
    """The run's JSON: named by the recipe (a recipe file by its stem) and the machine."""
    name = Path(recipe).stem if str(recipe).endswith(".toml") else recipe
    return out_dir / f"fmnist-standard-{name}-{machine_name(dev)}.json"


def run_standard_bench(cfg: StandardBenchConfig, out_dir: Path) -> Path:
    unknown = set(cfg.arms) - set(OURS) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown standard-bench arm(s) {sorted(unknown)}; choose from "
                         f"{' '.join(dict.fromkeys((*OURS, *ARMS)))}")
    dev = resolve_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(out_dir, cfg.recipe, dev)
    run = Run(cfg, path, dev)
    ctx = prepare(cfg, dev, run)
    if cfg.full_epochs:
        ctx["features"] = full_real(ctx, cfg, dev, run)
    for ipc in cfg.ipcs:
        if run.left() <= 0:
            run.skip(f"ipc{ipc}: budget spent")
            continue
        evaluate_ipc(ipc, ctx, cfg, dev, run)
    if cfg.max_coverage:
        if run.left() > 0:
            max_coverage(ctx, cfg, dev, run)
        else:
            run.skip("max coverage: budget spent")
    long_evaluations(ctx, cfg, dev, run)
    run.doc["summary"] = summarise(run.doc["results"])
    run.doc["complete"] = True
    run.save()
    from benchmarks.standard_report import write_report
    write_report(run.doc, path.with_suffix(""))
    return path


def summarise(results: list[dict]) -> list[dict]:
    """Mean and std over every evaluator of every condensation seed, per (arm, IPC, epochs, labels)."""
    groups: dict = {}
    for r in results:
        key = (r["arm"], r["ipc"], r["epochs"], r.get("labels", "hard"))
        groups.setdefault(key, []).extend(r["accuracy"])
    seeds: dict = {}
    for r in results:
        seeds.setdefault((r["arm"], r["ipc"], r["epochs"], r.get("labels", "hard")), []).append(r["mean"])
    rows = []
    for key, accs in groups.items():
        arm, ipc, epochs, labels = key
        a, m = torch.tensor(accs), torch.tensor(seeds[key])
        rows.append({"arm": arm, "ipc": ipc, "epochs": epochs, "labels": labels, "mean": float(a.mean()),
                     "std": float(a.std()) if len(a) > 1 else 0.0, "n": len(accs), "seed_means": m.tolist(),
                     "std_of_seed_means": float(m.std()) if len(m) > 1 else 0.0})
    return rows
