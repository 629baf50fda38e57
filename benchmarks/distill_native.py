"""`fedcondense bench --distill-native`: every distillation method in its native setting (docs/spec.md §2-§5).

Before a loss is judged on synthetic images it must work where its paper works: a strong teacher trained
on all real training images, and a small student trained on a limited real subset, where distillation
measurably helps. Each method runs with its paper's settings (`METHODS`), on the same subset, the same
initialisation and the same augmentation draws per seed (paired seeds), and is compared with vanilla KD
by the paired difference and its standard error, as mdistiller's tables compare methods with KD.
Each run keeps a trace (each loss term's value and the student's gradient norm every 25 steps).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.standard import machine_name, random_per_class
from server.distill.student import evaluate, fit_and_score, one_hot, train_student
from shared.cache import building, cache_dir, to_jsonable
from shared.config import DataConfig, StudentConfig
from shared.data import load_dataset
from shared.device import resolve_device
from shared.models.students import build_student

# method -> (loss spec, where its settings come from); every spec keeps the task loss on hard labels
METHODS = {
    "ce": ("soft_ce", "no teacher: cross-entropy on the subset's labels"),
    "kd": ("soft_ce:0.1,kd:0.9", "Hinton et al. 2015, T 4; CE 0.1 + KD 0.9 as mdistiller trains it"),
    "dkd": ("soft_ce:1,dkd:1", "Zhao et al. 2022 (docs/spec.md §3): alpha 1, beta 8, T 4, warm-up 20/240"),
    "ddkd": ("soft_ce:1,dkd:1,ddkd:1", "docs/spec.md §3, DiffKD's pipeline: DKD on logits + 5 DDIM steps on features"),
    "mi_prior": ("soft_ce:1,mi_prior:1", "docs/spec.md §2: MI with a learnable prior, teacher on a weak view"),
    "attention": ("soft_ce:1,attention:1", "docs/spec.md §4; Zagoruyko & Komodakis 2017: beta 1000"),
    "mixed": ("soft_ce:0.1,mixed:1", "docs/spec.md §4: 0.5 KL + 0.3 feature MSE + 0.2 attention MSE, the seed's "
                                     "whole loss; the task term at KD's weight 0.1"),
    "channel_sparse": ("soft_ce:1,channel_sparse:1", "docs/spec.md §5 rule 1: Hungarian, one teacher channel each; "
                                                     "FitNets' hint stage first"),
    "channel_random": ("soft_ce:1,channel_random:1", "docs/spec.md §5 rule 2: a random channel of the matched group; "
                                                     "FitNets' hint stage first"),
    "channel_maxpool": ("soft_ce:1,channel_maxpool:1", "docs/spec.md §5 rule 3: max over the matched group; "
                                                       "FitNets' hint stage first"),
}
# a feature term is also used on top of KD, as the attention-transfer paper reports AT+KD and FitNets trains
# with KD after its hint stage: the same term added to the KD row's loss, so the paired difference to KD
# is the term's own contribution
FEATURE_TERMS = ("mi_prior", "attention", "channel_sparse", "channel_random", "channel_maxpool")
METHODS.update({f"{name}+kd": (f"{METHODS['kd'][0]},{name}:1", f"KD plus the {name} term ({METHODS[name][1]})")
                for name in FEATURE_TERMS})


@dataclass
class NativeDistillConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: str = "convnet3"             # ConvNet-3 at width 128
    teacher_steps: int = 2500             # ~5 epochs of the 60,000 training images at batch 128
    students: tuple = ("convnet3_w32",)
    per_class: int = 100                  # the student's real subset: 1,000 images
    steps: int = 400                      # ~51 epochs of the subset at batch 128
    batch_size: int = 128
    lr: float = 0.05                      # mdistiller's CIFAR students (ResNets, WRNs, VGGs)
    light_lr: float = 0.01                # mdistiller's ShuffleNet and MobileNet students: a fifth of it
    methods: tuple = tuple(METHODS)
    seeds: tuple = (0, 1, 2)
    device: str = "auto"


LIGHT_STUDENTS = ("mobilenet_v2", "shufflenet_v2")   # name prefixes of the students mdistiller trains at LR 0.01


def student_config(cfg: NativeDistillConfig, model: str, seed: int, steps: int) -> StudentConfig:
    lr = cfg.light_lr if model.startswith(LIGHT_STUDENTS) else cfg.lr
    return StudentConfig(model=model, steps=steps, batch_size=cfg.batch_size, lr=lr,
                         lr_reference_batch=cfg.batch_size, augment="affine", seed=seed)


def all_training_images(ds):
    return torch.cat([ds.public.images, ds.private.images]), torch.cat([ds.public.labels, ds.private.labels])


def load_or_train_native_teacher(cfg: NativeDistillConfig, ds, dev) -> tuple[torch.nn.Module, dict]:
    """The teacher: `cfg.teacher` trained from scratch on all training images (public + private), cached."""
    images, labels = all_training_images(ds)
    scfg = student_config(cfg, cfg.teacher, 0, cfg.teacher_steps)
    path = cache_dir("native-teacher", to_jsonable(cfg.data), to_jsonable(scfg), ds.num_classes)
    with building(path):
        model = build_student(cfg.teacher, images.shape[1], ds.num_classes, images.shape[-1]).to(dev)
        if (path / "teacher.pt").exists():
            model.load_state_dict(torch.load(path / "teacher.pt", map_location=dev))
            info = json.loads((path / "teacher.json").read_text())
        else:
            start = time.time()
            model = train_student(images, one_hot(labels, ds.num_classes), scfg, dev, desc=f"teacher {cfg.teacher}")
            info = {"model": cfg.teacher, "steps": cfg.teacher_steps, "train_images": len(images),
                    "accuracy": evaluate(model, ds.test.images, ds.test.labels, dev), "seconds": time.time() - start}
            path.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path / "teacher.pt")
            (path / "teacher.json").write_text(json.dumps(info))
    return model.eval().requires_grad_(False), info


def paired(runs: dict, method: str, reference: str = "kd") -> dict | None:
    """Paired difference to the reference method over common seeds: mean, std, standard error, verdict."""
    a, b = runs.get(method), runs.get(reference)
    if not a or not b:
        return None
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if len(diffs) < 2:
        return None
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    se = std / math.sqrt(len(diffs))
    return {"mean": mean, "std": std, "se": se, "n": len(diffs), "at_least_reference_within_se": mean >= -se}


def summarise(rows: list[dict], methods, students) -> list[dict]:
    out = []
    for student in students:
        runs = {m: [r["accuracy"] for r in rows if r["student"] == student and r["method"] == m] for m in methods}
        for m in methods:
            accs = [a for a in runs[m] if a is not None]
            if not accs:
                continue
            out.append({"student": student, "method": m, "loss": METHODS[m][0], "settings": METHODS[m][1],
                        "accuracies": runs[m], "mean": statistics.mean(accs),
                        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "diverged": sum(a is None for a in runs[m]),
                        "vs_kd": paired(runs, m) if m != "kd" else None,
                        "vs_ce": paired(runs, m, "ce") if m != "ce" else None})
    return out


def run_native_distill(cfg: NativeDistillConfig, out: Path) -> Path:
    dev = resolve_device(cfg.device)
    ds = load_dataset(cfg.data)
    teacher, teacher_info = load_or_train_native_teacher(cfg, ds, dev)
    images, labels = all_training_images(ds)
    rows = []
    for student in cfg.students:
        for seed in cfg.seeds:
            idx = random_per_class(labels, cfg.per_class, seed)
            x, y = images[idx], one_hot(labels[idx], ds.num_classes)
            for method in cfg.methods:
                trace: list = []
                scfg = student_config(cfg, student, seed, cfg.steps)
                try:
                    r = fit_and_score(x, y, ds.test, scfg, dev, loss=METHODS[method][0], teacher=teacher,
                                      desc=f"{student} {method} s{seed}", trace=trace)
                except FloatingPointError as exc:
                    r = {"accuracy": None, "diverged": str(exc), "seconds": 0.0}
                rows.append({"student": student, "method": method, "seed": seed, "trace": trace, **r})
                print(f"{student} {method} seed {seed}: {r['accuracy']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fmnist-distill-native-{'-'.join(cfg.students)}-{machine_name(dev)}.json"
    targets = channel_targets(cfg, teacher, images, labels, dev)
    config, stamp = to_jsonable(asdict(cfg)), time.strftime("%Y-%m-%d %H:%M")
    rows = [{**r, "measured": stamp} for r in rows]
    merged = merged_rows(path, config, teacher_info, rows)
    if merged is None:                           # another setting's file: keep it, write beside it
        path = path.with_name(f"{path.stem}-{time.strftime('%Y%m%d-%H%M')}.json")
        print(f"{path.name}: the file of this name holds another setting (teacher, data or seeds); kept as is")
    rows, methods = merged or merged_rows(path, config, teacher_info, rows)   # the new name: a first file
    config["methods"] = methods
    doc = {"protocol": "native: teacher on all training images, student on a real subset of "
                       f"{cfg.per_class} per class, {cfg.steps} steps",
           "config": config, "teacher": teacher_info, "machine": machine_name(dev),
           "rows": rows, "summary": summarise(rows, methods, cfg.students), "created": stamp}
    kept = json.loads(path.read_text()).get("channel_targets") if merged is not None and path.exists() else None
    if targets or kept:                          # this run's, else the updated file's
        doc["channel_targets"] = targets or kept
    path.write_text(json.dumps(doc, indent=1))
    path.with_suffix(".md").write_text(markdown(doc))
    plot(doc, path.with_suffix(".png"))
    return path


def channel_targets(cfg: NativeDistillConfig, teacher, images, labels, dev, batch: int = 256) -> dict | None:
    """Per student and seed, which teacher channels each channel-matching rule targets at the hint stage's first
    step (the seed's initial student on a batch of its subset; server/distill/channel_matching.py
    `target_coverage`). None when no channel-matching method ran."""
    from server.distill.channel_matching import RULE_DOCS, target_coverage
    from shared.models.distill_points import FeatureTap
    rules = [r for r in RULE_DOCS if any(m.startswith(f"channel_{r}") for m in cfg.methods)]
    if not rules:
        return None
    out = {}
    for student in cfg.students:
        for seed in cfg.seeds:
            x = images[random_per_class(labels, cfg.per_class, seed)][:batch].to(dev)
            torch.manual_seed(seed)
            model = build_student(student, x.shape[1], int(labels.max()) + 1, x.shape[-1]).to(dev).eval()
            taps = FeatureTap(model, student), FeatureTap(teacher, cfg.teacher)
            with torch.no_grad():
                model(x), teacher(x)
            out.setdefault(student, {})[str(seed)] = {r: target_coverage(r, taps[0].value, taps[1].value) for r in rules}
            for tap in taps:
                tap.remove()
    return out


def merged_rows(path: Path, config: dict, teacher: dict, rows: list[dict]) -> tuple[list[dict], list[str]] | None:
    """A run of some methods updates an earlier file of the same setting (data, students, subset, steps,
    seeds, and a teacher of the same test accuracy): the methods run now replace their rows, the other
    methods' rows are kept with when they were measured. Returns the rows and the methods in the order of
    METHODS, whatever order they ran in; None where the file holds another setting."""
    fresh, kept, earlier = set(config["methods"]), [], []
    if path.exists():
        old = json.loads(path.read_text())
        setting = lambda c: {k: v for k, v in c.items() if k not in ("methods", "device")}   # the name names the machine
        if setting(old["config"]) != setting(config) or old["teacher"].get("accuracy") != teacher.get("accuracy"):
            return None
        kept = [{"measured": old.get("created"), **r} for r in old["rows"] if r["method"] not in fresh]
        earlier = old["config"]["methods"]
    methods = [m for m in METHODS if m in fresh or m in earlier]
    order = {m: i for i, m in enumerate(methods)}
    return sorted(kept + rows, key=lambda r: (r["student"], r["seed"], order[r["method"]])), methods


def lr_text(config: dict) -> str:
    light = config.get("light_lr")              # files written before students had their own learning rate lack it
    return f"{config['lr']}" + (f" (ShuffleNet and MobileNet students {light})" if light is not None else "")


def markdown(doc: dict) -> str:
    t = doc["teacher"]
    lines = [f"Native setting: teacher `{t['model']}` ({100 * t['accuracy']:.2f} % test accuracy, {t['steps']} steps on "
             f"{t['train_images']} images); {doc['protocol']}, SGD at LR {lr_text(doc['config'])}; seeds "
             f"{doc['config']['seeds']} (paired); machine {doc['machine']}.", "",
             "| student | method | loss | accuracy % | vs KD (paired, ± SE) | >= KD within 1 SE |", "|---|---|---|---|---|---|"]
    for r in doc["summary"]:
        vs = r["vs_kd"]
        delta = f"{100 * vs['mean']:+.2f} ± {100 * vs['se']:.2f}" if vs else ""
        verdict = ("yes" if vs["at_least_reference_within_se"] else "**no**") if vs else ""
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {r['student']} | {r['method']}{div} | `{r['loss']}` | {100 * r['mean']:.2f} ± "
                     f"{100 * r['std']:.2f} | {delta} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = doc["summary"]
    students = sorted({r["student"] for r in rows})
    width = max(7, 0.45 * len(doc["config"]["methods"]))
    fig, axes = plt.subplots(1, len(students), figsize=(width * len(students), 4), squeeze=False)
    for ax, student in zip(axes[0], students):
        mine = [r for r in rows if r["student"] == student]
        ax.bar(range(len(mine)), [100 * r["mean"] for r in mine], yerr=[100 * r["std"] for r in mine], capsize=3,
               color=["grey" if r["method"] == "ce" else "tab:blue" if r["method"] == "kd" else "tab:orange" for r in mine])
        ax.set_xticks(range(len(mine)), [r["method"] for r in mine], rotation=45, ha="right")
        low = min(100 * r["mean"] - 100 * r["std"] for r in mine)
        ax.set_ylim(max(0, low - 2), 100 * doc["teacher"]["accuracy"] + 1)
        ax.axhline(100 * doc["teacher"]["accuracy"], ls="--", c="k", lw=0.8, label="teacher")
        ax.set_title(f"{student} on {doc['config']['per_class']} images per class")
        ax.set_ylabel("test accuracy %")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
