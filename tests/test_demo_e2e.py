"""Tiny end-to-end run of `fedcondense demo`: real data, real (tiny) training, real report."""
import json

from server.cli import main

TINY = ["--local", "--train-limit", "3000", "--test-limit", "1000", "--T", "5", "--ae-steps", "150", "--chain-steps", "120",
        "--module-steps", "3", "--student-steps", "150", "--full-epochs", "0.5", "--device", "cpu"]


def test_tiny_demo_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--ipc", "10", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("dataset", "T", "selection", "class_plan", "synthetic_images", "real_images_used", "device"):
        assert key in report
    assert report["dataset"] == "fashion-mnist" and report["T"] == 5
    assert report["synthetic_images"] == 100 and report["real_images_used"] == 500
    for k in ("synthetic", "random_real", "full_real"):
        assert 0.0 <= report["accuracy"][k] <= 1.0
    for k in ("pretrain", "condense", "student"):
        assert report["seconds"][k] >= 0
    assert report["accuracy"]["synthetic"] > 0.35, "student on synthetic images must beat chance (0.10) clearly"
    assert (out / "ipc10" / "grid.png").exists() and (out / "ipc10" / "manifest.json").exists()
    assert "random real" in capsys.readouterr().out
