"""Writes the shards of one run: (class, record, bytes) samples in -> committed tar shards + manifest parts out.

Runs. A source's classes are cut into *runs* of consecutive classes (`plan_runs`, a pure function of the
input); a shard never spans a run boundary, so runs can be written by separate processes in any order and
the result is byte-identical whatever the number of workers (`manifests.staging` assembles them).

In a run folder a shard is written as `<n>.tar.tmp` and renamed to `<n>.tar`, and only then is its part of the
sample manifest (`<n>.parquet`) written, also atomically; this commit runs on a background thread while the
next shard is written. After a crash or a kill, `RunWriter` keeps the committed shards that are still byte for
byte what their part describes (size, member headers, every sample's crc32; the first damaged one and
everything after it are dropped), and reports the last committed sample so the converter continues right
after it.

Durability (`fsync`, off by default). A killed process (SIGKILL, SIGTERM, Ctrl-C) loses nothing it wrote: the
kernel keeps its page cache, and the renames order what a rerun sees. Only a power loss or an OS crash can
lose written pages, and then the re-check above finds what is missing or damaged. With `fsync=True` the
shard is also fsynced before its rename, and its folder and the part after it, so that a committed shard
survives a power loss as well (at the disk's write-back speed, see BENCHMARKS.md).

Every write failure (a full disk) is an `OSError` whose message names the file and what was being written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile
import threading
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import schema

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar files are padded to whole records, as GNU tar and Python's tarfile do
_END = b"\0" * (2 * _BLOCK)
# Shard files are buffered in chunks smaller than most images: headers, labels, padding and small images are
# gathered into few write calls, while a larger image is written straight from the record buffer (Python's
# BufferedWriter passes a write that does not fit its buffer to the OS without copying it).
_WRITE_BUFFER = 1 << 16


@dataclasses.dataclass(frozen=True)
class ClassRecord:
    """What the converter knows about one class; the writer adds the sample positions."""

    class_id: int
    name: str
    split: str  # one of schema.SPLITS
    superclass: int | None
    num_images: int  # expected count; finish() checks it against the samples written


def _write_error(path: Path, what: str, error: OSError) -> OSError:
    """One-line error for a failed write: the file, what was being written, the system's reason."""
    return OSError(f"{path}: cannot write {what}: {error.strerror or error}")


def atomic_write_bytes(path: Path, data: bytes, what: str = "a file", *, fsync: bool = True) -> None:
    """Write `data` to `path` via a temporary file (fsynced if `fsync`) and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, what, e) from None


def _atomic_write_parquet(table: pa.Table, path: Path, what: str = "a manifest", *, fsync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, what, e) from None


def _read_table(path: Path) -> pa.Table:
    """A whole Parquet file as a table (`pq.read_table` would import pandas, see `_arrow_table`)."""
    with pq.ParquetFile(path) as f:
        return f.read()


# NumPy dtype of each fixed-width Arrow type the manifests use.
_NUMPY_TYPES = {pa.int32(): np.int32, pa.int64(): np.int64, pa.uint32(): np.uint32}


def _arrow_array(field: pa.Field, values) -> pa.Array:
    """`values` (a list, None for a null, or a NumPy array) as an Arrow array of `field`'s type (string or one
    of `_NUMPY_TYPES`), built from buffers: `pa.array` imports pandas on its first call, which would dominate
    the start-up of every converter process."""
    n = len(values)
    if field.type == pa.string():
        data = [v.encode() for v in values]
        offsets = np.zeros(n + 1, dtype=np.int32)  # (n + 1,) byte offset of each value in the joined data
        np.cumsum([len(d) for d in data], out=offsets[1:])
        return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])
    dtype = _NUMPY_TYPES[field.type]
    if isinstance(values, np.ndarray) or None not in values:
        return pa.Array.from_buffers(field.type, n, [None, pa.py_buffer(np.ascontiguousarray(values, dtype=dtype))])
    valid = np.array([v is not None for v in values])  # (n,) bool
    data = np.array([0 if v is None else v for v in values], dtype=dtype)
    return pa.Array.from_buffers(field.type, n, [pa.py_buffer(np.packbits(valid, bitorder="little")),
                                                 pa.py_buffer(data)], null_count=int(n - valid.sum()))


def _arrow_table(table_schema: pa.Schema, columns: dict) -> pa.Table:
    """A table of `table_schema` from {field name: values} (see `_arrow_array`)."""
    return pa.Table.from_arrays([_arrow_array(f, columns[f.name]) for f in table_schema], schema=table_schema)


def _numpy_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-width column without nulls as a NumPy array (shape (rows,)), read from the Arrow buffers
    (`to_numpy` imports pandas, see `_arrow_array`)."""
    dtype = np.dtype(_NUMPY_TYPES[table.schema.field(name).type])
    chunks = [c for c in table[name].chunks if len(c)]
    if any(c.null_count for c in chunks):
        raise ValueError(f"column {name!r} holds nulls")
    return np.concatenate([np.zeros(0, dtype)] + [np.frombuffer(c.buffers()[1], dtype, len(c),
                                                                c.offset * dtype.itemsize) for c in chunks])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- tar members --------------------------------------------------------------------------------------------
# A USTAR header is a fixed 512-byte template in which only the name, the size and the checksum vary, so it
# is built from a template made once by `tarfile` itself (byte-identical to `TarInfo.tobuf`, tested).
def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = schema.TAR_MTIME
    info.mode = schema.TAR_MODE
    info.uname = schema.TAR_UNAME
    info.gname = schema.TAR_GNAME
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


_TEMPLATE = bytearray(_tarfile_header("", 0))
_TEMPLATE[148:156] = b" " * 8  # checksum field counts as spaces while the checksum is computed
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[124:136])  # without the size field
_MAX_SIZE = 8 ** 11  # 11 octal digits


def _tar_header(name: str, size: int) -> bytes:
    """The USTAR header of a regular-file member `name` of `size` bytes, as `tarfile` writes it."""
    raw = name.encode()
    if not raw or len(raw) > schema.MAX_MEMBER_NAME_BYTES or not 0 <= size < _MAX_SIZE:
        return _tarfile_header(name, size)  # tarfile raises its own error for what USTAR cannot hold
    size_field = b"%011o\0" % size
    header = _TEMPLATE.copy()
    header[:len(raw)] = raw
    header[124:136] = size_field
    header[148:155] = b"%06o\0" % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(header)


def _padding(size: int, unit: int = _BLOCK) -> bytes:
    return b"\0" * (-size % unit)


def _shard_size(end_of_last_member: int) -> int:
    """Tar file size once the end-of-archive blocks and the record padding follow the last member."""
    end = end_of_last_member + len(_END)
    return end + (-end % _RECORD)


def warm_up() -> None:
    """Pay pyarrow's one-time costs (the first Parquet write sets up the codec) in this process, so that
    processes forked from it do not each pay them again."""
    table = _arrow_table(schema.SAMPLE_SCHEMA, {f.name: [] for f in schema.SAMPLE_SCHEMA})
    pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


def staging_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / f".{source}.partial"


def source_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / source


def is_complete(root: Path, group: str, source: str) -> bool:
    """True when `<root>/<group>/<source>/source.json` exists (it is written last)."""
    return (source_dir(root, group, source) / schema.SOURCE_FILE).is_file()



def plan_runs(class_bytes: Sequence[int], class_samples: Sequence[int], max_samples: int,
              max_bytes: int) -> tuple[tuple[int, int], ...]:
    """Cut classes 0..C-1 into runs `[(first class, end class), ...]` of consecutive classes.

    Rule: a run takes classes while its total `class_bytes` (input bytes, an upper bound of the image
    bytes) stays <= `max_bytes` and its samples <= `max_samples`; a class that alone exceeds a limit is a
    run of its own. A run therefore usually fills one shard (image bytes <= input bytes), and the runs are
    a pure function of the input and the two shard limits, never of the number of workers.
    """
    runs, start, nbytes, nsamples = [], 0, 0, 0
    for c, (b, s) in enumerate(zip(class_bytes, class_samples)):
        if c > start and (nbytes + b > max_bytes or nsamples + s > max_samples):
            runs.append((start, c))
            start, nbytes, nsamples = c, 0, 0
        nbytes += b
        nsamples += s
    if len(class_bytes) > start or not runs:
        runs.append((start, len(class_bytes)))
    return tuple(runs)


class RunWriter:
    """Append the samples of one run in (class_id, index_in_class) order; shards roll over by count and bytes.

    Args:
        folder: the run's staging folder (`<staging>/runs/<run:06d>/`), created if missing. Committed shards
            found there are checked against their parts (size, headers, every sample's crc32); the first
            damaged one and all later ones are dropped, as are uncommitted files.
        max_shard_samples / max_shard_bytes: a shard is closed as soon as it holds this many samples or
            this many bytes of image data.
        fsync: also fsync each shard before its rename, the run folder and each part (see the module doc).
        crc32: computes the samples' `crc32` column and re-checks staged shards; any implementation of
            zlib's CRC-32 (the converter passes ISA-L's, which is faster than zlib's).
    """

    def __init__(self, folder: Path, *, max_shard_samples: int, max_shard_bytes: int, fsync: bool = False,
                 crc32: Callable[[bytes | memoryview], int] = zlib.crc32):
        self.folder = Path(folder)
        self.max_shard_samples, self.max_shard_bytes = max_shard_samples, max_shard_bytes
        self.fsync, self._crc32 = fsync, crc32
        self.folder.mkdir(parents=True, exist_ok=True)
        self._committed: list[tuple[int, tuple[int, int]]] = []  # per shard: (rows, last (class, index))
        self._keep_checked_shards()
        self._file = None  # the open shard: a binary file
        self._pos = 0  # its size so far
        self._next_shard = len(self._committed)  # run-local number of the next shard
        self._pending = None  # (thread, its errors, committed entry) of the commit under way
        self._rows: dict[str, list] = {}
        self._shard_bytes = 0
        self._last: tuple[int, int] | None = self.last_committed

    def _keep_checked_shards(self) -> None:
        n = 0
        while (self.folder / f"{n:06d}.parquet").is_file():
            try:
                part = _read_table(self.folder / f"{n:06d}.parquet")
            except (OSError, pa.ArrowException):
                break
            if part.num_rows == 0 or not _shard_matches(self.folder / f"{n:06d}.tar", part, self._crc32):
                break
            last = part.slice(part.num_rows - 1)
            self._committed.append((part.num_rows, (last["class_id"][0].as_py(), last["index_in_class"][0].as_py())))
            n += 1
        keep = {f"{i:06d}.{ext}" for i in range(n) for ext in ("tar", "parquet")}
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

    def add(self, class_id: int, index_in_class: int, data: bytes | memoryview, fmt: str) -> None:
        """Append one sample. Samples must come in increasing (class_id, index_in_class) order."""
        if fmt not in schema.IMAGE_FORMATS:
            raise ValueError(f"image format {fmt!r} is not one of {schema.IMAGE_FORMATS}")
        pos = (class_id, index_in_class)
        if self._last is not None and pos <= self._last:
            raise ValueError(f"sample {pos} added after {self._last}: samples must be in class, record order")
        self._last = pos
        if self._file is None:
            self._open_shard()
        key = schema.sample_key(class_id, index_in_class)
        label = str(class_id).encode()
        size = len(data)
        # Members in sorted extension order, as webdataset's TarWriter writes them: cls, then jpg|png.
        head = b"".join((_tar_header(f"{key}.{schema.LABEL_EXTENSION}", len(label)), label,
                         _padding(len(label)), _tar_header(f"{key}.{fmt}", size)))
        offset = self._pos + len(head)
        f = self._file
        try:
            f.write(head)
            f.write(data)  # a large image goes to the OS uncopied (_WRITE_BUFFER)
            f.write(_padding(size))
        except OSError as e:
            raise _write_error(Path(self._file.name), f"shard data (sample {key})", e) from None
        self._pos = offset + size + (-size % _BLOCK)
        rows = self._rows
        rows["key"].append(key)
        rows["class_id"].append(class_id)
        rows["index_in_class"].append(index_in_class)
        rows["offset"].append(offset)
        rows["size"].append(size)
        rows["format"].append(fmt)
        rows["crc32"].append(self._crc32(data))
        self._shard_bytes += size
        if len(rows["key"]) >= self.max_shard_samples or self._shard_bytes >= self.max_shard_bytes:
            self._close_shard()

    def _open_shard(self) -> None:
        path = self.folder / f"{self._next_shard:06d}.tar.tmp"
        try:
            self._file = open(path, "wb", buffering=_WRITE_BUFFER)
        except OSError as e:
            raise _write_error(path, "a new shard", e) from None
        self._pos = 0
        self._rows = {f.name: [] for f in schema.SAMPLE_SCHEMA if f.name != "shard"}
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        """End the open shard and commit it on a background thread (fsync if asked, rename, then its part), so
        that the disk flushes it while the next shard is written; at most one commit is pending."""
        f, index = self._file, self._next_shard
        try:
            f.write(_END + _padding(self._pos + len(_END), _RECORD))
            f.flush()
        except OSError as e:
            raise _write_error(Path(f.name), "the end of a shard", e) from None
        self._file = None
        self._next_shard += 1
        # The part's shard column holds the run-local shard number; finish() renumbers it globally.
        rows = dict(self._rows, shard=[index] * len(self._rows["key"]))
        table = _arrow_table(schema.SAMPLE_SCHEMA, rows)
        self._wait()
        errors: list[BaseException] = []
        thread = threading.Thread(target=self._commit, args=(f, index, table, errors), daemon=True)
        thread.start()
        self._pending = (thread, errors, (table.num_rows, (rows["class_id"][-1], rows["index_in_class"][-1])))

    def _commit(self, f, index: int, table: pa.Table, errors: list[BaseException]) -> None:
        tmp = Path(f.name)
        try:
            try:
                if self.fsync:
                    os.fsync(f.fileno())
                f.close()
                os.replace(tmp, self.folder / f"{index:06d}.tar")
                if self.fsync:
                    _fsync_dir(self.folder)
            except OSError as e:
                raise _write_error(tmp, "the end of a shard", e) from None
            _atomic_write_parquet(table, self.folder / f"{index:06d}.parquet", "a shard's manifest part",
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


def _shard_matches(path: Path, part: pa.Table, crc32: Callable[[bytes], int] = zlib.crc32) -> bool:
    """True when a committed shard is byte for byte what its part describes: the size, every member header
    and label, every image's offset and crc32, zero padding and end blocks."""
    offsets, sizes = part["offset"].to_pylist(), part["size"].to_pylist()
    last = offsets[-1] + sizes[-1]
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            if os.fstat(f.fileno()).st_size != _shard_size(last + (-last % _BLOCK)):
                return False
            for key, class_id, fmt, offset, size, crc in zip(
                    part["key"].to_pylist(), part["class_id"].to_pylist(), part["format"].to_pylist(),
                    offsets, sizes, part["crc32"].to_pylist()):
                label = str(class_id).encode()
                head = b"".join((_tar_header(f"{key}.{schema.LABEL_EXTENSION}", len(label)), label,
                                 _padding(len(label)), _tar_header(f"{key}.{fmt}", size)))
                if f.read(len(head)) != head or f.tell() != offset:
                    return False
                if crc32(f.read(size)) != crc or any(f.read(-size % _BLOCK)):
                    return False
            return not any(f.read())
    except OSError:
        return False
