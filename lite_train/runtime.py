"""Where a command runs: the torch device (`--device`) and torch's intra-op threads (`--threads`).

Threads: torch starts as many intra-op threads as there are cores, and the loader's decode workers are
processes of their own, so by default a trainer on 2 cores with 1 worker would run 2 + 1 threads on 2 cores.
Oversubscribed, torch's threads wait on each other at every operation whenever the other process is busy.
The default here is the cores this process may use (its CPU affinity, shared among the processes torchrun
started on this machine) minus the decode workers, at least 1: it costs some speed while the workers are
idle and avoids the collapse while they are busy (both measured in BENCHMARKS.md, "Threads").
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

THREADS_HELP = ("torch intra-op threads; 0 = the cores this process may use minus the decode workers "
                "(at least 1).")
DEVICE_HELP = "auto | cpu | cuda | cuda:K (torchrun: each process its own GPU)."


def usable_cores() -> int:
    """Cores in this process's CPU affinity, divided among the processes torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_threads(num_workers: int) -> int:
    """torch threads for a process that also feeds `num_workers` decode processes."""
    return max(1, usable_cores() - num_workers)


@contextlib.contextmanager
def torch_threads(threads: int, num_workers: int) -> Iterator[int]:
    """Run with `threads` intra-op threads (0 = `default_threads`), restoring the previous number after."""
    previous = torch.get_num_threads()
    n = threads or default_threads(num_workers)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str, tf32: bool = False) -> str:
    """The torch device for --device ("auto": CUDA if present); on CUDA also the float32 policy (TF32 off
    unless `tf32`, docs/fidelity.md M10). Under torchrun, "cuda" means this process's GPU (LOCAL_RANK).

    Raises:
        ValueError: a CUDA device on a machine without one, or TF32 asked for off CUDA.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device on this machine")
    if tf32 and not name.startswith("cuda"):
        raise ValueError(f"--tf32: TF32 is a CUDA setting; the device is {name}")
    if name.startswith("cuda"):
        set_tf32(tf32)
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a torch device (auto, cpu, cuda, cuda:K)") from None
    return name


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA float32 convolutions (cuDNN) and matmuls, process-wide. PyTorch turns it on for cuDNN
    convolutions by default; with it LITE's float32 logits move far beyond float32 rounding (docs/fidelity.md,
    "CUDA"), so lite-train turns it off unless `--tf32` asks for it. No effect on CPU."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
