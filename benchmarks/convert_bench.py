"""Synthetic MD records in, a Markdown table out: `lite-convert md` throughput vs copying and reading the files.

Writes N classes x M records of ~S-byte JPEG-like payloads (a JPEG magic + random bytes, framed by
`convert.tfrecord.frame`, which TF's writer matches byte for byte), then times, in one run and on the same
(page-cached) files: a raw sequential read, `shutil.copyfile` of every record file, and the `lite-convert md`
CLI (a subprocess, start-up included), then `lite-convert verify --records` over the result (manifest checks plus
a byte comparison of every image with its record). Usage: `python -m benchmarks.convert_bench --out BENCH.md`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convert.tfrecord import encode_md_example, frame


def write_synthetic(root: Path, classes: int, per_class: int, size: int, seed: int) -> int:
    """Write `<root>/bench/{0..classes-1}.tfrecords` + dataset_spec.json; returns the total file bytes."""
    rng = np.random.RandomState(seed)
    pool = rng.bytes(4 * size + 4096)  # slices of one random pool: fast, and incompressible
    folder = root / "bench"
    folder.mkdir(parents=True)
    total = 0
    for c in range(classes):
        with open(folder / f"{c}.tfrecords", "wb") as f:
            for _ in range(per_class):
                n = int(rng.randint(size * 3 // 4, size * 5 // 4))
                start = int(rng.randint(0, len(pool) - n))
                total += f.write(frame(encode_md_example(b"\xff\xd8\xff\xe0" + pool[start:start + n - 4], c)))
    spec = {"name": "bench", "classes_per_split": {"TRAIN": classes, "VALID": 0, "TEST": 0},
            "images_per_class": {str(c): per_class for c in range(classes)},
            "class_names": {str(c): f"class_{c}" for c in range(classes)},
            "path": str(folder), "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=2))
    return total


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(classes: int, per_class: int, size: int, workdir: Path, seed: int = 0) -> str:
    """Run the three measurements; returns the Markdown report."""
    records = workdir / "records"
    total = write_synthetic(records, classes, per_class, size, seed)
    files = sorted((records / "bench").glob("*.tfrecords"))
    n = classes * per_class

    def read_all() -> None:
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass

    def copy_all() -> None:
        dst = workdir / "copy"
        dst.mkdir()
        for p in files:
            shutil.copyfile(p, dst / p.name)

    def convert() -> None:
        cmd = [sys.executable, "-m", "convert.cli", "md", "--records", str(records), "--out", str(workdir / "out")]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def verify_records() -> None:
        cmd = [sys.executable, "-m", "convert.cli", "verify", str(workdir / "out"), "--records", str(records)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    rows = [("raw sequential read", _timed(read_all)), ("shutil.copyfile", _timed(copy_all)),
            ("lite-convert md", _timed(convert)), ("lite-convert verify --records (shards + records)",
                                                   _timed(verify_records))]
    copy_s = rows[1][1]
    lines = [f"Conversion throughput ({classes} classes x {per_class} records, ~{size / 1e3:.0f} KB each, "
             f"{total / 1e6:,.0f} MB of records, page-cached)", "",
             "| step | seconds | MB/s | records/s | time vs copy |", "|---|---:|---:|---:|---:|"]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.2f} | {total / 1e6 / seconds:,.0f} | {n / seconds:,.0f} | "
                     f"{seconds / copy_s:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=100_000, help="mean payload bytes")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args.classes, args.per_class, args.size, args.workdir, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
            report = run(args.classes, args.per_class, args.size, Path(tmp), args.seed)
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
