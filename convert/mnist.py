"""MNIST t10k idx files in, `<out>/md/mnist/` out: the 10,000 test digits as MD's extra `mnist` source.

Reproduces CNAPs/LITE `prepare_extra_dataset.py` + MD's `write_tfrecord_from_directory`: each 28×28 digit is
resized to 84×84 RGB with PIL LANCZOS and (as MD's writer re-encodes non-JPEG files) JPEG-encoded with PIL
defaults (quality 75), or stored as PNG with `lossless`. Within a class the order is that of the file
names `image_<i>.png` (i = per-class running counter) sorted as strings: image_0, image_1, image_10, ...
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import struct
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from manifests.staging import output_lock, source_dir
from manifests.writer import ClassRecord, SourceWriter

from convert._common import SourceResult, converter_version, published_result, source_result
from convert.md import GROUP

SOURCE = "mnist"
IMAGES_FILE = "t10k-images-idx3-ubyte"
LABELS_FILE = "t10k-labels-idx1-ubyte"
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_SIDE = 28
_OUT_SIDE = 84
_NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class MnistConfig:
    """`lite-convert mnist` settings; one field per CLI flag. Saved in source.json `extra["convert_config"]`."""

    idx_dir: str  # folder with t10k-{images-idx3,labels-idx1}-ubyte[.gz]
    out: str  # output root; the source goes to <out>/md/mnist/
    lossless: bool = False  # store PNG instead of MD's quality-75 JPEG
    fsync: bool = False  # fsync every file and folder before it counts (survives a power loss; not saved)


def _find(idx_dir: Path, name: str) -> Path:
    for candidate in (idx_dir / name, idx_dir / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{idx_dir / name}[.gz]: missing")


def _read_idx(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot be read: {e}") from None


def read_mnist_idx(idx_dir: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[Path, Path]]:
    """(images [N, 28, 28] uint8, labels [N] uint8, (images file, labels file)); every header checked."""
    idx_dir = Path(idx_dir)
    images_path, labels_path = _find(idx_dir, IMAGES_FILE), _find(idx_dir, LABELS_FILE)
    raw = _read_idx(images_path)
    if len(raw) < 16:
        raise ValueError(f"{images_path}: {len(raw)} bytes, shorter than the 16-byte idx3 header")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != _IMAGES_MAGIC:
        raise ValueError(f"{images_path}: magic number {magic}, expected {_IMAGES_MAGIC} (idx3 ubyte images)")
    if (rows, cols) != (_SIDE, _SIDE):
        raise ValueError(f"{images_path}: images are {rows}x{cols}, expected {_SIDE}x{_SIDE}")
    if len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{images_path}: header says {n} images ({16 + n * rows * cols} bytes), "
                         f"file has {len(raw)} bytes")
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    raw = _read_idx(labels_path)
    if len(raw) < 8:
        raise ValueError(f"{labels_path}: {len(raw)} bytes, shorter than the 8-byte idx1 header")
    magic, m = struct.unpack(">II", raw[:8])
    if magic != _LABELS_MAGIC:
        raise ValueError(f"{labels_path}: magic number {magic}, expected {_LABELS_MAGIC} (idx1 ubyte labels)")
    if len(raw) != 8 + m:
        raise ValueError(f"{labels_path}: header says {m} labels, file has {len(raw) - 8}")
    if m != n:
        raise ValueError(f"{labels_path}: {m} labels for {n} images in {images_path.name}")
    labels = np.frombuffer(raw, np.uint8, offset=8)
    bad = np.flatnonzero(labels >= _NUM_CLASSES)
    if bad.size:
        raise ValueError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} is not a digit 0..9")
    return images, labels, (images_path, labels_path)


def md_file_order(n: int) -> list[int]:
    """Per-class running indices in MD's order: names `image_<i>.png` sorted as strings."""
    return sorted(range(n), key=lambda i: f"image_{i}.png")


def encode_digit(image: np.ndarray, lossless: bool) -> bytes:
    """28×28 uint8 -> 84×84 RGB (PIL LANCZOS) -> JPEG (PIL defaults, quality 75) or PNG bytes."""
    from PIL import Image

    rgb = Image.fromarray(image).convert("RGB").resize((_OUT_SIDE, _OUT_SIDE), Image.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG" if lossless else "JPEG")
    return buf.getvalue()


def mnist_md_spec(counts: list[int], path: str) -> dict[str, Any]:
    """The dataset_spec.json MD's converter writes for CNAPs' mnist: all 10 classes in TEST."""
    return {
        "name": SOURCE,
        "classes_per_split": {"TRAIN": 0, "VALID": 0, "TEST": _NUM_CLASSES},
        "images_per_class": {str(c): int(n) for c, n in enumerate(counts)},
        "class_names": {str(c): f"class_{c}" for c in range(_NUM_CLASSES)},
        "path": path,
        "file_pattern": "{}.tfrecords",
        "__class__": "DatasetSpecification",
    }


def convert_mnist(config: MnistConfig, progress: Callable[[int], None] | None = None) -> SourceResult:
    """Convert the t10k idx files of `config.idx_dir` into `<out>/md/mnist/` (skipped when up to date), holding
    the output root's lock (`manifests.staging.output_lock`)."""
    start_time = time.perf_counter()
    images, labels, paths = read_mnist_idx(config.idx_dir)  # checked before anything is written
    with output_lock(config.out):
        return _convert_locked(config, images, labels, paths, start_time, progress)


def _convert_locked(config: MnistConfig, images: np.ndarray, labels: np.ndarray, paths: tuple[Path, Path],
                    start_time: float, progress: Callable[[int], None] | None) -> SourceResult:
    out = Path(config.out)
    fingerprint = {
        "idx_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths},
        "lossless": config.lossless,
        "converter_version": converter_version(),
    }
    done = published_result(out, GROUP, SOURCE, fingerprint, fsync=config.fsync, start_time=start_time)
    if done is not None:
        return done
    per_class = [np.flatnonzero(labels == c) for c in range(_NUM_CLASSES)]
    writer = SourceWriter(out, GROUP, SOURCE, fingerprint=fingerprint, fsync=config.fsync)
    resume = writer.last_committed
    try:
        for c, rows in enumerate(per_class):
            for index, i in enumerate(md_file_order(len(rows))):
                if resume is not None and (c, index) <= resume:
                    continue
                writer.add(c, index, encode_digit(images[rows[i]], config.lossless),
                           "png" if config.lossless else "jpg")
            if progress:
                progress(len(rows))
        spec = mnist_md_spec([len(r) for r in per_class], str(source_dir(out, GROUP, SOURCE)))
        # The source's own split (CNAPs' spec: every class in test); MD-v2 makes it a training source when
        # reading (manifests.md_spec.spec_view).
        classes = [ClassRecord(c, f"class_{c}", "test", None, len(rows)) for c, rows in enumerate(per_class)]
        info = writer.finish(classes, {
            "origin": f"mnist idx t10k ({paths[0].name}, {paths[1].name})",
            "converter_version": converter_version(),
            "benchmark": "md-v1",
            "dataset_spec": spec,
            "sampling_spec": spec,
            # --fsync is left out of the saved config: it never changes the output.
            "extra": {"fingerprint": fingerprint,
                      "convert_config": {k: v for k, v in dataclasses.asdict(config).items() if k != "fsync"},
                      "image_format": "png" if config.lossless else "jpg"},
        })
    finally:
        writer.abort()
    return source_result(info, "converted" if resume is None else "resumed", start_time)

