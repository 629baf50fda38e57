"""The embedded default: Flower's simulation engine with K clients on a Dirichlet split."""
import json

import pytest
import torch

from server.cli import main
from shared.accounting import ImageRelease
from shared.config import DataConfig
from shared.data import load_dataset

TINY = ["--clients", "3", "--alpha", "0.5", "--train-limit", "1500", "--test-limit", "500", "--T", "5",
        "--ae-steps", "30", "--chain-steps", "40", "--chain-batch", "32", "--module-steps", "2", "--student", "convnet3_w32", "--student-steps", "60", "--student-loss", "soft_ce", "--teacher-steps", "10", "--no-full",
        "--chunk-size", "300", "--device", "cpu", "--target-epsilon", "8"]


def test_simulated_federation_pools_every_client(tmp_path):
    out = tmp_path / "sim"
    assert main(["demo", "--out", str(out), "--ipc", "2", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    fed = report["federation"]
    assert report["mode"] == "federated" and len(fed["nodes"]) == 3
    assert len(fed["accepted_nodes"]) == 3 and not fed["dropped_nodes"] and not fed["rejections"]
    assert report["real_images_available"] == 1500, "every private image arrives once, as a latent"
    assert fed["traffic"]["encoder_sends"] == 3 and not fed["encoder_resends"], \
        "two chunks per node, the first encoder sent once to each (kept in Flower's node state)"
    provenance = [json.loads(line) for line in (out / "pool" / "provenance.jsonl").read_text().splitlines()]
    assert sum(p["latents"] for p in provenance) == 1500
    private = load_dataset(DataConfig(train_limit=1500)).private
    pooled = [sum(col) for col in zip(*(p["class_histogram"] for p in provenance))]
    assert sum(pooled) == 1500 and pooled != torch.bincount(private.labels, minlength=10).tolist(), \
        "labels arrive through randomized response"
    assert fed["uplink_bytes_per_image"] < fed["raw_bytes_per_image"]
    assert all(set(c) == {"ciphertext_bytes", "latents", "chunks", "mechanism"} for c in fed["clients"].values()), \
        "no timings or memory figures leave a device"

    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert report["privacy"]["epsilon"] == ledger["summary"]["epsilon"] <= 8.0
    g = ledger["guarantee"]
    again = ImageRelease(g["clip_norm"], g["noise_multiplier"], g["delta"], g["label_mechanism"], g["label_epsilon"],
                         g["num_classes"]).epsilon()
    assert again == pytest.approx(ledger["summary"]["epsilon"]) and g["delta"] < 1 / 1500
    assert ledger["summary"]["covers"] == "the (latent, label) pair of each record"
    assert all(r["as_the_device_reported"]["epsilon"] == pytest.approx(again) for r in ledger["releases"])
    assert all(r["cipher"].startswith("X25519") for r in ledger["releases"])

    # the audit's OUT shadows rebuild what the server held: a fresh draw of the devices' release without the
    # candidates, through the server's Wiener filter, for the teacher's shadows as for the set's
    assert main(["audit", str(out), "--shadows", "1", "--candidates", "40", "--inverter-steps", "5",
                 "--device", "cpu"]) == 0
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert audit["shipped"]["shadows"] == audit["membership"]["shadows"] == 1 and "lira_skipped" not in audit["shipped"]
    assert all("lira_offline" in audit["shipped"][who] for who in ("teacher", "student"))
    assert audit["claimed_epsilon"] == report["privacy"]["epsilon"] and audit["verdict"]["status"] != "no claim"


def test_a_new_simulation_never_merges_an_earlier_pool(tmp_path):
    """Simulated node ids change every run: an earlier run's pool must be cleared, not merged."""
    from server.federation.app import clear_earlier_simulation
    from server.federation.pool import LatentPool
    pool = LatentPool(tmp_path / "pool")
    pool.stage(11, 0, torch.zeros(3, 4, 8, 8), torch.zeros(3, dtype=torch.long))
    pool.commit(11, 1, {})
    (tmp_path / "collect_status.json").write_text("{}")
    assert LatentPool(tmp_path / "pool").committed_nodes() == {11}
    clear_earlier_simulation(tmp_path)
    assert LatentPool(tmp_path / "pool").committed_nodes() == set() and not (tmp_path / "collect_status.json").exists()
    clear_earlier_simulation(tmp_path)                      # nothing there: no error
