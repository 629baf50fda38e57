"""The chain, the teacher and the teacher-KD student train over several torch.distributed workers (torchrun,
gloo on CPU), in real processes: every worker draws the whole batch (indices, steps and noise; jitter;
augmentations; the teacher's dropout mask), trains on its slice and averages gradients, so two workers follow
one worker's run up to the order of floating-point sums; rank 0 holds and writes the cache entries, every
worker loads them and ends with the same weights. The standard protocol's evaluator passes are shared out
whole, so two workers score every evaluator exactly as one does."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, torch
from server.condense.pretrain import load_or_train_chain
from server.distill.student import train_student
from server.distill.teacher import load_or_train_teacher
from shared.config import ChainConfig, StudentConfig
from shared.models.first_encoder import FirstEncoder
from shared.models.second_encoder import SecondEncoder
from shared.workers import join_workers, world
join_workers()
seed = int(sys.argv[2])
torch.manual_seed(seed)
e1 = FirstEncoder(1, 4, (16, 32)).eval()
images = torch.rand(256, 1, 32, 32)
labels = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(seed))
with torch.no_grad():
    latents = e1(images)
cfg = ChainConfig(T=5, layout="shared", shared_steps=12, batch_size=16, unet_channels=(16, 32), cross_attention_dim=32,
                  second_encoder_channels=16, condition_tokens=4, seed=seed)
e2, est, chain = load_or_train_chain(latents, cfg, torch.device("cpu"))
torch.manual_seed(seed)                 # the teacher's own E2, so that its comparison is the teacher's loop alone
models = {"first_encoder": e1, "second_encoder": SecondEncoder(4, 32, 4, 32).eval()}
teacher, info = load_or_train_teacher(models, latents, labels, 10, torch.device("cpu"), steps=12)
targets = torch.nn.functional.one_hot(labels[:40], 10).float()
student = train_student(images[:40], targets, StudentConfig(model="convnet3_w32", batch_size=20, steps=10, seed=seed),
                        torch.device("cpu"), loss="soft_ce:0.25,kd:1", teacher=teacher)
torch.save({"chain": {**e2.state_dict(), **{"est." + k: v for k, v in est.state_dict().items()}},
            "teacher": teacher.state_dict(), "student": student.state_dict(), "chain_path": chain["path"],
            "teacher_info": info}, f"{sys.argv[1]}.rank{world()[0]}")
"""


EVALUATE = """
import json, sys, torch
from types import SimpleNamespace
from server.distill.evaluate import LabelledSet, evaluate_sets
from shared.config import EvaluationConfig
from shared.workers import join_workers, world
join_workers()
gen = torch.Generator().manual_seed(0)
labels = torch.nn.functional.one_hot(torch.arange(10).repeat(2), 10).float()
sets = [LabelledSet(f"set{i}", torch.rand(20, 1, 16, 16, generator=gen) * 2 - 1, labels) for i in range(2)]
test = SimpleNamespace(images=torch.rand(200, 1, 16, 16, generator=gen) * 2 - 1,
                       labels=torch.randint(0, 10, (200,), generator=gen))
result = evaluate_sets(sets, test, EvaluationConfig(epochs=4, evaluators=3, width=16), torch.device("cpu"),
                       work=sys.argv[2])
if world()[0] == 0:
    open(sys.argv[1], "w").write(json.dumps(result))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, source: str, name: str, workers: int, *args: str) -> None:
    script = tmp / f"{name}.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDCONDENSE_PROGRESS": "0", "PYTHONPATH": str(REPO),
           "FEDCONDENSE_CACHE": str(tmp / f"cache-{name}"), "FEDCONDENSE_CHECKPOINT_S": "0"}
    launcher = [sys.executable] if workers == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                      str(workers), "--master-port", str(_free_port())]
    done = subprocess.run([*launcher, str(script), *args], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]


def train(tmp: Path, name: str, workers: int, seed: int = 0) -> list[dict]:
    launch(tmp, SCRIPT, name, workers, str(tmp / name), str(seed))
    return [torch.load(f"{tmp / name}.rank{r}", weights_only=False) for r in range(workers)]


def gap(a: dict, b: dict, part: str) -> float:
    return max(float((a[part][n].float() - b[part][n].float()).abs().max()) for n in a[part])


def test_two_workers_train_the_chain_teacher_and_student_one_worker_trains(tmp_path):
    """Measured (bf16 autocast on the teacher and student): two workers end within ~2e-4 (chain), ~6e-4 (teacher)
    and ~6e-5 (student) of one worker's weights, against ~0.5-1 for another seed."""
    one, = train(tmp_path, "one", 1)
    two = train(tmp_path, "two", 2)
    other, = train(tmp_path, "seed1", 1, seed=1)
    for part in ("chain", "teacher", "student"):
        assert gap(two[0], two[1], part) == 0, f"every worker ends with the same {part}"
        assert gap(one, two[0], part) < 5e-3 < 0.1 < gap(one, other, part), (part, gap(one, two[0], part),
                                                                            gap(one, other, part))
    curves = [json.loads((Path(r["chain_path"]) / "meta.json").read_text())["curves"]["chain_loss"] for r in (one, two[0])]
    assert abs(curves[0][0][1] - curves[1][0][1]) < 1e-5, "the chain's first logged loss is the whole batch's, averaged"
    entry = Path(two[0]["teacher_info"]["path"])
    assert (entry / "teacher.pt").exists() and not (entry / "training.pt").exists(), \
        "rank 0 wrote the teacher's entry and removed the loop's checkpoint"
    assert two[1]["teacher_info"]["steps"] == 12


def test_two_workers_share_out_the_evaluators_and_score_them_as_one_worker(tmp_path):
    """2 sets x 3 evaluators = 6 passes (one member each on the CPU): each worker trains three, and every
    evaluator's accuracy is the one a lone worker gets; each worker's pass checkpoints are its own and go."""
    scores = {}
    for workers in (1, 2):
        launch(tmp_path, EVALUATE, f"evaluate{workers}", workers, str(tmp_path / f"{workers}.json"),
               str(tmp_path / f"work{workers}"))
        scores[workers] = json.loads((tmp_path / f"{workers}.json").read_text())
        assert not list((tmp_path / f"work{workers}").glob("*.pt")), "every pass removed its checkpoint"
    assert [p["worker"] for p in scores[2]["passes"]] == [0, 1, 0, 1, 0, 1] and scores[2]["workers"] == 2
    assert {p["worker"] for p in scores[1]["passes"]} == {0}
    for name in ("set0", "set1"):
        assert scores[2]["sets"][name]["accuracy"] == scores[1]["sets"][name]["accuracy"]
    assert scores[1]["sets"]["set0"]["accuracy"] != scores[1]["sets"]["set1"]["accuracy"]
