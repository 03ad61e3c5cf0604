"""Checks a converted source against its manifests: shards + manifests in, a report or one precise error out.

Every tar is walked header by header (the only place a tar is scanned): members must be exactly
`<key>.cls` then `<key>.<format>` for each manifest row in order, with the exact headers the format
prescribes, at the recorded offsets and sizes, with the recorded CRC and label, and nothing but zeros after
them; samples.parquet is read in record batches (memory does not grow with Python objects per sample); `index.npy`, `classes.parquet` and `source.json` must agree with `samples.parquet`.
Every column of `classes.parquet` is checked against the dataset spec kept in `source.json` when the source
is opened (`manifests.reader.check_classes`, the same check the loader runs).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from manifests import schema
from manifests.reader import ManifestError, SourceReader
from manifests.writer import _BLOCK, _tar_header

_BATCH_ROWS = 1 << 16  # samples.parquet rows per record batch


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
    where = reader.path
    manifest = pq.ParquetFile(where / schema.SAMPLES_FILE)
    num_rows = manifest.metadata.num_rows
    _check(num_rows == info.num_samples, where / schema.SAMPLES_FILE,
           f"{num_rows} rows, source.json says {info.num_samples}")
    # class_id and index_in_class are kept as int32 NumPy arrays (8 bytes per sample: the class checks need
    # them whole); shard/offset/size are compared with the index one record batch at a time, and keys,
    # formats and CRCs are read batch by batch below, so no column is held whole in int64 or as Python objects.
    class_ids = np.empty(num_rows, np.int32)
    index_in_class = np.empty(num_rows, np.int32)
    start = 0
    for batch in manifest.iter_batches(batch_size=_BATCH_ROWS,
                                       columns=["class_id", "index_in_class", "shard", "offset", "size"]):
        stop = start + batch.num_rows
        for i, field in enumerate(("class_id", "index_in_class")):
            column = batch.column(i).to_numpy()
            _check(bool(np.all((column >= 0) & (column <= np.iinfo(np.int32).max))), where / schema.SAMPLES_FILE,
                   f"column {field}: a value outside [0, 2**31) in rows {start}..{stop - 1}")
            (class_ids if i == 0 else index_in_class)[start:stop] = column
        for i, field in enumerate(("shard", "offset", "size"), start=2):
            bad = np.flatnonzero(reader.index[field][start:stop] != batch.column(i).to_numpy())
            _check(bad.size == 0, where / schema.INDEX_FILE,
                   f"column {field} differs from samples.parquet at row {(start + bad[:1]).tolist()}")
        start = stop
    if info.layout == "ordered":  # format version 2: VTAB tasks (manifests/provenance.py)
        from manifests.provenance import verify_ordered

        verify_ordered(reader, class_ids, index_in_class)
    else:
        _verify_classes(reader, class_ids, index_in_class)

    rows = _manifest_rows(manifest)
    row = 0
    total_bytes = 0
    decoded = 0
    index = reader.index
    for shard_no, shard in enumerate(info.shards):
        shard_path = where / shard.name
        _check(shard_path.is_file(), shard_path, "missing")
        size = shard_path.stat().st_size
        _check(size == shard.num_bytes, shard_path, f"{size} bytes, source.json says {shard.num_bytes}")
        total_bytes += size
        first = row
        with open(shard_path, "rb", buffering=1 << 20) as f:
            while True:
                header = f.read(_BLOCK)
                if len(header) < _BLOCK or not any(header):
                    break  # end of archive (its zero blocks and padding are checked below)
                _check(row < num_rows, shard_path, f"extra member {_member_name(header)!r} after the last sample")
                key, fmt, crc = next(rows)
                class_id, in_class = int(class_ids[row]), int(index_in_class[row])
                ctx = f"{shard_path}: sample {key} (row {row})"
                # Plain ifs, not _check: its message would be formatted for every sample.
                if key != schema.sample_key(class_id, in_class):
                    _fail(ctx, f"key does not follow the key rule for class {class_id}, index {in_class}")
                if index["shard"][row] != shard_no:
                    _fail(shard_path, f"row {row} ({key}) belongs to shard {index['shard'][row]}")
                label = str(class_id).encode()
                _check_header(header, f"{key}.{schema.LABEL_EXTENSION}", len(label), ctx)
                block = f.read(_BLOCK)
                if block != label + bytes(_BLOCK - len(label)):
                    _fail(ctx, f"label {block.rstrip(bytes(1))!r} != class {class_id}")
                image_size = int(index["size"][row])
                _check_header(f.read(_BLOCK), f"{key}.{fmt}", image_size, ctx)
                offset = f.tell()
                if offset != index["offset"][row]:
                    _fail(ctx, f"image data at byte {offset}, manifest says {index['offset'][row]}")
                data = f.read(image_size)
                if len(data) != image_size:
                    _fail(ctx, "image data truncated")
                if zlib.crc32(data) != crc:
                    _fail(ctx, "image bytes do not match the manifest's crc32")
                if any(f.read(-image_size % _BLOCK)):
                    _fail(ctx, "non-zero padding after the image data")
                if decode is not None:
                    try:
                        decode(data)
                    except Exception as e:  # noqa: BLE001 - any decoder failure is a verification failure
                        raise ManifestError(f"{ctx}: image does not decode: {e}") from None
                    decoded += 1
                row += 1
                if progress is not None and row % 1000 == 0:
                    progress(1000)
            _check(not any(f.read()), shard_path, "data after the end-of-archive blocks")
        _check(row - first == shard.num_samples, shard_path,
               f"{row - first} samples, source.json says {shard.num_samples}")
    _check(row == num_rows, where / schema.SAMPLES_FILE, f"{num_rows - row} manifest rows have no tar member")
    if progress is not None:
        progress(row % 1000)
    reader.close()
    return VerifyReport(info.source, info.num_classes, info.num_samples, len(info.shards), total_bytes, decoded)


def _manifest_rows(manifest: pq.ParquetFile) -> Iterator[tuple[str, str, int]]:
    """(key, format, crc32) of every row of samples.parquet, read one record batch at a time."""
    for batch in manifest.iter_batches(batch_size=_BATCH_ROWS, columns=["key", "format", "crc32"]):
        yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), batch.column(2).to_pylist())


def _member_name(header: bytes) -> str:
    return header[:100].rstrip(bytes(1)).decode("utf-8", "replace")


def _check_header(header: bytes, name: str, size: int, ctx: str) -> None:
    """A member header must be exactly the one the format prescribes for `name` and `size` (docs/format.md)."""
    if header == _tar_header(name, size):
        return
    _check(_member_name(header) == name, ctx, f"expected member {name}, found {_member_name(header)!r}")
    found = header[124:136].rstrip(b"\0 ").decode("ascii", "replace")
    _check(found == f"{size:011o}", ctx, f"member {name}: size {found} (octal), manifest says {size}")
    raise ManifestError(f"{ctx}: member {name}: header fields (mode, owner, mtime, checksum) differ from the format")


def _verify_classes(reader: SourceReader, class_ids: np.ndarray, index_in_class: np.ndarray) -> None:
    # classes.parquet vs source.json and its spec was checked when the reader opened (check_classes);
    # here: the class blocks vs samples.parquet.
    where = reader.path / schema.CLASSES_FILE
    first = reader.classes["first_sample"].to_numpy()
    count = reader.classes["num_images"].to_numpy()
    ids = reader.classes["class_id"].to_numpy()
    _check(int(count.sum()) == len(class_ids), where, f"counts add to {int(count.sum())}, {len(class_ids)} samples")
    for cid, start, n in zip(ids, first, count):
        block_ids = class_ids[start:start + n]
        block_idx = index_in_class[start:start + n]
        _check(bool(np.all(block_ids == cid)), where, f"class {cid}: its rows are not contiguous")
        _check(bool(np.all(block_idx == np.arange(n))), where, f"class {cid}: index_in_class is not 0..{n - 1}")


def _check(ok: bool, where: Path | str, message: str) -> None:
    if not ok:
        _fail(where, message)


def _fail(where: Path | str, message: str) -> None:
    raise ManifestError(f"{where}: {message}")
