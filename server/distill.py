"""`fedcondense distill`: students on one synthetic set, per loss and seed, with the server's teacher
(issue 5 §4). Writes JSON and a markdown table generated from it (mean +- std over seeds)."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from server.condense import SyntheticSet
from server.pretrain import fingerprint
from server.student import fit_and_score
from server.teacher import Teacher, train_teacher
from shared.cache import cache_dir
from shared.config import DemoConfig


def load_or_train_teacher(models: dict, latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          device: torch.device, steps: int = 800) -> tuple[Teacher, dict]:
    path = cache_dir("teacher", fingerprint(latents), fingerprint(labels.float()), steps,
                     fingerprint(torch.cat([p.flatten() for p in models["second_encoder"].parameters()])))
    teacher = Teacher(models["first_encoder"], models["second_encoder"], num_classes).to(device)
    if (path / "teacher.pt").exists():
        teacher.load_state_dict(torch.load(path / "teacher.pt", map_location=device))
        return teacher.eval(), {"seconds": 0.0, "cached": str(path)}
    teacher, info = train_teacher(models["first_encoder"], models["second_encoder"], latents, labels, num_classes,
                                  device, steps=steps)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), path / "teacher.pt.tmp")
    (path / "teacher.pt.tmp").rename(path / "teacher.pt")
    return teacher, info


def run_distill(synthetic: SyntheticSet, teacher: Teacher, test, cfg: DemoConfig, losses: list[str],
                seeds: list[int], device: torch.device) -> dict:
    rows = []
    for spec in losses:
        runs = []
        for seed in seeds:
            student_cfg = replace(cfg.student, seed=seed)
            uses_teacher = spec != "soft_ce"
            runs.append(fit_and_score(synthetic.images, synthetic.labels, test, student_cfg, device, loss=spec,
                                      desc=f"{spec} s{seed}", teacher=teacher if uses_teacher else None))
        accs = [r["accuracy"] for r in runs]
        rows.append({"loss": spec, "accuracies": accs, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seconds": sum(r["seconds"] for r in runs)})
    return {"rows": rows, "seeds": seeds, "student": cfg.student.model, "steps": cfg.student.steps,
            "synthetic_images": len(synthetic), "T": synthetic.meta.get("T"), "created": time.strftime("%Y-%m-%d %H:%M")}


def markdown_table(result: dict) -> str:
    base = next((r["mean"] for r in result["rows"] if r["loss"] == "soft_ce"), None)
    lines = [f"Student `{result['student']}`, {result['steps']} steps, on {result['synthetic_images']} synthetic "
             f"images (T={result['T']}); test accuracy over seeds {result['seeds']}; teacher: {result.get('teacher')}.",
             "", "| loss | mean | std | vs soft_ce |", "|---|---|---|---|"]
    for r in result["rows"]:
        delta = "" if base is None or r["loss"] == "soft_ce" else f"{100 * (r['mean'] - base):+.2f} pt"
        lines.append(f"| `{r['loss']}` | {100 * r['mean']:.2f} % | {100 * r['std']:.2f} | {delta} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.json").write_text(json.dumps(result, indent=2))
    (out / "distill.md").write_text(markdown_table(result))
