"""The chain trains over several torch.distributed workers (torchrun, gloo on CPU), in real processes: every
worker draws the whole batch, trains on its slice and averages gradients, so two workers follow one worker's
run up to the order of floating-point sums; rank 0 holds and writes the cache entry, every worker loads it."""
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
from shared.config import ChainConfig
from shared.workers import join_workers, world
join_workers()
latents = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(5))
cfg = ChainConfig(T=5, layout="shared", shared_steps=12, batch_size=16, unet_channels=(16, 32), cross_attention_dim=32,
                  second_encoder_channels=16, condition_tokens=4, seed=int(sys.argv[2]))
e2, est, info = load_or_train_chain(latents, cfg, torch.device("cpu"))
torch.save({"e2": e2.state_dict(), "est": est.state_dict(), "path": info["path"]}, f"{sys.argv[1]}.rank{world()[0]}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp: Path, name: str, workers: int, seed: int = 0) -> dict:
    script = tmp / "chain_workers.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDCONDENSE_PROGRESS": "0", "PYTHONPATH": str(REPO),
           "FEDCONDENSE_CACHE": str(tmp / f"cache-{name}")}
    launcher = [sys.executable] if workers == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                      str(workers), "--master-port", str(_free_port())]
    done = subprocess.run([*launcher, str(script), str(tmp / name), str(seed)], cwd=REPO, env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return [torch.load(f"{tmp / name}.rank{r}") for r in range(workers)]


def gap(a: dict, b: dict) -> float:
    return max(float((a[k][n] - b[k][n]).abs().max()) for k in ("e2", "est") for n in a[k])


def test_two_workers_train_the_chain_one_worker_trains(tmp_path):
    one, = train(tmp_path, "one", 1)
    two = train(tmp_path, "two", 2)
    other_seed, = train(tmp_path, "seed1", 1, seed=1)
    assert gap(two[0], two[1]) == 0, "every worker loads the entry rank 0 wrote"
    assert gap(one, two[0]) < 1e-3 < gap(one, other_seed), (gap(one, two[0]), gap(one, other_seed))
    curves = [json.loads((Path(r["path"]) / "meta.json").read_text())["curves"]["chain_loss"] for r in (one, two[0])]
    assert abs(curves[0][0][1] - curves[1][0][1]) < 1e-5, "the first step's loss is the whole batch's, averaged"
