"""Synthetic ImageNet-like JPEGs -> images/s of TF vs lite_train decode+resize paths, as a Markdown table.

Paths (each measured in its own subprocess; TF never shares a process with torch or lite_train):
  tf    : tf.io.decode_jpeg + tf.compat.v1.image.resize_images(BILINEAR, align_corners=True), x/127.5-1
  exact : lite_train.data.decode.decode_resize_into (TF-equal pixels)
  fast  : same with dct_scale=True (libjpeg DCT-domain downscale first)
  pil   : PIL decode + PIL resize(BILINEAR), x/127.5-1 (antialiased, not MD-equal; for scale)
With --procs 2, two workers of the same path start together (stdin barrier) and their rates are summed.

Usage: python benchmarks/decode_bench.py --images 300 --sizes 84 224 --procs 1 2 --out bench.md
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

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("tf", "exact", "fast", "pil")


def make_images(n: int, seed: int = 0, h: int = 375, w: int = 500) -> list[bytes]:
    """n natural-ish JPEGs (gradients, blurred shapes, fine texture), q93, 4:2:0."""
    import simplejpeg
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        base = np.stack([a * x / w + b * y / h + c for a, b, c in rng.uniform(-120, 120, (3, 3))], -1) + 128
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(rng.integers(6, 14)):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=fill)
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.5))))
        # Fine-grained texture brings the file size (entropy-decoding work) close to real ILSVRC JPEGs (~110 kB).
        noise = rng.normal(0, float(rng.uniform(8, 16)), (h, w, 3))
        a = np.clip(np.asarray(im, np.float32) + noise, 0, 255).astype(np.uint8)
        out.append(simplejpeg.encode_jpeg(a, quality=93, colorspace="RGB", colorsubsampling="420"))
    return out


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
    if path in ("exact", "fast"):
        sys.path.insert(0, _REPO)
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


def measure(path: str, size: int, procs: int, data_file: str, repeat: int) -> float:
    """Aggregate images/s of `procs` single-threaded workers running `path` concurrently."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, str(size), data_file, str(repeat)]
    workers = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
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
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[84, 224])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--repeat", type=int, default=3, help="passes per worker; the best is kept")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)

    images = make_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        data_file = os.path.join(tmp, "images.pkl")
        with open(data_file, "wb") as fh:
            pickle.dump(images, fh)
        rows = []
        for size in args.sizes:
            for procs in args.procs:
                rates = {p: measure(p, size, procs, data_file, args.repeat) for p in args.paths}
                rows.append((size, procs, rates))
    head = f"{args.images} JPEGs 500x375 q93 4:2:0, mean {np.mean([len(b) for b in images]) / 1e3:.1f} kB; images/s (ratio to tf)"
    lines = [head, "", "| size | procs | " + " | ".join(args.paths) + " |", "|---:|---:|" + "---:|" * len(args.paths)]
    for size, procs, rates in rows:
        tf_rate = rates.get("tf")
        cells = [f"{r:.0f}" + (f" ({r / tf_rate:.2f})" if tf_rate else "") for r in rates.values()]
        lines.append(f"| {size} | {procs} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)
    return table


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        main()
