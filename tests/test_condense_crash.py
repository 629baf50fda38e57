"""Condensation and student training survive `kill -9`, and condensation shares out over workers: finished
chain batches and the students' training state are kept on disk, a restarted run continues from them, and
two torch.distributed workers (torchrun, gloo on CPU) make the same set as one process: bit for bit, in
real processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train-limit", "1500", "--test-limit", "200", "--T", "5", "--ae-steps", "30", "--chain-steps", "40",
        "--chain-batch", "32", "--module-steps", "2", "--teacher-steps", "10", "--device", "cpu", "--ipc", "30",
        "--condense-batch", "6"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEDCONDENSE_PROGRESS": "0", "PYTHONPATH": str(REPO)}


def condense(out: Path, launcher=(sys.executable, "-m", "server.cli")) -> subprocess.Popen:
    return subprocess.Popen([*launcher, "condense", "--out", str(out), *TINY], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    text, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, text.decode(errors="replace")[-3000:]
    return text.decode(errors="replace")


def tensors(out: Path) -> dict:
    return load_file(str(out / "synthetic.safetensors"))


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape and ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted process (it also trains the tiny models into the session's cache)."""
    out = tmp_path_factory.mktemp("condense") / "reference"
    finish(condense(out))
    return out


def test_a_condensation_killed_mid_way_resumes_to_the_same_set(reference, tmp_path):
    out = tmp_path / "killed"
    proc = condense(out)
    batches = out / ".batches"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(batches.glob("batch-*.safetensors"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sorted(p.name for p in batches.glob("batch-*.safetensors"))
    assert 2 <= len(kept) < 50 and not (out / "synthetic.safetensors").exists(), \
        f"killed after {len(kept)} of 50 batches (the run must be cut mid-way for this test to mean anything)"
    log = finish(condense(out))
    assert_identical(reference, out)
    import json
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["batches_resumed"] >= len(kept) and not batches.exists(), log[-2000:]


def test_two_workers_make_the_same_set_as_one(reference, tmp_path):
    out = tmp_path / "two_workers"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "server.cli")
    finish(condense(out, launcher))
    assert_identical(reference, out)
    import json
    assert json.loads((out / "manifest.json").read_text())["workers"] == 2


def student(synthetic: Path, work: Path, protocol: str) -> subprocess.Popen:
    # teacher-kd: the condensing run's models and teacher (TINY without its condensation flags)
    args = (["--epochs", "8", "--evaluators", "1", "--train-limit", "1500", "--test-limit", "200", "--device", "cpu"]
            if protocol == "standard" else ["--student-steps", "30", "--student", "convnet3_w32", *TINY[:-4]])
    return subprocess.Popen([sys.executable, "-m", "server.cli", "student", "--synthetic", str(synthetic),
                             "--protocol", protocol, "--checkpoint-dir", str(work), *args], cwd=REPO,
                            env={**ENV, "FEDCONDENSE_CHECKPOINT_S": "0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def accuracy(log: str, protocol: str):
    import json
    result = json.loads(log[log.index("{"):])
    if protocol == "standard":
        return result["sets"]["synthetic"]["accuracy"]
    assert result["protocol"] == "teacher-kd" and "kd:" in result["loss"], "the recipe's loss distils from the teacher"
    return result["accuracy"]


@pytest.mark.parametrize("protocol", ["standard", "teacher-kd"])
def test_a_student_killed_mid_training_resumes_to_the_same_model(reference, tmp_path, protocol):
    """Killed once its training state is on disk, then started again: the same accuracy, to the last bit, as
    one uninterrupted run (every generator and the optimiser restored)."""
    whole = accuracy(finish(student(reference, tmp_path / "whole", protocol)), protocol)
    work = tmp_path / "killed"
    proc = student(reference, work, protocol)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(work.glob("*.pt")):
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(work.glob("*.pt")), "killed before the first checkpoint (the test must cut the training mid-way)"
    resumed = finish(student(reference, work, protocol))
    assert accuracy(resumed, protocol) == whole and not list(work.glob("*.pt"))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher_training(out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "teacher_training.py"), str(out), "200"], cwd=REPO,
                            env={**ENV, "FEDCONDENSE_CHECKPOINT_S": "0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_a_teacher_killed_mid_training_resumes_to_the_same_weights(tmp_path):
    """The server's teacher keeps its training state like the students: killed once that state is on disk,
    started again, it ends with the uninterrupted run's weights, to the last bit."""
    import torch
    finish(teacher_training(tmp_path / "whole"))
    work = tmp_path / "killed"
    proc = teacher_training(work)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (work / "training.pt").exists():
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (work / "training.pt").exists() and not (work / "teacher.pt").exists(), \
        "killed before the first checkpoint or after the end (the test must cut the training mid-way)"
    log = finish(teacher_training(work))
    resumed_at = int(log.split("resumed_at_step=")[1].split()[0])
    assert 0 < resumed_at < 200 and not (work / "training.pt").exists(), log[-2000:]
    whole = torch.load(tmp_path / "whole" / "teacher.pt")
    again = torch.load(work / "teacher.pt")
    assert whole.keys() == again.keys() and all(whole[k].equal(again[k]) for k in whole)
