"""Checks a converted source against its manifests: shards + manifests in, a report or one precise error out.

Every tar is walked header by header (the only place a tar is scanned): members must be exactly
`<key>.cls` then `<key>.<format>` for each manifest row in order, at the recorded offsets and sizes, with the
recorded CRC and label; `index.npy`, `classes.parquet` and `source.json` must agree with `samples.parquet`.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from manifests import schema
from manifests.reader import ManifestError, SourceReader


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    source: str
    num_classes: int
    num_samples: int
    num_shards: int
    num_bytes: int  # total shard bytes
    decoded: int  # samples passed through the decode callback (0 when none was given)


def verify_source(
    path: str | os.PathLike,
    *,
    decode: Callable[[bytes], Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify one source folder; raise ManifestError naming the first mismatch.

    Args:
        path: `<root>/<group>/<source>/`.
        decode: optional callable applied to every image's bytes (e.g. a full decode); an exception
            it raises is reported with the shard and key.
        progress: called with the number of samples checked since the last call.
    """
    reader = SourceReader(path)
    info = reader.info
    samples = reader.samples()
    keys = samples["key"].to_pylist()
    class_ids = samples["class_id"].to_numpy()
    index_in_class = samples["index_in_class"].to_numpy()
    shard_col = samples["shard"].to_numpy()
    offsets = samples["offset"].to_numpy()
    sizes = samples["size"].to_numpy()
    formats = samples["format"].to_pylist()
    crcs = samples["crc32"].to_numpy()
    where = reader.path

    _check(len(keys) == info.num_samples, where / schema.SAMPLES_FILE,
           f"{len(keys)} rows, source.json says {info.num_samples}")
    for field in ("offset", "size", "shard"):
        bad = np.flatnonzero(reader.index[field] != samples[field].to_numpy())
        _check(bad.size == 0, where / schema.INDEX_FILE,
               f"column {field} differs from samples.parquet at row {bad[:1].tolist()}")
    _verify_classes(reader, class_ids, index_in_class)

    row = 0
    total_bytes = 0
    decoded = 0
    for shard_no, shard in enumerate(info.shards):
        shard_path = where / shard.name
        _check(shard_path.is_file(), shard_path, "missing")
        size = shard_path.stat().st_size
        _check(size == shard.num_bytes, shard_path, f"{size} bytes, source.json says {shard.num_bytes}")
        total_bytes += size
        first = row
        with open(shard_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members = iter(tar)
            while True:
                label_member = next(members, None)
                if label_member is None:
                    break
                _check(row < len(keys), shard_path, f"extra member {label_member.name!r} after the last sample")
                key = keys[row]
                ctx = f"{shard_path}: sample {key} (row {row})"
                _check(key == schema.sample_key(int(class_ids[row]), int(index_in_class[row])), ctx,
                       f"key does not follow the key rule for class {class_ids[row]}, index {index_in_class[row]}")
                _check(shard_col[row] == shard_no, shard_path, f"row {row} ({key}) belongs to shard {shard_col[row]}")
                _check(label_member.name == f"{key}.{schema.LABEL_EXTENSION}", ctx,
                       f"expected member {key}.{schema.LABEL_EXTENSION}, found {label_member.name!r}")
                label = tar.extractfile(label_member).read()
                _check(label == str(class_ids[row]).encode(), ctx, f"label {label!r} != class {class_ids[row]}")
                image_member = next(members, None)
                image_name = f"{key}.{formats[row]}"
                _check(image_member is not None and image_member.name == image_name, ctx,
                       f"expected member {image_name}, found {getattr(image_member, 'name', None)!r}")
                _check(image_member.offset_data == offsets[row], ctx,
                       f"image data at byte {image_member.offset_data}, manifest says {offsets[row]}")
                _check(image_member.size == sizes[row], ctx,
                       f"image size {image_member.size}, manifest says {sizes[row]}")
                data = tar.extractfile(image_member).read()
                _check(zlib.crc32(data) == crcs[row], ctx, "image bytes do not match the manifest's crc32")
                if decode is not None:
                    try:
                        decode(data)
                    except Exception as e:  # noqa: BLE001 - any decoder failure is a verification failure
                        raise ManifestError(f"{ctx}: image does not decode: {e}") from None
                    decoded += 1
                row += 1
                if progress is not None and row % 1000 == 0:
                    progress(1000)
        _check(row - first == shard.num_samples, shard_path,
               f"{row - first} samples, source.json says {shard.num_samples}")
    _check(row == len(keys), where / schema.SAMPLES_FILE, f"{len(keys) - row} manifest rows have no tar member")
    if progress is not None:
        progress(row % 1000)
    reader.close()
    return VerifyReport(info.source, info.num_classes, info.num_samples, len(info.shards), total_bytes, decoded)


def _verify_classes(reader: SourceReader, class_ids: np.ndarray, index_in_class: np.ndarray) -> None:
    where = reader.path / schema.CLASSES_FILE
    info = reader.info
    first = reader.classes["first_sample"].to_numpy()
    count = reader.classes["num_images"].to_numpy()
    ids = reader.classes["class_id"].to_numpy()
    splits = reader.classes["split"].to_pylist()
    _check(len(ids) == info.num_classes, where, f"{len(ids)} classes, source.json says {info.num_classes}")
    _check(bool(np.all(np.diff(ids) > 0)), where, "class ids are not strictly increasing")
    expected_first = np.concatenate([[0], np.cumsum(count)[:-1]]) if len(count) else count
    bad = np.flatnonzero(first != expected_first)
    _check(bad.size == 0, where, f"class {ids[bad[:1]].tolist()} does not start where the previous one ends")
    _check(int(count.sum()) == len(class_ids), where, f"counts add to {int(count.sum())}, {len(class_ids)} samples")
    for s in schema.SPLITS:
        n = splits.count(s)
        _check(n == info.classes_per_split.get(s, 0), where, f"{n} {s} classes, source.json says "
               f"{info.classes_per_split.get(s, 0)}")
    for cid, start, n in zip(ids, first, count):
        block_ids = class_ids[start:start + n]
        block_idx = index_in_class[start:start + n]
        _check(bool(np.all(block_ids == cid)), where, f"class {cid}: its rows are not contiguous")
        _check(bool(np.all(block_idx == np.arange(n))), where, f"class {cid}: index_in_class is not 0..{n - 1}")


def _check(ok: bool, where: Path | str, message: str) -> None:
    if not ok:
        raise ManifestError(f"{where}: {message}")
