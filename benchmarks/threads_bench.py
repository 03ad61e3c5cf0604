"""Threads as Markdown: meta-training tasks/s with 0, 1 and 2 loader workers at 32 and 84 px, with lite-train's
default torch threads (the cores this process may use minus the workers, `lite_train.runtime`) against
torch's own default (one thread per core, which the workers then compete with), side by side.

The last rows add a CPU-bound neighbour (a busy loop on one core, as a loader worker that decodes all the
time, or any other job, would be) to a run without workers: threads = cores - 1 against threads = cores.

Each row is one `lite-train train` run in a fresh process (thread settings are process-wide) on the same
seeded episodes: LITE with H = 10 on the demo's episode law (up to 5 ways, 20 support images, 4 query images
per class), Simple CNAPs, random backbone, two converted sources of 30 classes x 30 JPEGs of 100-200 px.
Tasks/s counts the tasks after the first `WARMUP`; the configurations run in interleaved rounds and each
row keeps its best round, so a slow spell of a shared machine hits all rows alike.

Usage: python -m benchmarks.threads_bench [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.run import emit

WORKERS = (0, 1, 2)
SIZES = (32, 84)
WARMUP = 3


def _write_sources(root: Path, classes: int = 30, per_class: int = 30) -> None:
    """Two converted sources of random smooth JPEGs (100-200 px a side), 20/5/5 class splits."""
    from PIL import Image

    from manifests import ClassRecord, SourceWriter

    rng = np.random.RandomState(0)
    for name in ("bench_a", "bench_b"):
        spec = {"__class__": "DatasetSpecification", "name": name,
                "classes_per_split": {"TRAIN": classes - 10, "VALID": 5, "TEST": 5},
                "images_per_class": {str(c): per_class for c in range(classes)},
                "class_names": {str(c): f"class_{c}" for c in range(classes)}, "path": "",
                "file_pattern": "{}.tfrecords"}
        writer = SourceWriter(root, "md", name, fingerprint={}, max_shard_samples=1000)
        for c in range(classes):
            for i in range(per_class):
                h, w = rng.randint(100, 201, size=2)
                small = rng.randint(0, 256, size=(6, 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR).save(buf, format="JPEG", quality=90)
                writer.add(c, i, buf.getvalue(), "jpg")
        splits = ["train"] * (classes - 10) + ["valid"] * 5 + ["test"] * 5
        writer.finish([ClassRecord(c, f"class_{c}", splits[c], None, per_class) for c in range(classes)],
                      dict(origin="benchmark", converter_version="0", benchmark="md-v1", dataset_spec=spec,
                           sampling_spec=spec))


def measure(data: str, image_size: int, workers: int, threads: int, tasks: int) -> dict:
    """One run in this process: tasks/s after the warm-up tasks, and the threads torch used."""
    import torch

    from lite_train.train import TrainConfig, train

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=data, out=str(Path(tmp) / "run"), sources=("bench_a", "bench_b"), val_sources=(),
                          image_size=image_size, iterations=tasks, tasks_per_step=2, h=10, max_way_train=5,
                          max_support_train=20, max_query_train=4, learning_rate=0.005, num_workers=workers,
                          threads=threads, checkpoint_every=10**9)
        used = []
        train(cfg, progress=False, on_task=lambda task, stats: (times.append(time.perf_counter()),
                                                                  used.append(torch.get_num_threads())))
    timed = times[WARMUP - 1:]
    return {"tasks_per_s": (len(timed) - 1) / (timed[-1] - timed[0]), "threads": used[-1]}


def run(quick: bool = False) -> str:
    from lite_train.runtime import usable_cores

    cores = usable_cores()
    sizes, workers, tasks, rounds = ((32,), (0, 1), WARMUP + 2, 1) if quick else (SIZES, WORKERS, 30, 2)
    best: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _write_sources(Path(tmp) / "data", classes=16 if quick else 30, per_class=8 if quick else 30)
        for _ in range(rounds):
            for size in sizes:
                for w in workers:
                    for threads in (0, cores):  # 0 = lite-train's default rule; cores = torch's own default
                        out = subprocess.run([sys.executable, "-m", "benchmarks.threads_bench", "--measure",
                                              str(Path(tmp) / "data"), str(size), str(w), str(threads), str(tasks)],
                                             check=True, capture_output=True, text=True)
                        r = json.loads(out.stdout.strip().splitlines()[-1])
                        key = (size, w, threads)
                        if key not in best or r["tasks_per_s"] > best[key]["tasks_per_s"]:
                            best[key] = r
                neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    for threads in (max(1, cores - 1), cores):
                        out = subprocess.run([sys.executable, "-m", "benchmarks.threads_bench", "--measure",
                                              str(Path(tmp) / "data"), str(size), "0", str(threads), str(tasks)],
                                             check=True, capture_output=True, text=True)
                        r = json.loads(out.stdout.strip().splitlines()[-1])
                        key = (size, "busy", threads)
                        if key not in best or r["tasks_per_s"] > best[key]["tasks_per_s"]:
                            best[key] = r
                finally:
                    neighbour.kill()
                    neighbour.wait()
    lines = [f"`lite-train train` tasks/s on this machine ({cores} usable cores), LITE H = 10, the demo's episode "
             f"law, {tasks - WARMUP} timed tasks per run, best of {rounds} interleaved rounds. Default threads = "
             "the usable cores minus the loader workers (at least 1); torch's default = one per core.", "",
             "| image px | loader workers | default: threads | tasks/s | torch's default: threads | tasks/s | "
             "default / torch's |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        for w in workers:
            ours, theirs = best[(size, w, 0)], best[(size, w, cores)]
            lines.append(f"| {size} | {w} | {ours['threads']} | {ours['tasks_per_s']:.2f} | {theirs['threads']} | "
                         f"{theirs['tasks_per_s']:.2f} | {ours['tasks_per_s'] / theirs['tasks_per_s']:.2f}x |")
    for size in sizes:
        fewer, all_cores = best[(size, "busy", max(1, cores - 1))], best[(size, "busy", cores)]
        lines.append(f"| {size} | 0 + a busy neighbour | {fewer['threads']} | {fewer['tasks_per_s']:.2f} | "
                     f"{all_cores['threads']} | {all_cores['tasks_per_s']:.2f} | "
                     f"{fewer['tasks_per_s'] / all_cores['tasks_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 32 px, 0 and 1 workers, 2 timed tasks")
    ap.add_argument("--out", default=None)
    ap.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        data, size, workers, threads, tasks = args.measure
        print(json.dumps(measure(data, int(size), int(workers), int(threads), int(tasks))))
        return ""
    text = run(quick=args.quick)
    return emit(text, args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
