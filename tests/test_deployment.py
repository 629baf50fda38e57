"""Deployment on 127.0.0.1: a SuperLink bound to loopback with TLS and node authentication, the fleet-only
gateway, and 3 SuperNodes: two read their own folders (class folders of PNGs; IDX files), one a share of
the bundled dataset."""
import json
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from shared.config import DataConfig
from shared.data import stored_splits
from tests.flower_cluster import BIN, REPO, running_cluster

# timeout: each request starts a fresh ClientApp process on every node (~5 s of CPU to import torch and
# diffusers); beside `make test`'s other worker, healthy nodes once took over 20 s. A healthy node that misses
# one wait is asked again, with 1.5x the wait, and its late reply accepted (retries=1): it has 20 + 30 s in all,
# and the killed node costs those 50 s of the run.
# chunk-size: the partitions hold 231 / 422 / 547 images, so two rounds, and the killed node has one to go.
TINY = ("clients=3 train-limit=1200 test-limit=300 T=5 ae-steps=30 chain-steps=30 chain-batch=32 module-steps=1 "
        "student='convnet3_w32' student-steps=20 student-loss='soft_ce' teacher-steps=10 ipc=2 no-full=true timeout=20 chunk-size=300 retries=1")


FOLDER_IMAGES = (150, 250)     # node 0: class folders of PNGs; node 1: IDX files


def write_device_folders(root):
    """Two devices' own data, as their operators would lay it out (images of the test split)."""
    test = stored_splits(DataConfig()).test
    png, idx = root / "device0", root / "device1"
    for i in range(FOLDER_IMAGES[0]):
        folder = png / ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"][int(test.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.pixels[i]).save(folder / f"{i}.png")
    idx.mkdir()
    pixels, labels = test.pixels[1000:1000 + FOLDER_IMAGES[1]], test.labels[1000:1000 + FOLDER_IMAGES[1]].numpy()
    (idx / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + np.array(pixels.shape, ">u4").tobytes()
                                                  + pixels.tobytes())
    (idx / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array([len(labels)], ">u4").tobytes()
                                                  + labels.astype(np.uint8).tobytes())
    return png, idx


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    png, idx = write_device_folders(root)
    with running_cluster(root, [f"data-dir='{png}'", f"data-dir='{idx}'", "partition-id=2 num-partitions=3"],
                         spare_keys=1) as cl:
        yield cl


def start_run(cluster, out, federation="fed"):
    return subprocess.Popen([str(BIN / "flwr"), "run", ".", federation, "--run-config", f"out='{out}' {TINY}", "--stream"],
                            cwd=REPO, env=cluster.env, stdout=open(out.parent / f"{out.name}.flwr.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_report(proc, out, timeout=420):
    """The run's report; a run whose `flwr run --stream` has ended without one fails at once, with its log."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (out / "report.json").exists():
        if proc.poll() is not None:
            deadline = min(deadline, time.time() + 10)
        time.sleep(1)
    proc.kill()
    assert (out / "report.json").exists(), (out.parent / f"{out.name}.flwr.log").read_text(errors="replace")[-3000:]
    return json.loads((out / "report.json").read_text())


def test_the_control_api_is_closed_to_the_network(cluster, tmp_path):
    """`flwr run` from outside the server host (through the public gateway) is refused, and starts nothing."""
    runs = lambda: json.loads(cluster.flwr("ls", "fed", "--format", "json").stdout)["runs"]
    before = len(runs())
    res = cluster.flwr("run", ".", "remote", "--run-config", f"out='{tmp_path / 'intruder'}' {TINY}", timeout=120)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "only the Fleet API passes" in cluster.log("gateway"), cluster.log("gateway")[-2000:]
    assert len(runs()) == before and not (tmp_path / "intruder").exists()


def test_keys_are_private_and_certificates_verify_strictly(cluster):
    import os
    c = cluster.certs
    for key in [c["server_key"], str(cluster.root / "certs" / "ca.key"), *(n["private"] for n in c["nodes"])]:
        assert os.stat(key).st_mode & 0o777 == 0o600, key
    res = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", c["ca"], c["server_cert"]],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_unregistered_node_is_refused(cluster):
    proc = cluster.start_supernode(3, "partition-id=0 num-partitions=3")
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("an unregistered SuperNode kept running:\n" + cluster.log("node3")[-2000:])
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in cluster.log("node3")
    assert "No SuperNode found with the given public key" in cluster.log("superlink")


@pytest.mark.slow       # `make test-all`; CI covers TLS + node auth end to end in the kill -9 test below
def test_run_end_to_end_over_tls(cluster, tmp_path):
    out = tmp_path / "run"
    report = wait_report(start_run(cluster, out), out)
    fed = report["federation"]
    assert report["mode"] == "federated" and len(fed["accepted_nodes"]) == 3 and not fed["dropped_nodes"]
    from shared.partition import partition
    share = partition(stored_splits(DataConfig(train_limit=1200)).private.labels.numpy(), 3, iid=False, alpha=0.5,
                      seed=0)[2]
    assert report["synthetic_images"] == 20 and report["real_images_available"] == sum(FOLDER_IMAGES) + len(share)
    assert fed["uplink_bytes_per_image"] < fed["raw_bytes_per_image"]
    assert (out / "ipc2" / "synthetic.safetensors").exists()


def test_killed_supernode_is_dropped_and_pool_stays_clean(cluster, tmp_path):
    """Over TLS with node authentication: one SuperNode is killed -9 mid-collection; the run ends with
    the other two, and the pool holds exactly their committed submissions."""
    out = tmp_path / "run"
    proc = start_run(cluster, out)
    deadline = time.time() + 300
    status = out / "collect_status.json"
    while time.time() < deadline and proc.poll() is None:
        if status.exists() and json.loads(status.read_text())["requests"] >= 1:
            break
        time.sleep(0.5)
    assert status.exists(), "collection never started:\n" + (out.parent / "run.flwr.log").read_text(errors="replace")[-3000:]
    cluster.kill("node2")
    report = wait_report(proc, out)
    fed = report["federation"]
    assert report["mode"] == "federated" and len(fed["accepted_nodes"]) == 2 and len(fed["dropped_nodes"]) == 1
    assert fed["uplink_bytes_per_image"] < fed["raw_bytes_per_image"] and (out / "ipc2" / "synthetic.safetensors").exists()
    reason = next(iter(fed["dropped_nodes"].values()))
    assert ("no reply" in reason and "after 1 retries" in reason and fed["retries"]) or "error" in reason, reason
    pool = out / "pool"
    assert sorted(p.name for p in pool.iterdir() if p.suffix == ".tmp") == []
    assert len(list(pool.glob("node-*.safetensors"))) == 2
    assert len((pool / "provenance.jsonl").read_text().splitlines()) == 2
    provenance = [json.loads(line) for line in (pool / "provenance.jsonl").read_text().splitlines()]
    assert report["real_images_available"] == sum(p["latents"] for p in provenance)
    assert {p["node_id"] for p in provenance} == set(fed["accepted_nodes"])
