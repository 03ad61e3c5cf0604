"""`lite-train eval-vtab` on photographs: the ordered front-end's images/s vs the decode+resize bound measured
in the same run, and the model's share of a full evaluation, as Markdown.

One ordered source (support then query, photos from benchmarks/photos.py, 224 px unless --quick):
  - bound: lite_train's exact decode + TF1 bilinear resize (`decode_resize_into`, what `--preprocess md`
    runs) in 1 and 2 concurrent single-threaded processes (benchmarks.decode_bench.measure, path "exact");
  - the query stream alone (`lite_train.data.ordered.query_batches`, batches of 40, no model) with 0, 1, 2
    workers, `--preprocess md` and `lite`, timed from the first batch to the last (worker start-up apart);
  - a full `evaluate_task` with a LiteModel on this machine's CPU (torch single-threaded, 2 decode workers):
    images/s and the share of its wall time spent in the model (the rest: reading the support block and
    waiting for query batches).

Usage: python -m benchmarks.eval_vtab_bench [--query 1200] [--support 200] [--model-query 120] [--quick]
       [--out FILE.md]
"""

from __future__ import annotations

import argparse
import pickle
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


def stream_rate(path: Path, size: int, workers: int, preprocess: str) -> tuple[float, float]:
    """(images/s from the first query batch to the last, seconds to the first batch)."""
    task = open_ordered_task(path)
    cfg = OrderedLoaderConfig(image_size=size, batch_size=40, preprocess=preprocess, num_workers=workers)
    start = time.perf_counter()
    first = None
    count = 0
    for batch in query_batches(task, cfg):
        if first is None:
            first = time.perf_counter()
        else:
            count += len(batch["labels"])
    end = time.perf_counter()
    return count / (end - first), first - start


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
    from lite_train.vtab import VtabEvalConfig, evaluate_task

    torch.manual_seed(0)
    clock = _ModelClock(LiteModel().eval())
    cfg = VtabEvalConfig(data=str(path.parent.parent), checkpoint="-", image_size=size, num_workers=2)
    result = evaluate_task(clock, open_ordered_task(path), cfg, torch.device("cpu"))
    return result.images_per_s, clock.seconds / result.seconds, result.support_size + result.scored


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--query", type=int, default=1200, help="query images of the stream rows")
    ap.add_argument("--support", type=int, default=200)
    ap.add_argument("--model-query", type=int, default=120, help="query images of the model row")
    ap.add_argument("--model-support", type=int, default=80)
    ap.add_argument("--unique-images", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 84 px")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    size = 224
    if args.quick:
        size, args.query, args.support, args.unique_images = 84, 81, 10, 12
        args.model_query, args.model_support = 41, 10
    images = photo_jpegs(PhotoConfig(count=args.unique_images))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stream = write_task(root, "stream", images, args.support, args.query)
        with_model = write_task(root, "model", images, args.model_support, args.model_query)
        data_file = root / "images.pkl"
        data_file.write_bytes(pickle.dumps(images))
        bound = {p: decode_bench.measure("exact", size, p, str(data_file), 2) for p in (1, 2)}
        rows = [(pre, w, *stream_rate(stream, size, w, pre)) for pre in ("md", "lite") for w in (0, 1, 2)]
        model_rate, model_share, model_images = model_row(with_model, size)
    lines = [f"Query stream of one ordered source ({args.query} query images in batches of 40, drawn from "
             f"{summary(images)}), {size} px, no model. Bound = `decode_resize_into` (the `md` path) in as many "
             "concurrent single-threaded processes as workers (1 for 0 workers), same run. `lite` (PIL LANCZOS) "
             "is compared with the same bound, so its ratio also shows what LANCZOS costs.", "",
             "| preprocess | workers | images/s | bound images/s | ratio | seconds to first batch |",
             "|---|---:|---:|---:|---:|---:|"]
    for pre, w, rate, startup in rows:
        b = bound[max(w, 1)]
        lines.append(f"| {pre} | {w} | {rate:.0f} | {b:.0f} | {rate / b:.2f} | {startup:.2f} |")
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
