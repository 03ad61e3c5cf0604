"""Photographs (benchmarks/photos.py) -> decode+resize speed of TF vs lite_train paths and the pixel error
of lite_train's exact and fast modes against TF, as Markdown tables.

Paths (each timed in its own subprocess; TF never shares a process with torch or lite_train):
  tf    : tf.io.decode_jpeg + tf.compat.v1.image.resize_images(BILINEAR, align_corners=True), x/127.5-1
  exact : lite_train.data.decode.decode_resize_into (TF-equal pixels)
  fast  : same with dct_scale=True (libjpeg DCT-domain downscale first)
  pil   : PIL decode + PIL resize(BILINEAR), x/127.5-1 (antialiased, not MD-equal; for scale)
With --procs 2, two workers of the same path start together (stdin barrier) and their rates are summed.
Error: TF's resized float pixels (computed in a subprocess) vs exact and fast, in [0, 255] units, over
every value of the first --error-images images.

Usage: python -m benchmarks.decode_bench [--images 500] [--sizes 84 126 224] [--procs 1 2] [--quick]
       [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.photos import PhotoConfig, photo_jpegs, summary

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("tf", "exact", "fast", "pil")


def _make_fn(path: str, size: int):
    """Returns f(bytes) -> None for one path; imports only what that path needs."""
    if path == "tf":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def f(b):
            img = tf.io.decode_jpeg(b, channels=3)
            r = tf.compat.v1.image.resize_images(img, [size, size], tf.image.ResizeMethod.BILINEAR, align_corners=True)
            return r / 127.5 - 1.0

        return f
    if path == "tf-reference":  # MD's pixels before normalisation, (size, size, 3) float32 in [0, 255]
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def g(b):
            img = tf.io.decode_jpeg(b, channels=3)
            return tf.compat.v1.image.resize_images(img, [size, size], tf.image.ResizeMethod.BILINEAR,
                                                    align_corners=True)

        return lambda b: g(b).numpy()
    if path in ("exact", "fast"):
        from lite_train.data.decode import decode_resize_into

        out = np.empty((3, size, size), np.float32)
        fast = path == "fast"
        return lambda b: decode_resize_into(b, out, size, dct_scale=fast)
    if path == "pil":
        import io

        from PIL import Image

        def f(b):
            im = Image.open(io.BytesIO(b)).convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1.0

        return f
    raise ValueError(path)


def _worker_env() -> dict:
    """Single-threaded subprocesses with TF's log noise off."""
    return dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")


def _worker(path: str, size: int, data_file: str, repeat: int) -> None:
    with open(data_file, "rb") as fh:
        images = pickle.load(fh)
    f = _make_fn(path, size)
    for b in images[:20]:  # warm-up: tracing, table caches
        f(b)
    print("ready", flush=True)
    sys.stdin.readline()  # barrier: parent releases all workers together
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        for b in images:
            f(b)
        best = max(best, len(images) / (time.perf_counter() - t))
    print(f"rate {best:.1f}", flush=True)


def _tf_reference(size: int, data_file: str, n: int, out_file: str) -> None:
    """Subprocess: TF's resized pixels of the first n images -> out_file, (n, size, size, 3) float32."""
    with open(data_file, "rb") as fh:
        images = pickle.load(fh)[:n]
    f = _make_fn("tf-reference", size)
    np.save(out_file, np.stack([f(b) for b in images]))


def pixel_error(images: list[bytes], size: int, reference: np.ndarray, dct_scale: bool) -> dict:
    """|lite_train - TF| over every value, [0, 255] units: mean, p99, max, share of values off by > 1.

    reference: (n, size, size, 3) float32, TF's resized pixels of images[:n].
    """
    from lite_train.data.decode import decode_resize_into

    out = np.empty((3, size, size), np.float32)
    diffs = np.empty(reference.shape, np.float32)  # (n, size, size, 3)
    for i, ref in enumerate(reference):
        decode_resize_into(images[i], out, size, dct_scale=dct_scale)
        diffs[i] = np.abs((out.transpose(1, 2, 0) + 1.0) * 127.5 - ref)
    flat = diffs.ravel()
    return {"mean": float(flat.mean()), "p99": float(np.percentile(flat, 99)), "max": float(flat.max()),
            "over1": float((flat > 1.0).mean())}


def measure(path: str, size: int, procs: int, data_file: str, repeat: int) -> float:
    """Aggregate images/s of `procs` single-threaded workers running `path` concurrently."""
    cmd = [sys.executable, "-m", "benchmarks.decode_bench", "--worker", path, str(size), data_file, str(repeat)]
    workers = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_worker_env(),
                                cwd=_REPO) for _ in range(procs)]
    for p in workers:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"worker {path}/{size} failed to start: {line!r}")
    for p in workers:
        p.stdin.write("go\n")
        p.stdin.flush()
    total = 0.0
    for p in workers:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker {path}/{size} exited {p.returncode}")
        total += float(out.split()[-1])
    return total


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500, help="photos timed per pass")
    ap.add_argument("--error-images", type=int, default=200, help="photos whose pixel error is measured")
    ap.add_argument("--sizes", type=int, nargs="+", default=[84, 126, 224])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--repeat", type=int, default=3, help="passes per worker; the best is kept")
    ap.add_argument("--seed", type=int, default=0, help="photo fixture seed")
    ap.add_argument("--quick", action="store_true", help="smoke test: a few images, 84 and 224 px, 1 process")
    ap.add_argument("--out", default=None, help="also write the Markdown tables here")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.error_images, args.sizes, args.procs, args.repeat = 16, 4, [84, 224], [1], 1

    images = photo_jpegs(PhotoConfig(count=max(args.images, args.error_images), seed=args.seed))
    n_err = args.error_images
    with tempfile.TemporaryDirectory() as tmp:
        data_file = os.path.join(tmp, "images.pkl")
        with open(data_file, "wb") as fh:
            pickle.dump(images[:args.images], fh)
        err_file = os.path.join(tmp, "errors.pkl")
        with open(err_file, "wb") as fh:
            pickle.dump(images[:n_err], fh)
        speed = []
        for size in args.sizes:
            for procs in args.procs:
                rates = {p: measure(p, size, procs, data_file, args.repeat) for p in args.paths}
                speed.append((size, procs, rates))
        errors = []
        for size in args.sizes:
            ref_file = os.path.join(tmp, f"ref{size}.npy")
            subprocess.run([sys.executable, "-m", "benchmarks.decode_bench", "--tf-reference", str(size), err_file,
                            str(n_err), ref_file], check=True, env=_worker_env(), cwd=_REPO)
            reference = np.load(ref_file)
            errors += [(size, mode, pixel_error(images, size, reference, mode == "fast")) for mode in ("exact", "fast")]
            del reference

    lines = [f"Speed: {summary(images[:args.images])}; images/s, best of {args.repeat} passes "
             "(ratio to tf; fast/exact = fast mode's images/s over the exact mode's)", "",
             "| size | procs | " + " | ".join(args.paths) + (" | fast/exact |" if {"fast", "exact"} <= set(args.paths) else " |"),
             "|---:|---:|" + "---:|" * (len(args.paths) + ({"fast", "exact"} <= set(args.paths)))]
    for size, procs, rates in speed:
        tf_rate = rates.get("tf")
        cells = [f"{r:.0f}" + (f" ({r / tf_rate:.2f})" if tf_rate else "") for r in rates.values()]
        if "fast" in rates and "exact" in rates:
            cells.append(f"{rates['fast'] / rates['exact']:.2f}")
        lines.append(f"| {size} | {procs} | " + " | ".join(cells) + " |")
    lines += ["", f"Pixel error against TF's decode + TF1 resize on the first {n_err} of these photos, every value "
              "(size x size x 3 per image) in [0, 255] units (the loader's output x 127.5 + 127.5):", "",
              "| size | mode | mean abs diff | p99 | max | values off by > 1 level |", "|---:|---|---:|---:|---:|---:|"]
    for size, mode, e in errors:
        lines.append(f"| {size} | {mode} | {e['mean']:.3g} | {e['p99']:.3g} | {e['max']:.3g} | {100 * e['over1']:.1f} % |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)
    return table


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--tf-reference":
        _tf_reference(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
