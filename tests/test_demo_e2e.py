"""End-to-end runs of `fedcondense demo`: real data, real (small) training, real report and audit."""
import json
import re
import shutil
import subprocess

import pytest
import torch

from server.cli import main
from server.condense.chain import SyntheticSet
from shared.config import StudentConfig

TINY = ["--local", "--train-limit", "1500", "--test-limit", "500", "--T", "5", "--ae-steps", "30", "--chain-steps", "40",
        "--chain-batch", "32", "--module-steps", "2", "--student", "convnet3_w32", "--student-steps", "100", "--full-epochs", "0.5", "--teacher-steps", "10",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    assert main(["demo", "--out", str(out), "--ipc", "4", "--eval-seeds", "2", *TINY]) == 0
    return out


def test_tiny_demo_report(tiny_run, capsys):
    report = json.loads((tiny_run / "report.json").read_text())
    for key in ("dataset", "T", "selection", "class_plan", "synthetic_images", "real_images_used", "device"):
        assert key in report
    assert report["dataset"] == "fashion-mnist" and report["T"] == 5 and report["mode"] == "single-machine"
    assert report["synthetic_images"] == 40 and report["real_images_used"] == 200, "disjoint groups: 40 x T=5 latents"
    assert report["selection"] == "cluster", "the default rule"
    for k in ("synthetic", "random_real", "full_real"):
        assert 0.0 <= report["accuracy"][k] <= 1.0
    for k in ("pretrain", "condense", "student"):
        assert report["seconds"][k] >= 0
    assert report["accuracy"]["random_real"] > 0.3, "the shared student recipe learns from 40 real images"
    assert report["accuracy"]["synthetic"] > 0.3, "the synthetic-set student beats chance (0.1) by a clear margin"
    assert report["student_loss"] == StudentConfig.loss, "the demo's students distil from the server's teacher"
    assert report["teacher_views"] == {"kd": 1.0}, "plain KD: the teacher labels the view the student trains on"
    assert 0.3 < report["teacher"]["accuracy"] <= 1 and report["teacher"]["steps"] == 10
    syn = SyntheticSet.load(tiny_run / "ipc4")
    assert torch.isfinite(syn.images).all() and syn.images.abs().max() <= 1
    assert (tiny_run / "ipc4" / "grid.png").stat().st_size > 0


def test_eval_seeds_pair_each_seed_with_its_own_random_subset(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    o = report["over_seeds"]
    assert o["seed_offsets"] == [0, 1] and o["seeds"] == 2
    syn, rr = o["accuracy"]["synthetic"], o["accuracy"]["random_real"]
    assert syn[0] == report["accuracy"]["synthetic"] and rr[0] == report["accuracy"]["random_real"], "seed 0: the main run"
    assert all(0.0 <= a <= 1.0 for a in syn + rr) and len(syn) == len(rr) == 2
    diffs = [a - b for a, b in zip(syn, rr)]
    assert o["lead"] == pytest.approx(sum(diffs) / 2) and o["wins"] == sum(d > 0 for d in diffs)
    assert o["mean_synthetic"] == pytest.approx(sum(syn) / 2) and report["seconds"]["over_seeds"] > 0
    from server.pipeline import format_table
    assert f"paired lead {100 * o['lead']:+.2f}" in format_table(report)


def test_paired_lead_figures():
    from server.pipeline import paired_lead
    out = paired_lead({"synthetic": [0.81, 0.80, 0.82], "random_real": [0.80, 0.81, 0.80]})
    assert out["lead"] == pytest.approx(0.02 / 3) and out["wins"] == 2 and out["seeds"] == 3
    assert out["lead_se"] == pytest.approx(0.0152753 / 3 ** 0.5, rel=1e-4)    # std of (+.01, -.01, +.02)
    assert out["std_random_real"] == pytest.approx(0.0057735, rel=1e-4)
    assert "lead" not in paired_lead({"synthetic": [0.8]}), "no baseline arm, no lead"


def test_eval_seeds_below_one_is_refused(capsys):
    assert main(["demo", "--out", "/nonexistent/never-written", "--eval-seeds", "0", *TINY]) == 2
    assert "--eval-seeds must be >= 1" in capsys.readouterr().err


def test_table_states_the_lead_over_random_real(tiny_run):
    from server.pipeline import format_table
    report = json.loads((tiny_run / "report.json").read_text())
    row = next(line for line in format_table(report).splitlines() if line.split()[:1] == ["4"])
    syn, rr = report["accuracy"]["synthetic"], report["accuracy"]["random_real"]
    assert row.split()[2:5] == [f"{syn:.4f}", f"{rr:.4f}", f"{100 * (syn - rr):+.2f}pt"], row
    del report["per_ipc"][0]["random_real"]
    assert "pt" not in format_table(report).splitlines()[2], "no baseline, no lead"


def test_a_rerun_reuses_its_baselines_and_retrains_the_synthetic_student(tiny_run, tmp_path, capsys):
    """The same demo again: the random-real and full-real students (each seed's) come from the first run's
    entries, with its accuracies; the synthetic sets are condensed and their students trained again, to the
    same figures."""
    first = json.loads((tiny_run / "report.json").read_text())
    assert first["baselines_reused"] == [] and first["over_seeds"]["random_real_reused"] == [], "the first run trains"
    assert main(["demo", "--out", str(tmp_path / "again"), "--ipc", "4", "--eval-seeds", "2", *TINY]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["baselines_reused"] == ["random_real ipc4", "random_real ipc4 seed +1", "full_real"]
    assert again["accuracy"] == first["accuracy"] and again["over_seeds"]["accuracy"] == first["over_seeds"]["accuracy"]
    main_arms = again["per_ipc"][0]
    assert "cached" not in main_arms["synthetic"] and main_arms["random_real"]["cached"]
    assert again["full_real"]["trained_seconds"] == first["full_real"]["seconds"]
    assert "reused from an identical earlier run" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_scale_synthetic_student_beats_chance(tmp_path):
    """Quality needs a chain trained at demo scale (~10 min on 2 cores): make test-all."""
    out = tmp_path / "run"
    assert main(["demo", "--local", "--out", str(out), "--ipc", "10", "--no-full", "--test-limit", "2000",
                 "--student-steps", "300"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["synthetic"] > 0.35


def test_audit_page_renders_in_chromium(tiny_run, tmp_path, capsys):
    """`fedcondense audit` on the tiny run; audit.html loads in headless Chromium and every figure exists."""
    assert main(["audit", str(tiny_run), "--lira", "online", "--device", "cpu"]) == 2   # needs a central release
    assert "built for central-DP runs" in capsys.readouterr().err and not (tiny_run / "audit").exists()
    assert main(["audit", str(tiny_run), "--shadows", "1", "--candidates", "60", "--inverter-steps", "20",
                 "--device", "cpu"]) == 0
    page = tiny_run / "audit" / "audit.html"
    audit = json.loads((tiny_run / "audit" / "audit.json").read_text())
    assert 0 <= audit["membership"]["loss_threshold"]["auc"] <= 1 and "lira_offline" in audit["membership"]
    assert set(audit["inversion"]["settings"]) == {"no DP", "epsilon=8", "epsilon=1"}
    shipped = audit["shipped"]     # what the run ships: its teacher and its distilled student, with shadows
    for who in ("teacher", "student"):
        for attack in ("loss_threshold", "lira_offline"):
            r = shipped[who][attack]
            assert r["ci"]["auc"][0] <= r["auc"] <= r["ci"]["auc"][1] and r["empirical_epsilon"]["epsilon_lower_bound"] >= 0
    assert shipped["shadows"] == 1 and shipped["members"] == shipped["nonmembers"] > 0
    released = audit["membership"]["released_set"]["nearest_synthetic"]     # the set itself, no model
    assert released["ci"]["auc"][0] <= released["auc"] <= released["ci"]["auc"][1]
    assert audit["verdict"]["status"] == "no claim" and len(audit["verdict"]["attacks"]) == 7
    figures = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert len(figures) == 6 and all((page.parent / f).stat().st_size > 1000 for f in figures)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed for this test: `make test` installs it (apt-get install chromium)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'p1'}", "--window-size=1000,3000",
                    f"--screenshot={shot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    dom = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'p2'}", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], check=True, timeout=120, capture_output=True, text=True).stdout
    assert shot.stat().st_size > 10000 and "Membership inference" in dom
    assert 'data-broken-images="0"' in dom, "every figure decodes in the browser"
