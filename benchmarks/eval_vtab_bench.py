"""`lite-train eval-vtab` on photographs: the ordered front-end's images/s vs the decode+resize bound measured
in the same run, and the model's share of a full evaluation, as Markdown.

One ordered source (support then query, photos from benchmarks/photos.py, 224 px unless --quick):
  - bound: lite_train's exact decode + TF1 bilinear resize (`decode_resize_into`, what `--preprocess md`
    runs) in 1 and 2 concurrent single-threaded processes (benchmarks.decode_bench.measure, path "exact");
  - the query stream alone (`lite_train.data.ordered.query_batches`, batches of 40, no model) with 0, 1, 2
    workers, `--preprocess md` and `lite`, timed from the first batch to the last (worker start-up apart),
    and from the batch after the first R (R = recycled buffers; each buffer's first write faults its pages,
    a one-off per stream) to the last. The `md` rows and their bound are measured `--rounds` times,
    interleaved (0, 1, 2 workers in each round, each against its own round's bound): median and range of the
    per-round ratios. The `lite` rows are measured once;
  - a full `evaluate_task` with a LiteModel on this machine's CPU (torch single-threaded, 2 decode workers):
    images/s and the share of its wall time spent in the model (the rest: reading the support block and
    waiting for query batches).

Usage: python -m benchmarks.eval_vtab_bench [--query 1200] [--support 200] [--model-query 120] [--rounds 3]
       [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import decode_bench
from benchmarks.photos import PhotoConfig, photo_jpegs, summary
from lite_train.data.ordered import OrderedLoaderConfig, open_ordered_task, query_batches
from manifests import schema
from manifests.ordered_writer import OrderedSourceWriter, SampleOrigin

NUM_CLASSES = 10


def write_task(root: Path, name: str, images: list[bytes], support: int, query: int) -> Path:
    """An ordered source: `support` then `query` samples cycling through `images`, labels i mod 10."""
    writer = OrderedSourceWriter(root, "vtab", name, fingerprint={}, max_shard_samples=500)
    for i in range(support + query):
        role, split, index = ("support", "train", i) if i < support else ("query", "test", i - support)
        writer.add(i % NUM_CLASSES, images[i % len(images)], "jpg", SampleOrigin(role, split, split, index, 0.0))
    writer.finish([f"class_{c}" for c in range(NUM_CLASSES)], "test", {
        "origin": "benchmark", "converter_version": "0", "benchmark": "vtab1k", "dataset_spec": None,
        "sampling_spec": None, "tfds": schema.TfdsOrigin(name, None, "0", "0", "vtab1k", "label"),
        "extra": {"group": "natural"}})
    return root / "vtab" / name


def stream_rate(path: Path, size: int, workers: int, preprocess: str) -> tuple[float, float, float]:
    """(images/s from the first query batch to the last, images/s from batch R to the last, seconds to the
    first batch); R = the stream's recycled buffers (each written once by then)."""
    task = open_ordered_task(path)
    cfg = OrderedLoaderConfig(image_size=size, batch_size=40, preprocess=preprocess, num_workers=workers)
    slots = workers * cfg.prefetch_factor + 2  # as lite_train.data.ordered._batches allocates them
    start = time.perf_counter()
    arrivals = []  # (time, images) per batch
    for batch in query_batches(task, cfg):
        arrivals.append((time.perf_counter(), len(batch["labels"])))
    task.reader.close()
    if len(arrivals) <= slots + 1:
        raise ValueError(f"{len(arrivals)} query batches: need more than {slots + 1} for the steady-state rate")

    def rate(after: int) -> float:
        return sum(n for _, n in arrivals[after + 1:]) / (arrivals[-1][0] - arrivals[after][0])

    return rate(0), rate(slots), arrivals[0][0] - start


class _ModelClock:
    """Wraps a LiteModel's `features` / `classify` / support passes and sums the wall time spent in them."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0

    def __getattr__(self, name):
        method = getattr(self.model, name)
        if name not in ("set_encoder_embeddings", "film_params", "features", "features_by_chunks",
                        "fit_classifier", "classify"):
            return method

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def model_row(path: Path, size: int) -> tuple[float, float, int]:
    """(images/s, model share of the wall time, images) of one full evaluate_task with 2 decode workers."""
    from lite_train.model import LiteModel
    from lite_train.evaluate.vtab import VtabEvalConfig, evaluate_task

    torch.manual_seed(0)
    clock = _ModelClock(LiteModel().eval())
    cfg = VtabEvalConfig(data=str(path.parent.parent), checkpoint="-", image_size=size, num_workers=2)
    result = evaluate_task(clock, open_ordered_task(path), cfg, torch.device("cpu"), image_size=size)
    return result.images_per_s, clock.seconds / result.seconds, result.support_size + result.scored


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--query", type=int, default=1200, help="query images of the stream rows")
    ap.add_argument("--support", type=int, default=200)
    ap.add_argument("--model-query", type=int, default=120, help="query images of the model row")
    ap.add_argument("--model-support", type=int, default=80)
    ap.add_argument("--unique-images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurements of the md rows and bound")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 84 px")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    size = 224
    if args.quick:
        size, args.query, args.support, args.unique_images = 84, 360, 10, 12
        args.model_query, args.model_support, args.rounds = 41, 10, 1
    images = photo_jpegs(PhotoConfig(count=args.unique_images))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stream = write_task(root, "stream", images, args.support, args.query)
        with_model = write_task(root, "model", images, args.model_support, args.model_query)
        data_file = root / "images.pkl"
        data_file.write_bytes(pickle.dumps(images))
        measured: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}  # (rate, steady, start, bound)
        for r in range(args.rounds):
            bound = {p: decode_bench.measure("exact", size, p, str(data_file), 2) for p in (1, 2)}
            for pre in ("md", "lite") if r == 0 else ("md",):
                for w in (0, 1, 2):
                    measured.setdefault((pre, w), []).append((*stream_rate(stream, size, w, pre), bound[max(w, 1)]))
        model_rate, model_share, model_images = model_row(with_model, size)
    lines = [f"Query stream of one ordered source ({args.query} query images in batches of 40, drawn from "
             f"{summary(images)}), {size} px, no model. Bound = `decode_resize_into` (the `md` path) in as many "
             "concurrent single-threaded processes as workers (1 for 0 workers), same run. `lite` (PIL LANCZOS) "
             "is compared with the same bound, so its ratio also shows what LANCZOS costs. `md`: "
             f"{args.rounds} interleaved rounds (0, 1, 2 workers and the bound in each), median and [range] of the "
             "per-round ratios; `lite`: one round. Steady state: from the batch after the first R (R = 2 + 2 x "
             "workers recycled buffers, whose first write faults their pages once per stream) to the last.", "",
             "| preprocess | workers | images/s | bound images/s | ratio | ratio in steady state | "
             "seconds to first batch |", "|---|---:|---:|---:|---:|---:|---:|"]

    def cell(values: list[float], digits: int) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"

    for (pre, w), runs in measured.items():
        rates, steady, starts, bounds = (list(column) for column in zip(*runs))
        lines.append(f"| {pre} | {w} | {statistics.median(rates):.0f} | {statistics.median(bounds):.0f} | "
                     f"{cell([a / b for a, b in zip(rates, bounds)], 2)} | "
                     f"{cell([a / b for a, b in zip(steady, bounds)], 2)} | {statistics.median(starts):.2f} |")
    lines += ["", f"Full `evaluate_task` on this CPU (LiteModel, torch single-threaded, 2 decode workers, md, "
              f"{args.model_support} support + {args.model_query} query images): {model_rate:.1f} images/s; "
              f"{100 * model_share:.0f} % of the wall time is spent in the model ({model_images} images)."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
