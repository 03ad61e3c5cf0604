"""Random access to a converted source: manifests + index.npy in, checked sample bytes out (one pread each).

No tar is scanned at read time: `index.npy` (memory-mapped, shared by all processes through the page cache)
gives each sample's shard, byte offset and size. Shard files are opened lazily through a small LRU pool, so
a process never holds more than `max_open_files` descriptors, whatever the number of classes or shards;
a shard that is not a regular file (a FIFO, a folder) is refused when opened, never read.
A reader can be pickled into DataLoader workers; after a fork each process opens its own descriptors.

Integrity at read time: with `verify_checksums` (the default) every `read` compares zlib.crc32 of the bytes
read with the manifest's `crc32` column, loaded once per process as a (num_samples,) uint32 array (4 bytes a
sample; shared copy-on-write with forked workers). `classes.parquet` is cross-checked against `source.json`
(counts, contiguous class blocks, and every column against the stored dataset spec) when a source is
opened, so class boundaries and splits have one source of truth at run time.
"""

from __future__ import annotations

import collections
import os
import stat
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import schema

DEFAULT_MAX_OPEN_FILES = 64


class ManifestError(ValueError):
    """A converted source is missing, incomplete or inconsistent. The message names the file."""


class ChecksumError(ManifestError):
    """A sample's bytes as read differ from what was converted (its manifest crc32)."""


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
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ManifestError(f"{path}: cannot open shard: {e.strerror}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
            raise ManifestError(f"{path}: shard is {kind}, not a regular file")
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
        verify_checksums: `read` checks every sample's bytes against the manifest's crc32 (ChecksumError).

    Raises:
        ManifestError: a file is missing or unreadable, or classes.parquet disagrees with source.json.
    """

    def __init__(self, path: str | os.PathLike, *, max_open_files: int = DEFAULT_MAX_OPEN_FILES,
                 pool: FilePool | None = None, verify_checksums: bool = True):
        self.path = Path(path)
        self.max_open_files = max_open_files
        self.verify_checksums = verify_checksums
        self._crc: np.ndarray | None = None  # (num_samples,) uint32, loaded on first use
        info_path = self.path / schema.SOURCE_FILE
        if not info_path.is_file():
            partial = self.path.parent / f".{self.path.name}.partial"
            hint = " (an interrupted conversion is staged beside it: rerun it)" if partial.exists() else ""
            raise ManifestError(f"{info_path}: missing, not a converted source{hint}")
        try:
            self.info = schema.SourceInfo.from_json(info_path.read_text(), origin=str(info_path))
        except (ValueError, TypeError, KeyError) as e:
            raise ManifestError(f"{info_path}: {e}") from None
        self.classes = read_manifest(self.path / schema.CLASSES_FILE, schema.CLASS_SCHEMA)
        self._class_ids = self.classes["class_id"].to_numpy()
        self._first = self.classes["first_sample"].to_numpy()
        self._count = self.classes["num_images"].to_numpy()
        self._row_of_class = {int(c): i for i, c in enumerate(self._class_ids)}
        check_classes(self)
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
        return {"path": self.path, "max_open_files": self.max_open_files, "pool": self._pool,
                "verify_checksums": self.verify_checksums}

    def __setstate__(self, state):
        self.__init__(state["path"], max_open_files=state["max_open_files"], pool=state["pool"],
                      verify_checksums=state["verify_checksums"])

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
        if self.info.layout != "class-contiguous":
            raise ManifestError(f"{self.path}: layout {self.info.layout!r}: classes are not contiguous "
                                f"(use manifests.provenance.role_rows / the class_id column)")
        row = self._row_of_class.get(int(class_id))
        if row is None:
            raise KeyError(f"{self.path}: no class {class_id}")
        return int(self._first[row]), int(self._count[row])

    def read(self, index: int) -> bytes:
        """The stored image bytes of sample `index` (global sample order), untouched.

        Raises:
            ChecksumError: `verify_checksums` is on and the bytes differ from the manifest's crc32.
        """
        entry = self.index[index]
        data = self._pool.pread(self._shard_paths[entry["shard"]], int(entry["offset"]), int(entry["size"]))
        if self.verify_checksums:
            expected = int(self.checksums[index])
            if zlib.crc32(data) != expected:
                raise ChecksumError(f"source {self.name}: {self.locate(index)}: image bytes do not match the "
                                    f"manifest's crc32 ({zlib.crc32(data):08x}, manifest {expected:08x}): the "
                                    f"shard changed after conversion; `lite-convert verify` it, reconvert")
        return data

    @property
    def checksums(self) -> np.ndarray:
        """(num_samples,) uint32: the manifest's zlib.crc32 of every sample's image bytes (read once)."""
        if self._crc is None:
            path = self.path / schema.SAMPLES_FILE
            try:
                crc = pq.read_table(path, columns=["crc32"]).column(0).to_numpy()
            except (OSError, KeyError, pa.ArrowException) as e:
                raise ManifestError(f"{path}: cannot read the crc32 column: {e}") from None
            if len(crc) != self.num_samples:
                raise ManifestError(f"{path}: {len(crc)} checksums, source.json says {self.num_samples} samples")
            self._crc = crc.astype(np.uint32, copy=False)
        return self._crc

    def locate(self, index: int) -> str:
        """`<shard path>: sample <key> (row <index>)` for error messages about sample `index`."""
        if self.info.layout == "class-contiguous":
            row = int(np.searchsorted(self._first, index, side="right")) - 1
            key = schema.sample_key(int(self._class_ids[row]), index - int(self._first[row]))
        else:  # ordered layout: the key is in the manifest only
            key = pq.read_table(self.path / schema.SAMPLES_FILE, columns=["key"]).column(0)[index].as_py()
        return f"{self._shard_paths[int(self.index[index]['shard'])]}: sample {key} (row {index})"

    def read_class_image(self, class_id: int, index_in_class: int) -> bytes:
        first, count = self.class_range(class_id)
        if not 0 <= index_in_class < count:
            raise IndexError(f"{self.path}: class {class_id} has {count} images, asked for {index_in_class}")
        return self.read(first + index_in_class)

    def samples(self) -> pa.Table:
        """The whole sample manifest (read on demand; large for big sources)."""
        return read_manifest(self.path / schema.SAMPLES_FILE, schema.SAMPLE_SCHEMA)

    @property
    def num_open_files(self) -> int:
        return self._pool.num_open

    def close(self) -> None:
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def split_spec_raw(info: schema.SourceInfo) -> dict | None:
    """The spec whose splits classes.parquet's `split` column follows: the converted view's spec."""
    return info.sampling_spec or info.dataset_spec


def check_classes(reader: SourceReader) -> None:
    """Cross-check classes.parquet with source.json, O(classes); raise ManifestError naming the first
    difference.

    Checks: the class count and split counts of source.json; ids strictly increasing; for class-contiguous
    sources, each class's block starts where the previous one ends and the blocks cover every sample; where
    source.json keeps a dataset spec, every column (id, name, split, superclass, num_images) equals the
    spec's (split: the spec of `split_spec_raw`). An edited classes.parquet would otherwise serve another
    class's images under a label, or a class in the wrong split.
    """
    from manifests.md_spec import parse_md_spec  # md_spec is MD-only; imported where needed

    info, classes = reader.info, reader.classes
    where = reader.path / schema.CLASSES_FILE
    ids, first, count = reader._class_ids, reader._first, reader._count
    splits = classes["split"].to_pylist()

    def fail(message: str) -> None:
        raise ManifestError(f"{where}: {message} (source.json disagrees; the file was edited or is damaged)")

    if len(ids) != info.num_classes:
        fail(f"{len(ids)} classes, source.json says {info.num_classes}")
    if np.any(np.diff(ids) <= 0):
        fail("class ids are not strictly increasing")
    for s in schema.SPLITS:
        if splits.count(s) != info.classes_per_split.get(s, 0):
            fail(f"{splits.count(s)} {s} classes, source.json says {info.classes_per_split.get(s, 0)}")
    if len(splits) != sum(splits.count(s) for s in schema.SPLITS):
        fail(f"a split is not one of {schema.SPLITS}")
    if info.layout != "class-contiguous":
        return  # ordered sources: classes are spread out, manifests.provenance checks them
    expected_first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(first.dtype) if len(count) else first
    bad = np.flatnonzero(first != expected_first)
    if bad.size:
        fail(f"class {int(ids[bad[0]])}: first_sample {int(first[bad[0]])}, but the classes before it end at "
             f"{int(expected_first[bad[0]])}")
    if int(count.sum()) != info.num_samples:
        fail(f"num_images add to {int(count.sum())}, source.json says {info.num_samples} samples")
    if info.dataset_spec is None:
        return
    origin = f"{reader.path / schema.SOURCE_FILE}"
    try:
        spec = parse_md_spec(info.dataset_spec, origin)
        split_raw = split_spec_raw(info)
        split_spec = spec if split_raw is info.dataset_spec else parse_md_spec(split_raw, origin)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    if ids.tolist() != list(range(spec.num_classes)) or split_spec.num_classes != spec.num_classes:
        fail(f"class ids are not 0..{spec.num_classes - 1} of the dataset spec")
    columns = {
        "num_images": (count.tolist(), list(spec.images_per_class)),
        "name": (classes["name"].to_pylist(), list(spec.class_names)),
        "split": (splits, [s for s in schema.SPLITS for _ in range(split_spec.classes_per_split[s])]),
        "superclass": (classes["superclass"].to_pylist(), [spec.superclass_of(c) for c in range(spec.num_classes)]),
    }
    for column, (stored, expected) in columns.items():
        if stored != expected:
            c = next(i for i, (a, b) in enumerate(zip(stored, expected)) if a != b)
            fail(f"class {c}: {column} {stored[c]!r}, the dataset spec says {expected[c]!r}")


def read_manifest(path: Path, expected: pa.Schema) -> pa.Table:
    """A manifest file of a source, whose schema must be `expected` (the format contract); ManifestError if not."""
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
