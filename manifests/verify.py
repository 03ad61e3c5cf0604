"""Checks a converted source against its manifests: shards + manifests in, a report or one precise error out.

Every tar is walked header by header (the only place a tar is scanned): members must be exactly
`<key>.cls` then `<key>.<format>` for each manifest row in order, with the exact headers the format
prescribes, at the recorded offsets and sizes, with the recorded CRC and label, and nothing but zeros after
them; `index.npy`, `classes.parquet` and `source.json` must agree with `samples.parquet`. samples.parquet and
index.npy are read one record batch at a time, so the memory of verifying a class-contiguous source does not grow
with its samples (an ordered VTAB task keeps its two class columns, 8 bytes per sample).
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
from manifests._tar import BLOCK, tar_header

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
    # pre_buffer off: Arrow would otherwise read every row group's column chunks ahead, i.e. the whole file
    manifest = pq.ParquetFile(where / schema.SAMPLES_FILE, pre_buffer=False)
    num_rows = manifest.metadata.num_rows
    _check(num_rows == info.num_samples, where / schema.SAMPLES_FILE,
           f"{num_rows} rows, source.json says {info.num_samples}")
    if info.layout == "ordered":  # format version 2: VTAB tasks (manifests/provenance.py); a few 10k samples
        from manifests.provenance import verify_ordered

        verify_ordered(reader, *_class_columns(manifest, where / schema.SAMPLES_FILE))
    rows = _manifest_rows(reader, manifest)
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
        with open(shard_path, "rb", buffering=1 << 20) as f:
            while True:
                header = f.read(BLOCK)
                if len(header) < BLOCK or not any(header):
                    break  # end of archive (its zero blocks and padding are checked below)
                _check(row < num_rows, shard_path, f"extra member {_member_name(header)!r} after the last sample")
                key, fmt, crc, class_id, in_class, row_shard, row_offset, image_size = next(rows)
                ctx = f"{shard_path}: sample {key} (row {row})"
                # Plain ifs, not _check: its message would be formatted for every sample.
                if key != schema.sample_key(class_id, in_class):
                    _fail(ctx, f"key does not follow the key rule for class {class_id}, index {in_class}")
                if row_shard != shard_no:
                    _fail(shard_path, f"row {row} ({key}) belongs to shard {row_shard}")
                label = str(class_id).encode()
                _check_header(header, f"{key}.{schema.LABEL_EXTENSION}", len(label), ctx)
                block = f.read(BLOCK)
                if block != label + bytes(BLOCK - len(label)):
                    _fail(ctx, f"label {block.rstrip(bytes(1))!r} != class {class_id}")
                _check_header(f.read(BLOCK), f"{key}.{fmt}", image_size, ctx)
                offset = f.tell()
                if offset != row_offset:
                    _fail(ctx, f"image data at byte {offset}, manifest says {row_offset}")
                data = f.read(image_size)
                if len(data) != image_size:
                    _fail(ctx, "image data truncated")
                if zlib.crc32(data) != crc:
                    _fail(ctx, "image bytes do not match the manifest's crc32")
                if any(f.read(-image_size % BLOCK)):
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


def _class_columns(manifest: pq.ParquetFile, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """class_id and index_in_class of every row as int32 arrays (8 bytes per sample), read batch by batch."""
    num_rows = manifest.metadata.num_rows
    columns = np.empty(num_rows, np.int32), np.empty(num_rows, np.int32)
    start = 0
    for batch in manifest.iter_batches(batch_size=_BATCH_ROWS, columns=["class_id", "index_in_class"]):
        stop = start + batch.num_rows
        for i, field in enumerate(("class_id", "index_in_class")):
            column = batch.column(i).to_numpy()
            _check(bool(np.all((column >= 0) & (column <= np.iinfo(np.int32).max))), where,
                   f"column {field}: a value outside [0, 2**31) in rows {start}..{stop - 1}")
            columns[i][start:stop] = column
        start = stop
    return columns


def _manifest_rows(reader: SourceReader, manifest: pq.ParquetFile) -> Iterator[tuple]:
    """(key, format, crc32, class_id, index_in_class, shard, offset, size) of every row of samples.parquet,
    read one record batch at a time, each batch checked first: shard/offset/size equal index.npy's rows, and in
    a class-contiguous source class_id/index_in_class equal the class blocks of classes.parquet (whose
    `first_sample`s the reader checked to tile the rows when it opened; an ordered source's class columns are
    checked whole by `verify_ordered`). Nothing is held per sample beyond one batch: index.npy is read batch by
    batch from the file, not through the reader's memory map, whose pages would stay resident."""
    where = reader.path
    contiguous = reader.info.layout != "ordered"
    ids = reader._class_ids  # (C,) class ids in class order
    first = reader._first.astype(np.int64)  # (C,) first row of each class
    ends = first + reader._count  # (C,) one past its last row; an empty class ends where it starts
    columns = ["key", "format", "crc32", "class_id", "index_in_class", "shard", "offset", "size"]
    start = 0
    with open(where / schema.INDEX_FILE, "rb") as index_file:
        index_file.seek(reader.index.offset)  # the rows follow the .npy header (checked when the reader opened)
        for batch in manifest.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            stop = start + batch.num_rows
            index = np.fromfile(index_file, dtype=schema.INDEX_DTYPE, count=batch.num_rows)  # (rows,)
            values = dict(zip(columns, batch.columns))
            for field in ("shard", "offset", "size"):
                bad = np.flatnonzero(index[field] != values[field].to_numpy())
                _check(bad.size == 0, where / schema.INDEX_FILE,
                       f"column {field} differs from samples.parquet at row {(start + bad[:1]).tolist()}")
            if contiguous:
                rows = np.arange(start, stop)
                block = np.searchsorted(ends, rows, side="right")  # (rows,) the class block holding each row
                wrong = np.flatnonzero(values["class_id"].to_numpy() != ids[block])
                if wrong.size:
                    _fail(where / schema.CLASSES_FILE,
                          f"class {int(ids[block[wrong[0]]])}: its rows are not contiguous")
                wrong = np.flatnonzero(values["index_in_class"].to_numpy() != rows - first[block])
                if wrong.size:
                    c = block[wrong[0]]
                    _fail(where / schema.CLASSES_FILE,
                          f"class {int(ids[c])}: index_in_class is not 0..{int(reader._count[c]) - 1}")
            yield from zip(*(values[name].to_pylist() for name in columns))
            start = stop


def _member_name(header: bytes) -> str:
    return header[:100].rstrip(bytes(1)).decode("utf-8", "replace")


def _check_header(header: bytes, name: str, size: int, ctx: str) -> None:
    """A member header must be exactly the one the format prescribes for `name` and `size` (docs/format.md)."""
    if header == tar_header(name, size):
        return
    _check(_member_name(header) == name, ctx, f"expected member {name}, found {_member_name(header)!r}")
    found = header[124:136].rstrip(b"\0 ").decode("ascii", "replace")
    _check(found == f"{size:011o}", ctx, f"member {name}: size {found} (octal), manifest says {size}")
    raise ManifestError(f"{ctx}: member {name}: header fields (mode, owner, mtime, checksum) differ from the format")


def _check(ok: bool, where: Path | str, message: str) -> None:
    if not ok:
        _fail(where, message)


def _fail(where: Path | str, message: str) -> None:
    raise ManifestError(f"{where}: {message}")
