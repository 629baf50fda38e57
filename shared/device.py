"""Device selection (`--device auto|cpu|cuda`), mixed precision and reproducible seeding."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible; use --device cpu or auto")
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True     # fp32 matmuls outside autocast use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


@contextlib.contextmanager
def fixed_conv_kernels():
    """Convolutions inside pick cuDNN's fixed, deterministic kernels instead of the per-process autotuner
    (`cudnn.benchmark`, on for CUDA). Two runs encoding the same images then get bit-identical latents, so
    the pool's fingerprint, the chain's and teacher's cache key, repeats. No effect on CPU."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    bf16 = ",bf16 convnets" if cpu_bf16_enabled() else ""
    return f"cpu:{os.cpu_count()} cores,{torch.get_num_threads()} threads{bf16}"


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8      # mallopt options (glibc's malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed tensor memory in the process for the next training step (glibc's mallopt): large
    allocations come from the heap, not from mmap + munmap each time (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD =
    1 GiB), and every thread shares the main heap (M_ARENA_MAX = 1; Flower runs the ServerApp in a thread).
    By default each step page-faults its activations afresh. Allocation only: results are bit-identical;
    peak RSS stays with the process. Measured on a 2-core AVX2 CPU: ConvNet-3
    training 1.4x faster with 20-28x fewer page faults. Once per process; False where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = [libc.mallopt(option, value) for option, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30))]
        return all(applied)
    except (OSError, AttributeError):
        return False


CPU_PRECISION_ENV = "FEDCONDENSE_CPU_PRECISION"      # auto | bf16 | fp32 (`--cpu-precision`)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 convolutions are fast there,
    and emulated (slow) elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_bf16_enabled() -> bool:
    choice = os.environ.get(CPU_PRECISION_ENV, "auto")
    if choice not in ("auto", "bf16", "fp32"):
        raise ValueError(f"{CPU_PRECISION_ENV}={choice!r}; choose auto, bf16 or fp32")
    return choice == "bf16" or (choice == "auto" and cpu_has_native_bf16())


def cpu_bf16_key(device: torch.device) -> tuple:
    """Extra cache-key part for checkpoints trained with CPU bf16, so fp32 and bf16 runs never share
    one (empty for fp32 CPUs and CUDA, whose keys stay as they were)."""
    return ("cpu-bf16",) if device.type == "cpu" and cpu_bf16_enabled() else ()


def autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 mixed precision (no loss scaling needed): always on CUDA; on a CPU only for callers that
    pass `cpu_bf16=True` (the conv nets: students, evaluator, teacher, autoencoder, DM), and only where the
    CPU has native bf16. Measured on the 2-core AVX512-BF16 dev CPU (docs/results.md): ConvNet-3
    training 2.6x (batch 100) / 1.9x (batch 256) faster, the teacher 1.8x, the autoencoder 1.5x; the chain's small
    UNets run 1.4x SLOWER in bf16 there, so they stay fp32 on CPUs."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu_bf16 and cpu_bf16_enabled():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gpu_peak_mb(device: torch.device, reset: bool = False) -> float:
    """Peak CUDA memory allocated by torch since the last reset (MB); 0 on CPU."""
    if device.type != "cuda":
        return 0.0
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2**20
