"""Random access to a converted source: manifests + index.npy in, sample bytes out (one pread each).

No tar is scanned at read time: `index.npy` (memory-mapped, shared by all processes through the page cache)
gives each sample's shard, byte offset and size. Shard files are opened lazily through a small LRU pool, so
a process never holds more than `max_open_files` descriptors, whatever the number of classes or shards.
A reader can be pickled into DataLoader workers; after a fork each process opens its own descriptors.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import schema

DEFAULT_MAX_OPEN_FILES = 64


class ManifestError(ValueError):
    """A converted source is missing, incomplete or inconsistent. The message names the file."""


class FilePool:
    """At most `max_open` read-only descriptors, least recently used closed first; fork-aware.

    One pool can serve several readers (the episode loader shares one per process across its sources), so
    the bound holds per process whatever the number of sources, classes or shards.
    """

    def __init__(self, max_open: int = DEFAULT_MAX_OPEN_FILES):
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        self.max_open = max_open
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def pread(self, path: str, offset: int, size: int) -> bytes:
        with self._lock:
            fd = self._get(path)
            data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ManifestError(f"{path}: short read at byte {offset} ({len(data)} of {size})")
        return data

    def _get(self, path: str) -> int:
        if self._pid != os.getpid():  # forked: the inherited descriptors share offsets with the parent's
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._pid = os.getpid()
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        if len(self._fds) >= self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ManifestError(f"{path}: cannot open shard: {e.strerror}") from None
        self._fds[path] = fd
        return fd

    @property
    def num_open(self) -> int:
        return len(self._fds) if self._pid == os.getpid() else 0

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
            self._fds.clear()

    def __del__(self):
        if self._pid == os.getpid():  # descriptors inherited through fork belong to the parent's pool
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # A pool travels to worker processes empty: descriptors are opened where they are used.
    def __getstate__(self):
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["max_open"])


class SourceReader:
    """A converted source opened for random access.

    Args:
        path: the source folder `<root>/<group>/<source>/`.
        max_open_files: bound on shard descriptors this reader holds open in one process.
        pool: a FilePool shared with other readers (then `max_open_files` is the pool's own bound).
    """

    def __init__(self, path: str | os.PathLike, *, max_open_files: int = DEFAULT_MAX_OPEN_FILES,
                 pool: FilePool | None = None):
        self.path = Path(path)
        self.max_open_files = max_open_files
        info_path = self.path / schema.SOURCE_FILE
        if not info_path.is_file():
            partial = self.path.parent / f".{self.path.name}.partial"
            hint = " (an interrupted conversion is staged beside it: rerun it)" if partial.exists() else ""
            raise ManifestError(f"{info_path}: missing, not a converted source{hint}")
        try:
            self.info = schema.SourceInfo.from_json(info_path.read_text(), origin=str(info_path))
        except (ValueError, TypeError, KeyError) as e:
            raise ManifestError(f"{info_path}: {e}") from None
        self.classes = _read_parquet(self.path / schema.CLASSES_FILE, schema.CLASS_SCHEMA)
        self._class_ids = self.classes["class_id"].to_numpy()
        self._first = self.classes["first_sample"].to_numpy()
        self._count = self.classes["num_images"].to_numpy()
        self._row_of_class = {int(c): i for i, c in enumerate(self._class_ids)}
        self._open_index()
        self._shard_paths = [str(self.path / s.name) for s in self.info.shards]
        self._pool = pool if pool is not None else FilePool(max_open_files)

    def _open_index(self) -> None:
        index_path = self.path / schema.INDEX_FILE
        try:
            self.index = np.load(index_path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ManifestError(f"{index_path}: cannot be memory-mapped: {e}") from None
        if self.index.dtype != schema.INDEX_DTYPE or len(self.index) != self.info.num_samples:
            raise ManifestError(f"{index_path}: {len(self.index)} rows of {self.index.dtype}, expected "
                                f"{self.info.num_samples} rows of {schema.INDEX_DTYPE}")

    # Pickling (spawned DataLoader workers): ship the path, reopen in the new process.
    def __getstate__(self):
        return {"path": self.path, "max_open_files": self.max_open_files, "pool": self._pool}

    def __setstate__(self, state):
        self.__init__(state["path"], max_open_files=state["max_open_files"], pool=state["pool"])

    @property
    def name(self) -> str:
        return self.info.source

    @property
    def num_samples(self) -> int:
        return self.info.num_samples

    def class_ids(self, split: str | None = None) -> np.ndarray:
        """Absolute class ids, ascending; only those of `split` if given."""
        if split is None:
            return self._class_ids.copy()
        if split not in schema.SPLITS:
            raise ValueError(f"split {split!r} is not one of {schema.SPLITS}")
        mask = np.asarray(self.classes["split"].to_pylist()) == split
        return self._class_ids[mask]

    def class_range(self, class_id: int) -> tuple[int, int]:
        """(first sample index, number of samples) of a class: its samples are contiguous."""
        row = self._row_of_class.get(int(class_id))
        if row is None:
            raise KeyError(f"{self.path}: no class {class_id}")
        return int(self._first[row]), int(self._count[row])

    def read(self, index: int) -> bytes:
        """The stored image bytes of sample `index` (global sample order), untouched."""
        entry = self.index[index]
        return self._pool.pread(self._shard_paths[entry["shard"]], int(entry["offset"]), int(entry["size"]))

    def locate(self, index: int) -> str:
        """`<shard path>: sample <key>` for error messages about sample `index`."""
        row = int(np.searchsorted(self._first, index, side="right")) - 1
        class_id = int(self._class_ids[row])
        key = schema.sample_key(class_id, index - int(self._first[row]))
        return f"{self._shard_paths[int(self.index[index]['shard'])]}: sample {key}"

    def read_class_image(self, class_id: int, index_in_class: int) -> bytes:
        first, count = self.class_range(class_id)
        if not 0 <= index_in_class < count:
            raise IndexError(f"{self.path}: class {class_id} has {count} images, asked for {index_in_class}")
        return self.read(first + index_in_class)

    def samples(self) -> pa.Table:
        """The whole sample manifest (read on demand; large for big sources)."""
        return _read_parquet(self.path / schema.SAMPLES_FILE, schema.SAMPLE_SCHEMA)

    @property
    def num_open_files(self) -> int:
        return self._pool.num_open

    def close(self) -> None:
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_parquet(path: Path, expected: pa.Schema) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{path}: cannot be read as Parquet: {e}") from None
    if not table.schema.equals(expected, check_metadata=False):
        raise ManifestError(f"{path}: schema {table.schema.names} does not match the format contract")
    return table


def find_sources(root: str | os.PathLike) -> list[Path]:
    """Folders under `root` (at `<group>/<source>`) that hold a complete converted source, sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.glob(f"*/*/{schema.SOURCE_FILE}"))


def open_source(root: str | os.PathLike, source: str, group: str | None = None, **kwargs) -> SourceReader:
    """Open `<root>/<group>/<source>`; with group None, the one group that holds `source`."""
    root = Path(root)
    if group is not None:
        return SourceReader(root / group / source, **kwargs)
    matches = [p for p in find_sources(root) if p.name == source]
    if len(matches) != 1:
        found = ", ".join(f"{p.parent.name}/{p.name}" for p in find_sources(root)) or "none"
        what = "no" if not matches else "several"
        raise ManifestError(f"{root}: {what} converted source named {source!r} (found: {found})")
    return SourceReader(matches[0], **kwargs)
