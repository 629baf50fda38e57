"""Several worker processes under torch.distributed (`torchrun --nproc-per-node N ...`): who this process
is, and the few collective steps the server's work needs. Without a process group every helper is the
identity of one worker, so the same code runs alone and under torchrun.

Users: the chain's batches (server/condense/batches.py: shared out by index); the chain's, the teacher's
and the teacher-KD student's training (each worker takes a slice of every batch, gradients averaged); the
standard protocol's evaluators (server/distill/evaluate.py: whole passes shared out, accuracies gathered).
"""
from __future__ import annotations

import atexit
import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when a process group is up, else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_workers() -> None:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); CPU workers talk over gloo,
    GPU workers over NCCL."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_workers)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _leave_workers() -> None:
    """Destroy the process group while the interpreter is still whole: a gloo group left to the interpreter's
    teardown can abort the process ('terminate called without an active exception', pytorch/pytorch#190489)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def agreed(value):
    """Rank 0's `value` on every worker (a decision one worker makes, e.g. whether a checkpoint exists)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the workers' gradients in one flat all-reduce (each worker computed its slice's mean loss; with
    equal slices the average is the whole batch's gradient)."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_workers(value: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return value
    import torch.distributed as dist
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world()[1]


def gathered(value) -> list:
    """Every worker's `value` (any picklable object), in rank order, on every worker."""
    if world()[1] == 1:
        return [value]
    import torch.distributed as dist
    box = [None] * world()[1]
    dist.all_gather_object(box, value)
    return box


def my_slice(n: int) -> slice:
    """This worker's contiguous share of n rows (n divisible by the world size)."""
    rank, size = world()
    if n % size:
        raise ValueError(f"a batch of {n} does not split over {size} workers; use a batch size divisible by {size}")
    return slice(rank * n // size, (rank + 1) * n // size)
