"""Generated JPEGs in a TFDS manual folder in, a Markdown table out: `lite-convert vtab` images/s against a plain
read of the same TFDS records, all measured in one run.

The records are genuine: TFDS's own `resisc45` 3.0.0 builder prepares them offline (`download_and_prepare`
from `--manual-dir`, through `convert.vtab.convert.open_builder`, the converter's own call) from a
`NWPU-RESISC45/<class>/<class>_<i>.jpg` folder of 256x256 JPEGs (RESISC45's real shape; re-encoded crops of
the photographs of `benchmarks/photos.py`, quality 95). RESISC45 has one TFDS split (`train`), so protocol
`lite` (support `train[0:1000]`, query `train[1000:]`) reads every example exactly once whatever the count,
where `vtab1k`'s slices would need all 31,500 images. Then, on the page-cached record files, best to worst:

  - raw read: the record files read sequentially (`open().read`), for scale;
  - `tf.data.TFRecordDataset` over the record files, serialized records iterated as NumPy bytes (no parsing);
  - `builder.as_dataset` of the converter's slices with the image left encoded (`SkipDecoding`) and its read
    config, iterated through `tfds.as_numpy`: the converter's read path without the writing;
  - `lite-convert vtab --tasks resisc45 --protocol lite` (a subprocess: interpreter, TensorFlow import,
    planning and conversion), and the converting part alone (the summary's `seconds`).

Each read row is repeated and each conversion written into a fresh output folder; the table gives the median
and the range. TensorFlow and TFDS are imported in this process (class names, the read rows), torch never.

Usage: python -m benchmarks.vtab_convert_bench [--images 3000] [--repeat 5] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.photos import PhotoConfig, photo_jpegs

TASK = "resisc45"
PROTOCOL = "lite"
SIDE = 256  # RESISC45's images are 256x256 JPEGs
QUALITY = 95  # gives ~28 kB per image on these photographs
_REPO = Path(__file__).resolve().parents[1]


def square_jpegs(unique: int, side: int = SIDE, quality: int = QUALITY) -> list[bytes]:
    """`unique` side x side JPEGs: the centre square of each fixture photograph, resized (bicubic), re-encoded."""
    from PIL import Image

    out = []
    for data in photo_jpegs(PhotoConfig(count=unique)):
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            s = min(w, h)
            small = im.convert("RGB").resize((side, side), Image.BICUBIC,
                                             box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_manual_dir(manual: Path, images: list[bytes], count: int, class_names: list[str]) -> int:
    """RESISC45's extracted layout under `manual`: `count` files cycling through `images` over the classes
    (`NWPU-RESISC45/<class>/<class>_<i>.jpg`); returns their total bytes."""
    total = 0
    for i in range(count):
        label = class_names[i % len(class_names)]
        folder = manual / "NWPU-RESISC45" / label
        folder.mkdir(parents=True, exist_ok=True)
        total += (folder / f"{label}_{i // len(class_names) + 1:03d}.jpg").write_bytes(images[i % len(images)])
    return total


def _prepare(tfds_dir: str, manual_dir: str) -> None:
    """Child process: prepare resisc45 exactly as `lite-convert vtab --manual-dir` would."""
    from convert.vtab.convert import VtabConfig, open_builder
    from convert.vtab.registry import get_task

    open_builder(get_task(TASK), VtabConfig(tfds_data_dir=tfds_dir, out=os.devnull, manual_dir=manual_dir))


def _env() -> dict:
    return dict(os.environ, COLUMNS="200", TF_CPP_MIN_LOG_LEVEL="3")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _converter_seconds(summary: str, source: str) -> float:
    """The `seconds` column of the summary row of `source` (its conversion without start-up and planning)."""
    row = next(line for line in summary.splitlines() if source in line)
    return float(row.replace("│", " ").split()[-1])


def plain_reads(builder, reads, files: list[str], count: int, repeat: int) -> list[tuple[str, list[float]]]:
    """(row name, seconds of each timed pass) of the three plain reads, each after one untimed warm-up pass."""
    from convert.vtab.convert import _tfds

    tfds = _tfds()
    import tensorflow as tf

    def raw_read() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 20):
                    pass

    def tfrecord_read() -> None:
        n = sum(1 for _ in tf.data.TFRecordDataset(files).as_numpy_iterator())
        if n != count:
            raise RuntimeError(f"TFRecordDataset gave {n} records, {count} expected")

    def as_dataset_read() -> None:  # what convert.vtab.convert._read_slice runs, without the writing
        n = 0
        for r in reads:
            ds = builder.as_dataset(split=f"{r.slice.split}[{r.slice.start}:{r.slice.start + r.count}]",
                                    shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                                    read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1))
            n += sum(len(ex["image"]) > 0 for ex in tfds.as_numpy(ds))
        if n != count:
            raise RuntimeError(f"as_dataset gave {n} examples, {count} expected")

    rows = []
    for name, fn in (("raw read of the record files", raw_read),
                     ("`tf.data.TFRecordDataset`, serialized records, no parsing", tfrecord_read),
                     ("`builder.as_dataset(SkipDecoding)`, the converter's slices, via `tfds.as_numpy`",
                      as_dataset_read)):
        fn()  # warm-up: page cache, tf.data graph building
        rows.append((name, [_timed(fn) for _ in range(repeat)]))
    return rows


def conversions(tfds_dir: Path, workdir: Path, runs: int) -> tuple[list[float], list[float], int]:
    """`runs` CLI conversions into fresh folders: (whole-command seconds, converting seconds, stored image
    bytes of the last one)."""
    import pyarrow.parquet as pq

    from convert.vtab.registry import PROTOCOL_GROUP

    group = PROTOCOL_GROUP[PROTOCOL]
    whole, inside, stored = [], [], 0
    for i in range(runs):
        out = workdir / f"out{i}"
        start = time.perf_counter()
        summary = subprocess.run(
            [sys.executable, "-m", "convert.cli", "vtab", "--tfds-data-dir", str(tfds_dir), "--out", str(out),
             "--tasks", TASK, "--protocol", PROTOCOL], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, cwd=_REPO, env=_env()).stdout
        whole.append(time.perf_counter() - start)
        inside.append(_converter_seconds(summary, f"{group}/{TASK}"))
        stored = int(pq.read_table(out / group / TASK / "samples.parquet", columns=["size"]).column(0).to_numpy().sum())
        shutil.rmtree(out)
    return whole, inside, stored


def measure(workdir: Path, count: int, unique: int, repeat: int) -> str:
    """Prepare the dataset under `workdir`, time every row; returns the Markdown."""
    from convert.vtab.convert import VtabConfig, _tfds, open_builder, plan_task
    from convert.vtab.registry import get_task

    images = square_jpegs(unique)
    manual, tfds_dir = workdir / "manual", workdir / "tfds"
    class_names = _tfds().builder(get_task(TASK).tfds_spec, data_dir=str(tfds_dir)).info.features["label"].names
    image_bytes = write_manual_dir(manual, images, count, class_names)
    prepare_s = _timed(lambda: subprocess.run(
        [sys.executable, "-c", "import sys; from benchmarks.vtab_convert_bench import _prepare; _prepare(*sys.argv[1:])",
         str(tfds_dir), str(manual)], check=True, cwd=_REPO, env=_env()))
    config = VtabConfig(tfds_data_dir=str(tfds_dir), out=str(workdir / "unused"), tasks=(TASK,), protocol=PROTOCOL)
    builder = open_builder(get_task(TASK), config)
    reads = plan_task(TASK, config).reads
    if sum(r.count for r in reads) != count:
        raise RuntimeError(f"the {PROTOCOL} slices read {sum(r.count for r in reads)} of {count} examples")
    files = sorted(str(p) for p in Path(builder.data_path).glob(f"{builder.name}-train.tfrecord-*"))
    record_bytes = sum(os.path.getsize(f) for f in files)

    rows = plain_reads(builder, reads, files, count, repeat)
    whole, inside, stored = conversions(tfds_dir, workdir, max(1, repeat - 1))
    rows += [("`lite-convert vtab`, whole command (interpreter, TF import, planning, conversion)", whole),
             ("… of which converting (summary `seconds`)", inside)]
    tfrecord_s, as_dataset_s = statistics.median(rows[1][1]), statistics.median(rows[2][1])
    lines = [f"One genuinely prepared TFDS dataset: `{TASK}` 3.0.0 prepared offline by TFDS's own builder from a "
             f"manual folder of {count:,} generated {SIDE}x{SIDE} JPEGs ({len(images)} distinct crops of "
             f"`benchmarks/photos.py`'s photographs, quality {QUALITY}, mean {image_bytes / count / 1e3:.0f} kB, "
             f"{image_bytes / 1e6:.0f} MB) into {len(files)} record file(s) of {record_bytes / 1e6:.0f} MB "
             f"(preparation, once: {prepare_s:.1f} s). Converted with `--protocol {PROTOCOL}` (support "
             f"`train[0:1000]`, query `train[1000:{count}]`: every example once). Page-cached; median of "
             f"{repeat} reads / {len(whole)} conversions into fresh folders (range in brackets). Stored image bytes "
             f"equal the JPEG files' bytes: {'yes' if stored == image_bytes else 'NO'}.", "",
             "| step | seconds | images/s | MB/s of records | images/s vs `as_dataset` read | "
             "vs `TFRecordDataset` read |", "|---|---:|---:|---:|---:|---:|"]
    for name, values in rows:
        med, lo, hi = _spread(values)
        lines.append(f"| {name} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {count / med:,.0f} | {record_bytes / 1e6 / med:,.0f} | "
                     f"{as_dataset_s / med:.2f} | {tfrecord_s / med:.2f} |")
    return "\n".join(lines) + "\n"


def run(quick: bool = False, images: int = 3000, unique: int = 300, repeat: int = 5) -> str:
    """The Markdown section; `quick`: 1,010 images (protocol lite needs more than 1,000), 12 distinct, 1 repeat."""
    if quick:
        images, unique, repeat = 1010, 12, 1
    if images <= 1000:
        raise ValueError("--images must exceed 1000: protocol lite's support is train[0:1000]")
    with tempfile.TemporaryDirectory(prefix="vtab-convert-bench-") as tmp:
        return measure(Path(tmp), images, unique, repeat)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000, help="images in the manual folder (> 1000)")
    ap.add_argument("--unique", type=int, default=300, help="distinct JPEGs among them")
    ap.add_argument("--repeat", type=int, default=5, help="timed reads per read row (conversions: one fewer)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1,010 images, one repeat")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    table = run(args.quick, args.images, args.unique, args.repeat)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
