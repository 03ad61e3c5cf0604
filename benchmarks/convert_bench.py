"""Synthetic MD records in, Markdown tables out: `lite-convert md` throughput vs copying the same files, and the
memory of converting + verifying a source of millions of tiny samples.

Table 1 writes one dataset of N classes x M records of ~S-byte JPEG-like payloads (a JPEG magic + random bytes,
framed by `convert.tfrecord.frame`, which TF's writer matches byte for byte), then times, in one run and on the
same (page-cached) files: a raw sequential read, `shutil.copyfile` of every record file (without and with an
fsync of each copy), the `lite-convert md` CLI with `--workers 1` and its default (one worker per core; no fsync)
and with `--workers 1 --fsync` (subprocesses, start-up included; one dataset, so the workers split its runs),
and `lite-convert verify --records` over the result. The shard limit is set so that the dataset has several runs
(`manifests.writer.plan_runs`) for the workers to share. Every step starts after an (untimed) `os.sync()`, so
that none pays for writing back what an earlier one left dirty.

Table 2 writes sources of `--tiny-samples` (default 5 million) and of a fifth of that ~100-byte samples through
`SourceWriter` (what `lite-convert md` runs per sample, without the record parsing) and verifies each, every step
in its own process, and reports the peak RSS of each; the text extrapolates the growth between the two sizes to
quickdraw (~50 million samples).

Table 1 runs 5 rounds of every step, in order, and reports each step's best round (a single copy of 1 GB moved
by a third between runs here; in rounds, a slow spell of this shared machine hits the copy and the converter
alike). Each step's output is fingerprinted (sha256 per shard) and deleted, untimed, before the next step, so no
step pays for reclaiming the page cache of earlier ones; the identity check compares those fingerprints.

Usage: `python -m benchmarks.convert_bench --out BENCH.md` (`--tiny-samples 0`: table 1 only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convert.tfrecord import encode_md_example, frame

QUICKDRAW_SAMPLES = 50_426_266  # MD's quickdraw: 345 classes


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
    os.sync()  # nothing left dirty by an earlier step is written back during this one
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "convert.cli", *args], check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, COLUMNS="200")).stdout


def _converter_seconds(summary: str) -> float:
    """The `seconds` column of `lite-convert md`'s summary row for md/bench: its work without start-up."""
    row = next(line for line in summary.splitlines() if "md/bench" in line)
    return float(row.replace("│", " ").split()[-1])


def throughput(classes: int, per_class: int, size: int, runs: int, workdir: Path, seed: int = 0,
               repeat: int = 5) -> str:
    """Table 1: read, copy, convert with 1 worker and the default, verify --records; `repeat` rounds of every
    step, each row the best of its rounds; returns the Markdown."""
    records = workdir / "records"
    total = write_synthetic(records, classes, per_class, size, seed)
    files = sorted((records / "bench").glob("*.tfrecords"))
    n = classes * per_class
    shard_bytes = total // runs + 1  # a run per ~1/runs of the records: work for every worker

    def read_all() -> None:
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass

    def copy_all(durable: bool = False) -> None:
        dst = workdir / ("copy-fsync" if durable else "copy")
        dst.mkdir()
        for p in files:
            shutil.copyfile(p, dst / p.name)
            if durable:  # what the converter pays for durability: every shard is fsynced before it counts
                with open(dst / p.name, "rb") as f:
                    os.fsync(f.fileno())

    inside: dict[str, list[float]] = {}  # output folder -> the converter's own summary seconds, per round
    digests: dict[str, dict[str, str]] = {}

    def _name(workers: int | None, flags: tuple[str, ...]) -> str:
        return f"out-{workers or 'default'}{''.join(flags)}"

    def convert(workers: int | None, *flags: str):
        """The CLI with `--workers workers` (None: its default, one per core) and `flags`."""
        def run() -> None:
            name = _name(workers, flags)
            inside.setdefault(name, []).append(_converter_seconds(_cli(
                "md", "--records", str(records), "--out", str(workdir / name), "--max-shard-bytes", str(shard_bytes),
                *flags, *(() if workers is None else ("--workers", str(workers))))))
        return run

    def fingerprint(output: str) -> None:
        source = workdir / output / "md" / "bench"
        if source.is_dir():
            digests[output] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                               for p in sorted(source.iterdir()) if p.name != "source.json"}

    from convert.md import default_workers

    cores = default_workers()
    one, default, durable = _name(1, ()), _name(None, ()), _name(1, ("--fsync",))
    # (row, step, the folder it writes, the folder removed after it, the label of its "of which" row). Every
    # output is fingerprinted and removed (untimed) right after its step, except `one`, which the verify step
    # reads: a conversion into a finished output would be a no-op, and outputs left in the page cache would make
    # every later step pay for reclaiming memory (on a VM with little spare RAM, several GB of them slowed later
    # writers several-fold).
    steps = [("raw sequential read", read_all, None, None, None),
             ("shutil.copyfile", copy_all, "copy", "copy", None),
             ("shutil.copyfile + fsync of each copy", lambda: copy_all(durable=True), "copy-fsync", "copy-fsync",
              None),
             ("lite-convert md --workers 1", convert(1), one, None, "--workers 1"),
             ("lite-convert verify --records (shards + records)",
              lambda: _cli("verify", str(workdir / one), "--records", str(records)), None, one, None),
             (f"lite-convert md (default --workers: one per core, {cores} here)", convert(None), default, default,
              "default --workers"),
             ("lite-convert md --workers 1 --fsync", convert(1, "--fsync"), durable, durable, "--workers 1 --fsync")]
    times: dict[str, list[float]] = {row: [] for row, *_ in steps}
    read_all()  # page-cache the records, so that every step below reads from memory
    for _ in range(repeat):  # rounds of every step, so that a slow spell of the machine hits all steps alike
        for row, step, writes, removes, _label in steps:
            times[row].append(_timed(step))
            if writes is not None:
                fingerprint(writes)
            if removes is not None:
                shutil.rmtree(workdir / removes)
    of_which = "… of which converting (summary `seconds`, no start-up)"  # the same run without interpreter start-up
    rows = []
    for row, _step, writes, _removes, label in steps:
        rows.append((row, min(times[row])))
        if label is not None:
            rows.append((f"{of_which}, {label}", min(inside[writes])))
    outputs = [digests.get(name) for name in (one, default, durable)]
    identical = bool(outputs[0]) and outputs[0] == outputs[1] == outputs[2]
    copy_s = rows[1][1]
    lines = [f"Conversion throughput: one dataset of {classes} classes x {per_class} records, ~{size / 1e3:.0f} KB "
             f"each, {total / 1e6:,.0f} MB of records, page-cached; `--max-shard-bytes {shard_bytes}` cuts it into "
             f"{runs} runs. Output of 1 worker, the default ({cores}) and `--fsync` byte-identical: "
             f"{'yes' if identical else 'NO'}. By default the converter does not fsync (a killed conversion loses "
             f"nothing and resumes; staged shards are re-checked first), like the plain copy; `--fsync` fsyncs every "
             f"shard, manifest and folder before it counts, like the copy + fsync row (what durability against a "
             f"power loss costs on this disk). {repeat} rounds, each running every step once in this order; each "
             "row is the best of its rounds; ratio: throughput / shutil.copyfile's, same run.", "",
             "| step | seconds | MB/s | records/s | ratio to copyfile |", "|---|---:|---:|---:|---:|"]
    for name, seconds in rows:
        if seconds <= 0:  # the converter's summary shows hundredths of a second: a tiny (--quick) run can show 0.00
            lines.append(f"| {name} | < 0.005 | | | |")
            continue
        lines.append(f"| {name} | {seconds:.2f} | {total / 1e6 / seconds:,.0f} | {n / seconds:,.0f} | "
                     f"{copy_s / seconds:.2f} |")
    return "\n".join(lines) + "\n"


def _write_tiny(root: str, samples: str, classes: str) -> None:
    """Child process: `samples` tiny samples in `classes` classes through SourceWriter."""
    from manifests import ClassRecord, SourceWriter

    samples, classes = int(samples), int(classes)
    per_class = np.full(classes, samples // classes)
    per_class[: samples % classes] += 1
    payload = b"\xff\xd8\xff\xe0" + bytes(range(96))
    writer = SourceWriter(Path(root), "md", "tiny", fingerprint={"samples": samples})
    for c, count in enumerate(per_class.tolist()):
        for i in range(count):
            writer.add(c, i, payload, "jpg")
    writer.finish([ClassRecord(c, f"class_{c}", "train", None, int(n)) for c, n in enumerate(per_class)],
                  dict(origin="benchmark", converter_version="0", benchmark="md-v1", dataset_spec=None,
                       sampling_spec=None))


def _imports_only() -> None:
    """Child process: what verify pays before its first sample (interpreter, NumPy, pyarrow and the pandas its
    first `pa.array` / `to_numpy` imports, manifests; the writer itself never imports pandas)."""
    import pyarrow as pa

    import manifests.verify  # noqa: F401
    from manifests.writer import warm_up

    warm_up()
    pa.array([0])


def _verify_tiny(root: str) -> None:
    from manifests import verify_source

    verify_source(Path(root) / "md" / "tiny")


def _peak_rss_in_child(fn: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `fn(*args)` run in a fresh process.

    The peak is the child's own VmHWM (Linux), read by the child when done: its rusage `ru_maxrss` would also
    count the copy of this process it was forked from before exec."""
    code = (f"import sys; from benchmarks.convert_bench import {fn}; {fn}(*sys.argv[1:]); "
            "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')).split()[1])")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{fn} failed with status {proc.returncode}")
    return seconds, int(proc.stdout.split()[-1]) / 1024


def memory(samples: int, classes: int, workdir: Path) -> str:
    """Table 2: peak RSS of writing and verifying sources of `samples` // 5 and `samples` tiny samples (the
    growth between the two is what a larger source adds); returns the Markdown."""
    sizes = (samples // 5, samples)
    rows = []
    for n in sizes:
        root = workdir / f"tiny{n}"
        rows.append(("write (SourceWriter, manifests streamed)", n,
                     *_peak_rss_in_child("_write_tiny", str(root), str(n), str(classes))))
        rows.append(("verify (verify_source, record batches)", n, *_peak_rss_in_child("_verify_tiny", str(root))))
        shard_mb = sum(p.stat().st_size for p in (root / "md" / "tiny").glob("*.tar")) / 1e6
        shutil.rmtree(root)
    _, base = _peak_rss_in_child("_imports_only")
    lines = [f"Memory at scale: sources of {sizes[0]:,} and {sizes[1]:,} samples of 100 bytes in {classes} classes "
             f"(the larger: {shard_mb:,.0f} MB of shards), each step in a fresh process.", "",
             "| step | samples | seconds | samples/s | peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
    for name, n, seconds, rss in sorted(rows, key=lambda r: (not r[0].startswith("write"), r[1])):
        lines.append(f"| {name} | {n:,} | {seconds:.1f} | {n / seconds:,.0f} | {rss:,.0f} |")
    lines.append(f"| imports only (interpreter, NumPy, pyarrow + pandas, manifests) | | | | {base:,.0f} |")
    text = []
    for name, what in (("write", "the writer"), ("verify", "verify")):
        small, large = (rss for step, _, _, rss in rows if step.startswith(name))
        span = f"from {sizes[0] / 1e6:g} M to {sizes[1] / 1e6:g} M samples ({small:,.0f} → {large:,.0f} MB)"
        if large <= small:
            text.append(f"{what}'s peak did not grow {span}, so quickdraw ({QUICKDRAW_SAMPLES / 1e6:.1f} M samples) "
                        f"needs about the same")
            continue
        per_sample = (large - small) * 2**20 / (sizes[1] - sizes[0])
        quickdraw = large + per_sample * (QUICKDRAW_SAMPLES - sizes[1]) / 2**20
        text.append(f"{what}'s peak grew {span}, {per_sample:.1f} bytes per sample, so quickdraw "
                    f"({QUICKDRAW_SAMPLES / 1e6:.1f} M samples) needs about {quickdraw:,.0f} MB")
    lines += ["", f"The writer holds at most one shard's rows (100,000 samples by default) plus one manifest part; "
                  f"verify reads samples.parquet and index.npy one record batch at a time (an ordered VTAB task keeps "
                  f"its two class columns). Extrapolated linearly from the two sizes: {text[0]}; {text[1]}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown tables to this file")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=100_000, help="mean payload bytes")
    parser.add_argument("--runs", type=int, default=8, help="runs the dataset is cut into")
    parser.add_argument("--tiny-samples", type=int, default=5_000_000, help="samples of the memory table (0: none)")
    parser.add_argument("--tiny-classes", type=int, default=345)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def both(workdir: Path) -> str:
        report = throughput(args.classes, args.per_class, args.size, args.runs, workdir, args.seed)
        return report + "\n" + memory(args.tiny_samples, args.tiny_classes, workdir) if args.tiny_samples else report

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = both(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
            report = both(Path(tmp))
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
