"""The server survives its own crash, on a real deployment on 127.0.0.1 (TLS, node authentication, the
fleet-only gateway, 3 SuperNodes): the SuperLink and its ServerApp are killed with SIGKILL during the
collection, and again during condensation, then started again with the same database; a second `flwr run`
on the same output folder completes, its ledger lists every pooled node, and its synthetic set is bit for
bit the set of an uninterrupted run. `make test-all` (minutes); `make test` runs the short variant in
tests/test_condense_crash.py."""
import json
import os
import signal
import time

import pytest
from safetensors.torch import load_file

from tests.flower_cluster import running_cluster
from tests.test_deployment import wait_report

pytestmark = pytest.mark.slow

RUN = ("clients=3 train-limit=1200 test-limit=300 T=5 ae-steps=30 chain-steps=30 chain-batch=32 module-steps=1 "
       "student='convnet3_w32' student-steps=20 student-loss='soft_ce' teacher-steps=10 ipc=10 no-full=true "
       "timeout=40 chunk-size={chunk} retries=2 condense-batch=2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("crash"), [f"partition-id={i} num-partitions=3" for i in range(3)]) as cl:
        try:
            yield cl
        finally:
            kill_server_apps(cl)


def start_run(cluster, out, chunk: int = 300):
    import subprocess
    from tests.flower_cluster import BIN, REPO
    return subprocess.Popen([str(BIN / "flwr"), "run", ".", "fed", "--run-config", f"out='{out}' {RUN.format(chunk=chunk)}",
                             "--stream"],
                            cwd=REPO, env=cluster.env, stdout=open(out.parent / f"{out.name}.flwr.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_server_apps(cluster) -> None:
    """SIGKILL every ServerApp process of this cluster (found by its FLWR_HOME), wherever it was started."""
    home = f"FLWR_HOME={cluster.root / 'flwr_home'}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if b"flwr-serverapp" in cmd and home in env:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def crash_and_restart(cluster, proc) -> None:
    """kill -9 the SuperLink and its ServerApp, then start the SuperLink again on its database."""
    cluster.kill("superlink")
    kill_server_apps(cluster)
    proc.kill()
    time.sleep(1)
    cluster.start_superlink()


def wait_for(check, proc, what: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        assert proc.poll() is None or check(), f"the run ended before {what}"
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def committed(out) -> int:
    path = out / "pool" / "provenance.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    report = wait_report(start_run(cluster, out), out)
    assert len(report["federation"]["accepted_nodes"]) == 3
    return out


def assert_same_set(a, b) -> None:
    ta, tb = load_file(str(a / "ipc10" / "synthetic.safetensors")), load_file(str(b / "ipc10" / "synthetic.safetensors"))
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def assert_every_node_in_the_ledger(out, report) -> None:
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    pooled = {json.loads(line)["node_id"] for line in (out / "pool" / "provenance.jsonl").read_text().splitlines()}
    assert len(pooled) == 3 and {r["node_id"] for r in ledger["releases"]} == pooled
    assert set(report["federation"]["accepted_nodes"]) == pooled


def test_server_killed_during_collection(cluster, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_run(cluster, out)
    wait_for(lambda: 1 <= committed(out) < 3, proc, "the first node's commit")
    crash_and_restart(cluster, proc)
    kept = committed(out)
    report = wait_report(start_run(cluster, out), out)
    assert len(report["federation"]["resumed_nodes"]) == kept >= 1
    assert_every_node_in_the_ledger(out, report)
    assert any(r["committed_by_an_earlier_run"] for r in json.loads((out / "privacy_ledger.json").read_text())["releases"])
    assert_same_set(reference, out)


def test_server_killed_during_condensation(cluster, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_run(cluster, out)
    batches = out / ".condense-ipc10"
    wait_for(lambda: len(list(batches.glob("batch-*.safetensors"))) >= 2, proc, "two chain batches")
    crash_and_restart(cluster, proc)
    kept = len(list(batches.glob("batch-*.safetensors")))
    assert kept < 50 and not (out / "ipc10" / "synthetic.safetensors").exists()
    report = wait_report(start_run(cluster, out), out)
    assert len(report["federation"]["resumed_nodes"]) == 3, "every node came from the pool, none was asked again"
    assert_every_node_in_the_ledger(out, report)
    meta = json.loads((out / "ipc10" / "manifest.json").read_text())
    assert meta["batches_resumed"] >= kept
    assert_same_set(reference, out)


def test_a_supernode_killed_mid_collection_is_taken_back(cluster, reference, tmp_path):
    """One SuperNode is SIGKILLed once every node's first chunk is in, and started again with the same key
    (the SuperLink takes it back once the old session's heartbeats have lapsed). The server's retries and
    the late reply it accepts keep the node in: pooled, in the ledger, and the set is the uninterrupted run's."""
    out = tmp_path / "run"
    proc = start_run(cluster, out, chunk=50)                  # 8 chunks a node: a window to kill one in
    status = out / "collect_status.json"

    def first_chunks_in() -> bool:
        try:
            pending = json.loads(status.read_text())["pending"]
        except (OSError, ValueError, KeyError):
            return False
        return len(pending) == 3 and all(c >= 1 for c in pending.values())
    deadline = time.time() + 400
    while not first_chunks_in() and time.time() < deadline:
        time.sleep(0.05)
    assert first_chunks_in(), "the collection never had every node under way"
    cluster.kill("node2")
    deadline = time.time() + 240
    while time.time() < deadline:             # the SuperLink refuses the key until the old session lapses
        node = cluster.start_supernode(2, "partition-id=2 num-partitions=3")
        time.sleep(15)
        if node.poll() is None:
            break
    deadline = time.time() + 600                 # the ServerApp goes on whether or not `flwr run` still streams
    while not (out / "report.json").exists() and time.time() < deadline:
        time.sleep(1)
    proc.kill()
    assert (out / "report.json").exists(), (out.parent / "run.flwr.log").read_text(errors="replace")[-3000:]
    report = json.loads((out / "report.json").read_text())
    fed = report["federation"]
    assert len(fed["accepted_nodes"]) == 3 and not fed["dropped_nodes"], fed["dropped_nodes"]
    assert fed["retries"] or fed["late_replies"], "the node was asked again or answered late"
    assert_every_node_in_the_ledger(out, report)
    assert_same_set(reference, out)
