"""One run's samples in, committed tar shards and their manifest parts out (a run folder of the staging folder).

This is the tar/part/commit core that both layouts write through; the protocol it follows (file names, commit
order, what a resume keeps) is stated once in docs/architecture.md, "Staging". In short: shard n is written
as `<n>.tar.tmp` and renamed to `<n>.tar`; then its side part `<n>.<suffix>.parquet` (layouts that keep one:
the ordered layout's provenance rows) and last its sample part `<n>.parquet`, the commit mark, are written
atomically. The commit runs on a background thread while the next shard is written. A new writer on the same
folder keeps the committed shards that are still byte for byte what their part describes (size, member
headers, every sample's crc32); the first damaged one and everything after it are dropped, as are
uncommitted files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from manifests import schema
from manifests._arrow import arrow_table, read_table
from manifests._files import atomic_write_parquet, fsync_dir, write_error
from manifests._tar import BLOCK, archive_end, padding, sample_head, shard_size, tar_header

# Shard files are buffered in chunks smaller than most images: headers, labels, padding and small images are
# gathered into few write calls, while a larger image is written straight from the record buffer (Python's
# BufferedWriter passes a write that does not fit its buffer to the OS without copying it).
_WRITE_BUFFER = 1 << 16

Crc32 = Callable[[bytes | memoryview], int]  # zlib's CRC-32, by any implementation (the converter: ISA-L's)


@dataclasses.dataclass(frozen=True)
class SidePart:
    """A second part that every shard of a layout commits before its sample part, one row per sample;
    finishing streams the side parts, in shard order, into one manifest file."""

    suffix: str  # the side part of shard n is `<n>.<suffix>.parquet`
    schema: pa.Schema  # its columns; each row is read from an object with one attribute per field
    manifest: str  # the file finishing writes them into, e.g. schema.PROVENANCE_FILE


def shard_path(folder: Path, n: int) -> Path:
    """Committed shard n of a run folder."""
    return folder / f"{n:06d}.tar"


def part_path(folder: Path, n: int, side: SidePart | None = None) -> Path:
    """Sample part of shard n of a run folder (the commit mark), or its side part."""
    return folder / (f"{n:06d}.parquet" if side is None else f"{n:06d}.{side.suffix}.parquet")


def committed_shards(folder: Path) -> int:
    """Number of committed shards of a run folder: shards 0..n-1 have their sample part, the commit mark."""
    n = 0
    while part_path(folder, n).is_file():
        n += 1
    return n


class ShardWriter:
    """Append samples to the shards of one run folder; a shard is closed and committed once it holds
    `max_shard_samples` samples or `max_shard_bytes` bytes of image data.

    Args:
        folder: the run folder, created if missing; committed shards found there are re-checked and kept
            (see the module doc).
        max_shard_samples / max_shard_bytes: the shard limits.
        fsync: also fsync each shard before its rename, the run folder after it, and each part.
        crc32: computes the samples' `crc32` column and re-checks kept shards.
        side: the layout's side part, if it keeps one; `add` then takes each sample's side row.
        class_order: samples must come in strictly increasing (class_id, index_in_class) order (the
            class-contiguous layout; `last_committed` then says where a resumed run continues).
        on_kept: called with (sample part, side part or None) of every shard kept, in order, so that a layout
            can rebuild what it tracks across samples.
    """

    def __init__(self, folder: Path, *, max_shard_samples: int, max_shard_bytes: int, fsync: bool = False,
                 crc32: Crc32 = zlib.crc32, side: SidePart | None = None, class_order: bool = False,
                 on_kept: Callable[[pa.Table, pa.Table | None], None] | None = None):
        self.folder = Path(folder)
        self.max_shard_samples, self.max_shard_bytes = max_shard_samples, max_shard_bytes
        self.fsync, self._crc32, self._side = fsync, crc32, side
        self.folder.mkdir(parents=True, exist_ok=True)
        self._committed: list[tuple[int, tuple[int, int]]] = []  # per shard: (rows, last (class, index))
        self._keep_checked_shards(on_kept)
        self._file = None  # the open shard: a binary file
        self._pos = 0  # its size so far
        self._next_shard = len(self._committed)  # run-local number of the next shard
        self._pending = None  # (thread, its errors, committed entry) of the commit under way
        self._rows: dict[str, list] = {}
        self._side_rows: dict[str, list] = {}
        self._shard_bytes = 0
        self._class_order = class_order
        self._last = self.last_committed  # (class, index) of the last sample added

    def _keep_checked_shards(self, on_kept) -> None:
        n = 0
        while part_path(self.folder, n).is_file() and (self._side is None or
                                                       part_path(self.folder, n, self._side).is_file()):
            try:
                part = read_table(part_path(self.folder, n))
                side = None if self._side is None else read_table(part_path(self.folder, n, self._side))
            except (OSError, pa.ArrowException):
                break
            if (part.num_rows == 0 or (side is not None and side.num_rows != part.num_rows)
                    or not shard_matches(shard_path(self.folder, n), part, self._crc32)):
                break
            last = part.slice(part.num_rows - 1)
            self._committed.append((part.num_rows, (last["class_id"][0].as_py(), last["index_in_class"][0].as_py())))
            if on_kept is not None:
                on_kept(part, side)
            n += 1
        keep = {p.name for i in range(n)
                for p in (shard_path(self.folder, i), part_path(self.folder, i), part_path(self.folder, i, self._side))}
        for p in self.folder.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    @property
    def num_committed(self) -> int:
        """Samples in committed shards: what survives an interruption."""
        return sum(rows for rows, _ in self._committed)

    @property
    def last_committed(self) -> tuple[int, int] | None:
        """(class_id, index_in_class) of the last committed sample, or None if nothing is committed."""
        return self._committed[-1][1] if self._committed else None

    def add(self, class_id: int, index_in_class: int, data: bytes | memoryview, fmt: str, side_row: Any = None) -> None:
        """Append one sample: its tar members (key `schema.sample_key(class_id, index_in_class)`), its sample part
        row and, with a side part, the row read from `side_row`'s attributes. This is the converter's
        per-record path: it makes as few Python calls as it can."""
        if fmt not in schema.IMAGE_FORMATS:
            raise ValueError(f"image format {fmt!r} is not one of {schema.IMAGE_FORMATS}")
        if self._class_order:
            pos = (class_id, index_in_class)
            if self._last is not None and pos <= self._last:
                raise ValueError(f"sample {pos} added after {self._last}: samples must be in class, record order")
            self._last = pos
        if self._file is None:
            self._open_shard()
        key = schema.sample_key(class_id, index_in_class)
        label = str(class_id).encode()
        size = len(data)
        # = sample_head(key, class_id, fmt, size), inlined on this path
        head = b"".join((tar_header(f"{key}.{schema.LABEL_EXTENSION}", len(label)), label, padding(len(label)),
                         tar_header(f"{key}.{fmt}", size)))
        offset = self._pos + len(head)
        f = self._file
        try:
            f.write(head)
            f.write(data)  # a large image goes to the OS uncopied (_WRITE_BUFFER)
            f.write(padding(size))
        except OSError as e:
            raise write_error(Path(f.name), f"shard data (sample {key})", e) from None
        self._pos = offset + size + (-size % BLOCK)
        rows = self._rows
        rows["key"].append(key)
        rows["class_id"].append(class_id)
        rows["index_in_class"].append(index_in_class)
        rows["offset"].append(offset)
        rows["size"].append(size)
        rows["format"].append(fmt)
        rows["crc32"].append(self._crc32(data))
        if self._side is not None:
            for name, values in self._side_rows.items():
                values.append(getattr(side_row, name))
        self._shard_bytes += size
        if len(rows["key"]) >= self.max_shard_samples or self._shard_bytes >= self.max_shard_bytes:
            self._close_shard()

    def _open_shard(self) -> None:
        path = self.folder / f"{self._next_shard:06d}.tar.tmp"
        try:
            self._file = open(path, "wb", buffering=_WRITE_BUFFER)
        except OSError as e:
            raise write_error(path, "a new shard", e) from None
        self._pos = 0
        self._rows = {f.name: [] for f in schema.SAMPLE_SCHEMA if f.name != "shard"}
        self._side_rows = {} if self._side is None else {f.name: [] for f in self._side.schema}
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        """End the open shard and commit it on a background thread (fsync if asked, rename, then its parts), so
        that the disk flushes it while the next shard is written; at most one commit is pending."""
        f, index = self._file, self._next_shard
        try:
            f.write(archive_end(self._pos))
            f.flush()
        except OSError as e:
            raise write_error(Path(f.name), "the end of a shard", e) from None
        self._file = None
        self._next_shard += 1
        # The part's shard column holds the run-local shard number; finishing renumbers it globally.
        rows = dict(self._rows, shard=[index] * len(self._rows["key"]))
        tables = [arrow_table(schema.SAMPLE_SCHEMA, rows)]
        if self._side is not None:
            tables.insert(0, arrow_table(self._side.schema, self._side_rows))
        self._wait()
        errors: list[BaseException] = []
        thread = threading.Thread(target=self._commit, args=(f, index, tables, errors), daemon=True)
        thread.start()
        self._pending = (thread, errors, (len(rows["key"]), (rows["class_id"][-1], rows["index_in_class"][-1])))

    def _commit(self, f, index: int, tables: list[pa.Table], errors: list[BaseException]) -> None:
        """Shard, then side part, then sample part (the commit mark); `tables` = ([side part,] sample part)."""
        tmp = Path(f.name)
        try:
            try:
                if self.fsync:
                    os.fsync(f.fileno())
                f.close()
                os.replace(tmp, shard_path(self.folder, index))
                if self.fsync:
                    fsync_dir(self.folder)
            except OSError as e:
                raise write_error(tmp, "the end of a shard", e) from None
            if self._side is not None:
                atomic_write_parquet(tables[0], part_path(self.folder, index, self._side),
                                     f"a shard's {self._side.manifest} part", fsync=self.fsync)
            atomic_write_parquet(tables[-1], part_path(self.folder, index), "a shard's manifest part",
                                 fsync=self.fsync)
        except BaseException as e:  # noqa: BLE001 - raised again by _wait() in the writing thread
            errors.append(e)

    def _wait(self, raise_errors: bool = True) -> None:
        """Wait for the pending commit; its shard then counts as committed (or its error is raised)."""
        if self._pending is None:
            return
        thread, errors, entry = self._pending
        thread.join()
        self._pending = None
        if errors:
            if raise_errors:
                raise errors[0]
            return
        self._committed.append(entry)

    def close(self) -> None:
        """Commit the open shard and wait for every commit: the run is complete."""
        if self._file is not None:
            self._close_shard()
        self._wait()

    def abort(self) -> None:
        """Close the open shard file without committing it (the staging folder stays resumable); a commit
        already under way is completed (its failure is not raised: abort runs while another error is)."""
        self._wait(raise_errors=False)
        if self._file is not None:
            self._file.close()
            self._file = None


def shard_matches(path: Path, part: pa.Table, crc32: Crc32 = zlib.crc32) -> bool:
    """True when a committed shard is byte for byte what its part describes: the size, every member header
    and label, every image's offset and crc32, zero padding and end blocks."""
    offsets, sizes = part["offset"].to_pylist(), part["size"].to_pylist()
    last = offsets[-1] + sizes[-1]
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            if os.fstat(f.fileno()).st_size != shard_size(last + (-last % BLOCK)):
                return False
            for key, class_id, fmt, offset, size, crc in zip(
                    part["key"].to_pylist(), part["class_id"].to_pylist(), part["format"].to_pylist(),
                    offsets, sizes, part["crc32"].to_pylist()):
                head = sample_head(key, class_id, fmt, size)
                if f.read(len(head)) != head or f.tell() != offset:
                    return False
                if crc32(f.read(size)) != crc or any(f.read(-size % BLOCK)):
                    return False
            return not any(f.read())
    except OSError:
        return False
