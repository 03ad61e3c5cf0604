"""Bytes or a table in, a file out whole or not at all: a temporary file renamed into place (fsynced on request).

Every write failure (a full disk) becomes an `OSError` whose one-line message names the file and what was
being written (`write_error`). When a rename must survive a power loss, the folder holding it is fsynced
afterwards (`fsync_dir`); the staging protocol (docs/architecture.md) says when.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

import pyarrow as pa
import pyarrow.parquet as pq


def write_error(path: Path, what: str, error: OSError) -> OSError:
    """One-line error for a failed write: the file, what was being written, the system's reason."""
    return OSError(f"{path}: cannot write {what}: {error.strerror or error}")


def atomic_write(path: Path, what: str, write: Callable[[BinaryIO], object], *, fsync: bool) -> None:
    """Call `write(file)` on `<path>.tmp`, then rename it to `path`; fsync the file before the rename if `fsync`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, what, e) from None


def atomic_write_bytes(path: Path, data: bytes, what: str = "a file", *, fsync: bool = True) -> None:
    """Write `data` to `path` via a temporary file (fsynced if `fsync`) and a rename."""
    atomic_write(path, what, lambda f: f.write(data), fsync=fsync)


def atomic_write_parquet(table: pa.Table, path: Path, what: str = "a manifest", *, fsync: bool = True) -> None:
    """Write `table` as zstd-compressed Parquet to `path` via a temporary file (fsynced if `fsync`) and a rename."""
    atomic_write(path, what, lambda f: pq.write_table(table, f, compression="zstd"), fsync=fsync)


def fsync_dir(path: Path) -> None:
    """Fsync a folder, so that the renames and links made in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
