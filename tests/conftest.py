"""Root test configuration.

torch and torchvision are imported before anything else: importing TensorFlow first and torchvision
afterwards in one process segfaults here (a triton symbol clash), while this order is safe. Tests that
write TFRecord fixtures import TensorFlow later, inside the test session.
"""

import torch  # noqa: F401  (must come first, see above)
import torchvision  # noqa: F401

import os


def _one_core_per_xdist_worker() -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker is pinned to a core of its own:
    lite-train's default torch threads follow the cores a process may use (lite_train/runtime.py), so a
    worker then runs one thread instead of every worker running one per core, which would oversubscribe the
    machine (oversubscribed torch threads slow down many times over, BENCHMARKS.md "Threads"). Subprocesses
    inherit the pinning."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
        torch.set_num_threads(1)


_one_core_per_xdist_worker()
