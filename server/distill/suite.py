"""`fedcondense distill`: students on one synthetic set, per loss and seed, with the server's teacher
. Writes JSON and a markdown table generated from it (mean +- std over seeds)."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from server.condense.chain import SyntheticSet
from server.distill.student import fit_and_score
from server.distill.teacher import Teacher
from shared.config import DemoConfig


def run_distill(synthetic: SyntheticSet, teacher: Teacher, test, cfg: DemoConfig, losses: list[str],
                seeds: list[int], device: torch.device) -> dict:
    rows = []
    for spec in losses:
        runs = []
        for seed in seeds:
            student_cfg = replace(cfg.student, seed=seed)
            try:
                runs.append(fit_and_score(synthetic.images, synthetic.labels, test, student_cfg, device, loss=spec,
                                          desc=f"{spec} s{seed}", teacher=teacher))
            except FloatingPointError as exc:          # a diverged run is a result, reported as such
                runs.append({"accuracy": None, "seconds": 0.0, "diverged": str(exc)})
        accs = [r["accuracy"] for r in runs if r["accuracy"] is not None]
        rows.append({"loss": spec, "accuracies": [r["accuracy"] for r in runs],
                     "mean": statistics.mean(accs) if accs else None,
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "diverged": sum("diverged" in r for r in runs), "seconds": sum(r["seconds"] for r in runs)})
    return {"rows": rows, "seeds": seeds, "student": cfg.student.model, "steps": cfg.student.steps,
            "synthetic_images": len(synthetic), "T": synthetic.meta.get("T"), "created": time.strftime("%Y-%m-%d %H:%M")}


def markdown_table(result: dict) -> str:
    base = next((r["mean"] for r in result["rows"] if r["loss"] == "soft_ce"), None)
    lines = [f"Student `{result['student']}`, {result['steps']} steps, on {result['synthetic_images']} synthetic "
             f"images (T={result['T']}); test accuracy over seeds {result['seeds']}; teacher: {result.get('teacher')}.",
             "", "| loss | mean | std | vs soft_ce |", "|---|---|---|---|"]
    for r in result["rows"]:
        if r["mean"] is None:
            lines.append(f"| `{r['loss']}` | diverged in every seed | | |")
            continue
        delta = "" if base is None or r["loss"] == "soft_ce" else f"{100 * (r['mean'] - base):+.2f} pt"
        note = f" (diverged in {r['diverged']} of {len(r['accuracies'])} seeds)" if r.get("diverged") else ""
        lines.append(f"| `{r['loss']}`{note} | {100 * r['mean']:.2f} % | {100 * r['std']:.2f} | {delta} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.json").write_text(json.dumps(result, indent=2))
    (out / "distill.md").write_text(markdown_table(result))
