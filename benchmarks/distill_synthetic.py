"""`fedcondense bench --distill-synthetic`: every distillation method on the synthetic set (docs/spec.md §2-§5).

After the native setting (benchmarks/distill_native.py), each method trains the students the product ships:
the teacher-KD protocol's student (ConvNet-3 at width 128, the standard evaluator's architecture; the demo
recipe's steps, augmentation and optimiser) on the condensed IPC-10 set, distilling from the server's
teacher. Seed s pairs condensation seed s with student seed s, the same for every method, so each method
is compared with the soft-label baseline (`ce`: soft cross-entropy on the set's own labels n_c/T) and with
KD by paired differences and their standard errors.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.distill_native import METHODS, plot, summarise
from benchmarks.standard import Run, StandardBenchConfig, machine_name, ours_sets, prepare
from server.distill.student import fit_and_score
from shared.cache import to_jsonable
from shared.device import resolve_device


@dataclass
class SyntheticDistillConfig:
    bench: StandardBenchConfig = field(default_factory=StandardBenchConfig)   # recipe, models, refinement
    arm: str = "ours_refined"                    # the condensed set: chain + guidance + latent refinement
    ipc: int = 10
    students: tuple = ("convnet3", "convnet3_w32")   # the standard evaluator's ConvNet-3, and at width 32
    methods: tuple = tuple(METHODS)
    seeds: tuple = (0, 1, 2)                     # condensation seed = student seed


def run_synthetic_distill(cfg: SyntheticDistillConfig, out: Path) -> Path:
    dev = resolve_device(cfg.bench.device)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fmnist-distill-synthetic-ipc{cfg.ipc}-{cfg.bench.recipe}-{machine_name(dev)}.json"
    bench = replace(cfg.bench, arms=(cfg.arm,), seeds=cfg.seeds)
    run = Run(bench, path.with_name(path.stem + ".partial.json"), dev)
    ctx = prepare(bench, dev, run)
    teacher, student = ctx["models"]["teacher"], bench.student
    sets = ours_sets(cfg.ipc, ctx, bench, dev, run)
    rows = []
    for name in cfg.students:
        for seed, made in zip(cfg.seeds, sets):
            for method in cfg.methods:
                rows.append({"student": name, "method": method, "seed": seed, "set": made.name,
                             **train_one(made, ctx["ds"].test, replace(student, model=name, seed=seed), method,
                                         teacher, dev)})
                print(f"{name} {made.name} {method}: {rows[-1]['accuracy']}", flush=True)
    doc = {"protocol": f"teacher-KD: {student.steps} steps, batch {student.batch_size}, lr "
                       f"{student.lr}, {student.augment} augmentation, on the {cfg.arm} set (IPC {cfg.ipc}), "
                       f"the server's teacher",
           "config": {**to_jsonable(asdict(cfg)), "per_class": cfg.ipc}, "teacher": teacher_info(run),
           "machine": machine_name(dev), "rows": rows,
           "summary": summarise(rows, cfg.methods, cfg.students), "not_applicable": not_applicable(rows),
           "pretrain": run.doc["pretrain"],
           "condense_seconds": run.doc["condense_seconds"], "created": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(doc, indent=1))
    run.path.unlink(missing_ok=True)
    path.with_suffix(".md").write_text(markdown(doc))
    plot(doc, path.with_suffix(".png"))
    return path


def train_one(made, test, scfg, method: str, teacher, dev) -> dict:
    """One student; a diverged run or a method that cannot apply to this pair is a result, with its reason."""
    trace: list = []
    try:
        r = fit_and_score(made.images, made.labels, test, scfg, dev, loss=METHODS[method][0], teacher=teacher,
                          desc=f"{scfg.model} {method} s{scfg.seed}", trace=trace)
    except FloatingPointError as exc:
        return {"accuracy": None, "diverged": str(exc), "seconds": 0.0, "trace": trace}
    except ValueError as exc:                   # e.g. channel matching needs a teacher wider than the student
        return {"accuracy": None, "not_applicable": str(exc), "seconds": 0.0, "trace": []}
    return {**r, "trace": trace}


def not_applicable(rows: list[dict]) -> list[dict]:
    seen = {(r["student"], r["method"]): r["not_applicable"] for r in rows if r.get("not_applicable")}
    return [{"student": s, "method": m, "reason": why} for (s, m), why in seen.items()]


def teacher_info(run: Run) -> dict:
    info = run.doc["pretrain"]["teacher"]
    return {"model": "server teacher (E1 -> E2 -> head)", "accuracy": info["accuracy"], "steps": info["steps"],
            "train_images": "the pooled latents"}


def markdown(doc: dict) -> str:
    lines = [f"On the synthetic set: {doc['protocol']} ({100 * doc['teacher']['accuracy']:.2f} % test accuracy); "
             f"seeds {doc['config']['seeds']} (condensation and student, paired); machine {doc['machine']}.", "",
             "| student | method | loss | accuracy % | vs soft labels (paired ± SE) | vs KD (paired ± SE) |",
             "|---|---|---|---|---|---|"]
    for r in doc["summary"]:
        cells = [f"{100 * v['mean']:+.2f} ± {100 * v['se']:.2f}" if v else "" for v in (r["vs_ce"], r["vs_kd"])]
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {r['student']} | {r['method']}{div} | `{r['loss']}` | {100 * r['mean']:.2f} ± "
                     f"{100 * r['std']:.2f} | {cells[0]} | {cells[1]} |")
    lines += ["", *(f"- Not applicable: {n['student']} with {n['method']}: {n['reason']}" for n in doc["not_applicable"])]
    return "\n".join(lines) + "\n"
