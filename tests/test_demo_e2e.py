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


def test_audit_page_renders_in_chromium(tmp_path):
    """`fedcondense audit` on a tiny run; audit.html loads in headless Chromium and every figure exists."""
    import re
    import shutil
    import subprocess

    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "--ipc", "2", "--no-full", *TINY]) == 0
    assert main(["audit", str(out), "--shadows", "1", "--candidates", "60", "--inverter-steps", "20",
                 "--device", "cpu"]) == 0
    page = out / "audit" / "audit.html"
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert 0 <= audit["membership"]["loss_threshold"]["auc"] <= 1 and "lira_offline" in audit["membership"]
    assert set(audit["inversion"]["settings"]) == {"no DP", "epsilon=8", "epsilon=1"}
    figures = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert len(figures) == 5 and all((page.parent / f).stat().st_size > 1000 for f in figures)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed for this test: `make test` installs it (apt-get install chromium)"
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,3000",
                    f"--screenshot={shot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         check=True, timeout=120, capture_output=True, text=True).stdout
    assert shot.stat().st_size > 10000 and "Membership inference" in dom
    assert 'data-broken-images="0"' in dom, "every figure decodes in the browser"
