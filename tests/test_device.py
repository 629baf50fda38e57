"""Mixed precision on CPUs: the choice, its cache keys, and that bf16 conv nets agree with fp32; the allocator setting."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.device import CPU_PRECISION_ENV, autocast, cpu_bf16_key, device_name
from shared.models.students import build_student

CPU = torch.device("cpu")


@pytest.fixture
def precision(monkeypatch):
    return lambda value: monkeypatch.setenv(CPU_PRECISION_ENV, value)


def test_cpu_precision_choice(precision):
    precision("bf16")
    with autocast(CPU, cpu_bf16=True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(CPU):                          # callers that did not opt in (the chain's UNets) stay fp32
        assert not torch.is_autocast_enabled("cpu")
    assert cpu_bf16_key(CPU) == ("cpu-bf16",) and "bf16" in device_name(CPU)
    precision("fp32")
    with autocast(CPU, cpu_bf16=True):
        assert not torch.is_autocast_enabled("cpu")
    assert cpu_bf16_key(CPU) == () and "bf16" not in device_name(CPU)
    precision("half")
    with pytest.raises(ValueError, match=CPU_PRECISION_ENV):
        autocast(CPU, cpu_bf16=True)


def test_bf16_convnet_agrees_with_fp32(precision):
    """The evaluator's logits under CPU bf16 stay close to fp32 and pick the same classes."""
    precision("bf16")
    torch.manual_seed(0)
    model = build_student("convnet3", 1, 10, 32).eval()
    x = torch.rand(64, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        with autocast(CPU, cpu_bf16=True):
            low = model(x).float()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
    assert (low.argmax(1) == ref.argmax(1)).float().mean() > 0.9


def test_cli_flag_sets_the_precision_for_every_process(monkeypatch, tmp_path):
    from server.cli import main
    monkeypatch.delenv(CPU_PRECISION_ENV, raising=False)
    code = main(["condense", "--out", str(tmp_path), "--cpu-precision", "fp32", "--data-dir", str(tmp_path / "none")])
    assert code == 2                              # no data there: a clear error, after the flag took effect
    assert os.environ[CPU_PRECISION_ENV] == "fp32"


PAGE_FAULTS = """
import resource, sys, torch, torch.nn.functional as F
from shared.models.students import build_student
if sys.argv[1] == "keep":
    from shared.device import keep_freed_memory
    assert keep_freed_memory()
torch.manual_seed(0)
model = build_student("convnet3", 1, 10)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(100, 1, 32, 32), torch.randint(0, 10, (100,))
def step():
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_steps_reuse_freed_memory():
    """With `keep_freed_memory`, ConvNet-3's training steps (batch 100: 52 MB activations) reuse freed
    heap memory; by default glibc unmaps them and every step page-faults them afresh (measured:
    20-28x the faults, and 1.3-1.4x the time, on a 2-core AVX2 CPU)."""
    run = lambda mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True,
                                          check=True, cwd=Path(__file__).parents[1]).stdout)
    default, kept = run("default"), run("keep")
    assert kept * 4 < default, (kept, default)


def test_encoding_uses_fixed_conv_kernels_and_restores_the_autotuner(monkeypatch):
    """cuDNN's per-process autotuner made the same images encode to latents that differ in the last bits,
    so on an H200 a rerun missed the chain's cache (checked there: two processes, two
    fingerprints with the autotuner, one without). E1 runs with it off and deterministic kernels on; the
    flags come back afterwards, also after an error."""
    from client.encode import encode_images
    from shared.models.first_encoder import FirstEncoder
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    e1, seen = FirstEncoder(1, 4, (8, 16)).eval(), []
    e1.register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.benchmark,
                                                     torch.backends.cudnn.deterministic)))
    encode_images(e1, torch.zeros(5, 1, 32, 32), batch_size=2)
    assert seen == [(False, True)] * 3
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    with pytest.raises(RuntimeError):
        encode_images(e1, torch.zeros(2, 3, 32, 32))             # wrong channel count
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)


def test_every_run_keeps_freed_memory_however_it_is_started(monkeypatch, tmp_path):
    """`prepare_server`, where the single-machine, simulated and deployed runs all start, applies the
    allocator setting itself: a script that called `run_simulation_demo` without the CLI trained its students
    1.3-1.5x slower. It comes first, before anything can fail."""
    from dataclasses import replace

    import server.pipeline as pipeline
    from shared.config import DataConfig, DemoConfig
    calls = []
    monkeypatch.setattr(pipeline, "keep_freed_memory", lambda: calls.append("kept") or True)
    cfg = replace(DemoConfig(), data=DataConfig(data_dir=str(tmp_path / "none")), device="cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        pipeline.prepare_server(cfg, tmp_path / "out")
    assert calls == ["kept"]
