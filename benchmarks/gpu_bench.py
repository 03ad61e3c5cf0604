"""Training cost on a GPU as Markdown: peak CUDA memory and tasks/s of one training task at 224 px against the
support size N for `lite` (H = 40) and `no_lite`, in float32 and under bfloat16 autocast; whether N = 500,
H = 40 fits in 16 GB; the test path's images/s; and the share of wall time a GPU trainer waits for episodes.

Memory: for each row the model and the task's images are on the GPU first, the allocator's peak counter is
reset, then one training task runs; "task peak" is `torch.cuda.max_memory_allocated` above what was allocated
before the task, "total peak" the absolute high-water mark (model + images + task), which is what has to fit
on a card. Tasks/s is measured over the tasks after that first one (synchronised). Inputs are random images,
10 classes, 40 query images (one LITE query chunk), random backbone (the cost does not depend on the weights),
the training step exactly as the trainer runs it (`lite_task_backward` / `no_lite_backward` under the same
autocast). TF32: PyTorch's defaults unless `--no-tf32` (lite-train's own default on CUDA, `set_tf32(False)`).

`--vs-previous`: real LITE training (`train`, the loader included: one converted source of 500x375 JPEGs, MD's
variable way/shot, H = 40, float32 with TF32 off) of this tree and of the previous release
(`speed_bench.PREVIOUS_RELEASE`, extracted to bench-out/ by `git archive`; carry that folder to a machine
without the history), each in its own process, in interleaved rounds; tasks/s over the tasks after a warm-up
(timed per task through `train`'s `on_task`), what 10,000 tasks would take, the CUDA memory peak, and the
episodes' sizes (both trees must draw the same episodes). Runs on CPU too (`--device cpu`: a smoke test).

`make bench` runs it with `--recorded benchmarks/gpu_results.md`: on a machine without a GPU the section is
that file, the table of the last GPU run (`tools/gpu_check.sh` writes it), said to be recorded elsewhere.

Usage: python -m benchmarks.gpu_bench [--quick] [--device cuda] [--no-tf32] [--recorded FILE] [--out FILE.md]
       python -m benchmarks.gpu_bench --vs-previous [--quick] [--device cuda] [--workers 8] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

SUPPORT_SIZES = (50, 100, 250, 500, 1000)
IMAGE_SIZE = 224
H = 40
WAYS, QUERY = 10, 40
FIT_GB = 16


def measure(method: str, n: int, image_size: int, bf16: bool, timed_tasks: int, device) -> dict:
    """One configuration: memory of the first task, then tasks/s over `timed_tasks` more."""
    import torch

    from lite_train.model import LiteModel
    from lite_train.train.step import lite_task_backward, no_lite_backward

    torch.manual_seed(0)
    model = LiteModel().to(device).train()
    gen = torch.Generator().manual_seed(0)  # CPU generator: LITE's subset draws
    support = (torch.rand(n, 3, image_size, image_size, generator=gen) * 2 - 1).to(device)  # (N, 3, S, S)
    support_labels = (torch.arange(n) % WAYS).to(device)  # (N,)
    query = (torch.rand(QUERY, 3, image_size, image_size, generator=gen) * 2 - 1).to(device)  # (M, 3, S, S)
    query_labels = (torch.arange(QUERY) % WAYS).to(device)  # (M,)

    def task():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if method == "lite":
                lite_task_backward(model, support, support_labels, query, query_labels, h=H, chunk_size=40,
                                   tasks_per_step=16, generator=gen)
            else:
                no_lite_backward(model, support, support_labels, query, query_labels, tasks_per_step=16)

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        task()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        del model, support, query
        torch.cuda.empty_cache()
        return {"oom": True}
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    start = time.perf_counter()
    for _ in range(timed_tasks):
        task()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del model, support, query
    torch.cuda.empty_cache()
    return {"task_mb": (peak - before) / 2**20, "total_mb": peak / 2**20, "reserved_mb": reserved / 2**20,
            "tasks_per_s": timed_tasks / seconds}


def memory_rows(sizes, image_size: int, timed_tasks: int, device) -> tuple[list[str], dict]:
    rows, results = [], {}
    for method in ("lite", "no_lite"):
        for bf16 in (False, True):
            for n in sizes:
                r = results[(method, bf16, n)] = measure(method, n, image_size, bf16, timed_tasks, device)
                tag = "bf16 autocast" if bf16 else "float32"
                if r.get("oom"):
                    rows.append(f"| {method} | {tag} | {n} | out of memory | | | |")
                    continue
                rows.append(f"| {method} | {tag} | {n} | {r['task_mb']:,.0f} | {r['total_mb']:,.0f} | "
                            f"{r['reserved_mb']:,.0f} | {r['tasks_per_s']:.2f} |")
    return rows, results


def predict_rate(image_size: int, bf16: bool, device, support: int = 100, queries: int = 1000) -> float:
    """Query images/s of `LiteModel.predict` (chunks of 40, as the reference's test path), support included."""
    import torch

    from lite_train.model import LiteModel

    torch.manual_seed(0)
    model = LiteModel().to(device).eval()
    gen = torch.Generator().manual_seed(1)
    s = (torch.rand(support, 3, image_size, image_size, generator=gen) * 2 - 1).to(device)
    labels = (torch.arange(support) % WAYS).to(device)
    q = (torch.rand(queries, 3, image_size, image_size, generator=gen) * 2 - 1).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model.predict(s, labels, q[:40])
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.predict(s, labels, q)
        torch.cuda.synchronize(device)
    return queries / (time.perf_counter() - start)


def wait_share(tasks: int, image_size: int, num_workers: int, device) -> dict:
    """LITE training at `image_size` on the GPU with `num_workers` loader workers on one source of 500x375
    JPEGs (MD's variable way/shot, up to 500 support images): the share of the loop spent in next(loader)."""
    from benchmarks.train_bench import _write_source
    from lite_train.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        _write_source(Path(tmp) / "data", classes=40, per_class=60)
        cfg = TrainConfig(data=str(Path(tmp) / "data"), out=str(Path(tmp) / "run"), sources=("bench",),
                          val_sources=(), image_size=image_size, iterations=tasks, num_workers=num_workers,
                          checkpoint_every=10**9, device=str(device))
        r = train(cfg, progress=False)
    return {"share": r.wait_seconds / r.seconds, "tasks_per_s": tasks / r.seconds}


def vs_previous(quick: bool, device: str, workers: int, work: Path) -> str:
    """The `--vs-previous` section: this tree's training against the previous release's, interleaved (sized
    to fit a few minutes of a rented GPU)."""
    from benchmarks.speed_bench import training_vs_previous

    # quick: a smoke test of the section (5 classes, so the previous release's per-class inverses stay cheap on CPU)
    shape = dict(size=32, warmup=2, tasks=4, rounds=1, classes=5) if quick else dict(
        size=IMAGE_SIZE, warmup=3, tasks=30, rounds=2, classes=40)
    return training_vs_previous(**shape, device=device, workers=workers, work=work)


def run(quick: bool = False, device_name: str = "cuda", tf32: bool | None = None) -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_bench: no CUDA device here; this benchmark needs a GPU")
    if tf32 is not None:
        from lite_train.runtime import set_tf32

        set_tf32(tf32)
    device = torch.device(device_name)
    sizes, size = ((10, 20), 64) if quick else (SUPPORT_SIZES, IMAGE_SIZE)
    props = torch.cuda.get_device_properties(device)
    lines = [f"Machine: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), "
             f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}; float32 convolutions in TF32: {torch.backends.cudnn.allow_tf32}, matmuls: "
             f"{torch.backends.cuda.matmul.allow_tf32} ({'set by --no-tf32' if tf32 is False else 'PyTorch defaults'}).",
             "", f"`python -m benchmarks.gpu_bench` — one training task at {size} px, {WAYS} ways, {QUERY} query "
             f"images, random backbone; `lite` with H = {H} (query chunk 40), `no_lite` = the whole task in one "
             "graph. Task peak = CUDA memory allocated by the task above the model and images; total peak = "
             "the absolute high-water mark; reserved = what the caching allocator held.", "",
             "| method | precision | support N | task peak (MB) | total peak (MB) | reserved (MB) | tasks/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rows, results = memory_rows(sizes, size, 1 if quick else 3, device)
    lines += rows
    if not quick:
        for bf16 in (False, True):
            r = results[("lite", bf16, 500)]
            tag = "bf16 autocast" if bf16 else "float32"
            if r.get("oom"):
                lines += ["", f"N = 500, H = 40, {tag}: out of memory on this card."]
            else:
                fits = "fits" if r["reserved_mb"] <= FIT_GB * 1024 else "does not fit"
                lines += ["", f"N = 500, H = 40, {tag}: total peak {r['total_mb'] / 1024:.2f} GB, reserved "
                          f"{r['reserved_mb'] / 1024:.2f} GB: {fits} in {FIT_GB} GB."]
        lite = {n: results[("lite", False, n)] for n in sizes}
        if not any(r.get("oom") for r in lite.values()):
            lines += ["", f"lite float32 task-peak growth from N = 100 to N = 1000: "
                      f"{100 * (lite[1000]['task_mb'] / lite[100]['task_mb'] - 1):+.1f} %."]
    rates = {bf16: predict_rate(size, bf16, device, queries=200 if quick else 1000) for bf16 in (False, True)}
    lines += ["", f"Test path (`LiteModel.predict`, 100 support images, query chunks of 40) at {size} px: "
              f"{rates[False]:,.0f} query images/s in float32, {rates[True]:,.0f} under bf16 autocast."]
    tasks = 4 if quick else 30
    for workers in ((2,) if quick else (2, 8)):
        w = wait_share(tasks, size, workers, device)
        lines += ["", f"Waiting for episodes on the GPU: LITE training (float32, H = 40, MD variable way/shot, up "
                  f"to 500 support images) at {size} px with {workers} loader workers, {tasks} tasks: the "
                  f"trainer waited for the next episode {100 * w['share']:.1f} % of the wall time "
                  f"({w['tasks_per_s']:.2f} tasks/s, the first task's start-up included)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 px, N in {10, 20}, 4 tasks of waiting")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-tf32", action="store_true", help="float32 without TF32, as lite-train runs on CUDA")
    ap.add_argument("--recorded", default=None, help="without a GPU: report this recorded table instead")
    ap.add_argument("--vs-previous", action="store_true",
                    help="only real training, this tree vs the previous release")
    ap.add_argument("--workers", type=int, default=8, help="--vs-previous: loader workers")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    if args.vs_previous:
        text = vs_previous(args.quick, args.device, args.workers, Path(__file__).resolve().parents[1] / "bench-out")
    elif args.recorded and not torch.cuda.is_available():
        text = ("No GPU on this machine: the table below was recorded by `python -m benchmarks.gpu_bench` on the "
                f"machine it names (`{args.recorded}`).\n\n" + Path(args.recorded).read_text())
    else:
        text = run(quick=args.quick, device_name=args.device, tf32=False if args.no_tf32 else None)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
