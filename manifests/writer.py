"""Writes one converted source: (class, record, bytes) samples in -> tar shards + manifests out.

Atomicity and resumption: everything is written into a hidden staging folder
`<root>/<group>/.<source>.partial/`. A shard is written as `<name>.tmp`, fsynced and renamed, and only then
is its part of the sample manifest (`parts/<n>.parquet`) written, also atomically. After a crash or a kill,
a new `SourceWriter` with the same input fingerprint finds the committed shards, drops everything else, and
reports the last committed sample so the converter continues right after it. Shard boundaries depend only
on the shard's own sample count and byte size, so a resumed conversion writes exactly the shards an
uninterrupted one would. `finish()` writes the manifests, `source.json` last, and renames the staging folder
to `<root>/<group>/<source>/`: a reader never sees a half-written source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import schema

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar files are padded to whole records, as GNU tar and Python's tarfile do
_PLAN_FILE = "plan.json"
_PARTS_DIR = "parts"


@dataclasses.dataclass(frozen=True)
class ClassRecord:
    """What the converter knows about one class; the writer adds the sample positions."""

    class_id: int
    name: str
    split: str  # one of schema.SPLITS
    superclass: int | None
    num_images: int  # expected count; finish() checks it against the samples written


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a fsynced temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = schema.TAR_MTIME
    info.mode = schema.TAR_MODE
    info.uname = schema.TAR_UNAME
    info.gname = schema.TAR_GNAME
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _padding(size: int, unit: int = _BLOCK) -> bytes:
    return b"\0" * (-size % unit)


def staging_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / f".{source}.partial"


def source_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / source


def is_complete(root: Path, group: str, source: str) -> bool:
    """True when `<root>/<group>/<source>/source.json` exists (it is written last)."""
    return (source_dir(root, group, source) / schema.SOURCE_FILE).is_file()


class SourceWriter:
    """Append samples in (class_id, index_in_class) order; shards roll over by count and bytes.

    Args:
        root: output root; the source goes to `<root>/<group>/<source>/`.
        group: e.g. "md" or "vtab".
        source: e.g. "omniglot".
        fingerprint: JSON-able description of the input and settings. A staging folder left by an
            interrupted run is resumed only if its fingerprint is equal; otherwise it is discarded.
        max_shard_samples / max_shard_bytes: a shard is closed as soon as it holds this many samples or
            this many bytes of image data.
    """

    def __init__(
        self,
        root: Path,
        group: str,
        source: str,
        *,
        fingerprint: dict[str, Any],
        max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES,
        max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES,
    ):
        schema.check_name("group", group)
        schema.check_name("source", source)
        if max_shard_samples < 1 or max_shard_bytes < 1:
            raise ValueError("max_shard_samples and max_shard_bytes must be positive")
        self.root, self.group, self.source = Path(root), group, source
        self.stage = staging_dir(self.root, group, source)
        self.final = source_dir(self.root, group, source)
        self.max_shard_samples = max_shard_samples
        self.max_shard_bytes = max_shard_bytes
        plan = {"format_version": schema.FORMAT_VERSION, "max_shard_samples": max_shard_samples,
                "max_shard_bytes": max_shard_bytes, "fingerprint": fingerprint}
        self._parts: list[pa.Table] = []
        self._resume_or_start(plan)
        self._file = None  # the open shard: a binary file positioned at its end
        self._rows: dict[str, list] = {}
        self._last: tuple[int, int] | None = self.last_committed

    # -- staging ------------------------------------------------------------------------------------------
    def _resume_or_start(self, plan: dict[str, Any]) -> None:
        plan_path = self.stage / _PLAN_FILE
        if plan_path.is_file():
            try:
                same = json.loads(plan_path.read_text()) == json.loads(json.dumps(plan))
            except ValueError:
                same = False
            if same:
                self._load_committed_parts()
                return
        if self.stage.exists():
            shutil.rmtree(self.stage)
        (self.stage / _PARTS_DIR).mkdir(parents=True)
        atomic_write_bytes(plan_path, json.dumps(plan, sort_keys=True).encode())

    def _load_committed_parts(self) -> None:
        """Keep shards whose manifest part was committed; delete temporaries and uncommitted shards."""
        parts_dir = self.stage / _PARTS_DIR
        n = 0
        while (parts_dir / f"{n:06d}.parquet").is_file():
            self._parts.append(pq.read_table(parts_dir / f"{n:06d}.parquet"))
            n += 1
        keep = {schema.shard_name(self.source, i) for i in range(n)} | {_PLAN_FILE, _PARTS_DIR}
        for p in self.stage.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in parts_dir.iterdir():
            if p.name not in {f"{i:06d}.parquet" for i in range(n)}:
                p.unlink()

    @property
    def num_shards(self) -> int:
        return len(self._parts) + (self._file is not None)

    @property
    def num_committed(self) -> int:
        """Samples in committed shards: what survives an interruption."""
        return sum(t.num_rows for t in self._parts)

    @property
    def last_committed(self) -> tuple[int, int] | None:
        """(class_id, index_in_class) of the last committed sample, or None if nothing is committed."""
        if not self._parts or self._parts[-1].num_rows == 0:
            return None
        last = self._parts[-1].slice(self._parts[-1].num_rows - 1)
        return int(last["class_id"][0].as_py()), int(last["index_in_class"][0].as_py())

    # -- writing ------------------------------------------------------------------------------------------
    def add(self, class_id: int, index_in_class: int, data: bytes, fmt: str) -> None:
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
        f = self._file
        # Members in sorted extension order, as webdataset's TarWriter writes them: cls, then jpg|png.
        f.write(_tar_header(f"{key}.{schema.LABEL_EXTENSION}", len(label)))
        f.write(label + _padding(len(label)))
        f.write(_tar_header(f"{key}.{fmt}", len(data)))
        offset = f.tell()
        f.write(data)
        f.write(_padding(len(data)))
        rows = self._rows
        rows["key"].append(key)
        rows["class_id"].append(class_id)
        rows["index_in_class"].append(index_in_class)
        rows["offset"].append(offset)
        rows["size"].append(len(data))
        rows["format"].append(fmt)
        rows["crc32"].append(zlib.crc32(data))
        self._shard_bytes += len(data)
        if len(rows["key"]) >= self.max_shard_samples or self._shard_bytes >= self.max_shard_bytes:
            self._close_shard()

    def _open_shard(self) -> None:
        name = schema.shard_name(self.source, len(self._parts))
        self._file = open(self.stage / (name + ".tmp"), "wb", buffering=1 << 20)
        self._rows = {f.name: [] for f in schema.SAMPLE_SCHEMA if f.name != "shard"}
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        f = self._file
        f.write(b"\0" * (2 * _BLOCK))
        f.write(_padding(f.tell(), _RECORD))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        index = len(self._parts)
        name = schema.shard_name(self.source, index)
        os.replace(self.stage / (name + ".tmp"), self.stage / name)
        _fsync_dir(self.stage)
        rows = dict(self._rows, shard=[index] * len(self._rows["key"]))
        table = pa.Table.from_pydict(rows, schema=schema.SAMPLE_SCHEMA)
        _atomic_write_parquet(table, self.stage / _PARTS_DIR / f"{index:06d}.parquet")
        self._parts.append(table)

    def abort(self) -> None:
        """Close the open shard file without committing it (the staging folder stays resumable)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, classes: Sequence[ClassRecord], info: dict[str, Any]) -> schema.SourceInfo:
        """Write the manifests and publish the source.

        Args:
            classes: every class of the source in class-id order, with its expected image count.
            info: the SourceInfo fields the converter knows (origin, converter_version, benchmark,
                dataset_spec, sampling_spec, extra); counts and shards are filled in here.
        """
        if self._file is not None:
            self._close_shard()
        samples = pa.concat_tables(self._parts) if self._parts else schema.SAMPLE_SCHEMA.empty_table()
        class_of_sample = samples["class_id"].to_numpy()
        rows: dict[str, list] = {f.name: [] for f in schema.CLASS_SCHEMA}
        start = 0
        for c in classes:
            end = start + c.num_images
            if c.split not in schema.SPLITS:
                raise ValueError(f"class {c.class_id}: split {c.split!r} is not one of {schema.SPLITS}")
            written = int(np.count_nonzero(class_of_sample[start:end] == c.class_id))
            if written != c.num_images:
                raise ValueError(f"class {c.class_id}: {c.num_images} images expected, {written} written")
            for field, value in (("class_id", c.class_id), ("name", c.name), ("split", c.split),
                                 ("superclass", c.superclass), ("num_images", c.num_images),
                                 ("first_sample", start)):
                rows[field].append(value)
            start = end
        if start != samples.num_rows:
            raise ValueError(f"{samples.num_rows} samples written, classes account for {start}")
        class_table = pa.Table.from_pydict(rows, schema=schema.CLASS_SCHEMA)

        index = np.empty(samples.num_rows, dtype=schema.INDEX_DTYPE)
        for field in ("offset", "size", "shard"):
            index[field] = samples[field].to_numpy()
        shards = tuple(
            schema.ShardInfo(name=schema.shard_name(self.source, i), num_samples=t.num_rows,
                             num_bytes=(self.stage / schema.shard_name(self.source, i)).stat().st_size)
            for i, t in enumerate(self._parts)
        )
        per_split = {s: rows["split"].count(s) for s in schema.SPLITS}
        source_info = schema.SourceInfo(
            format_version=schema.FORMAT_VERSION, group=self.group, source=self.source,
            num_classes=len(classes), num_samples=samples.num_rows, classes_per_split=per_split,
            shards=shards, **info,
        )
        _atomic_write_parquet(samples, self.stage / schema.SAMPLES_FILE)
        _atomic_write_parquet(class_table, self.stage / schema.CLASSES_FILE)
        with open(self.stage / (schema.INDEX_FILE + ".tmp"), "wb") as f:
            np.save(f, index)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.stage / (schema.INDEX_FILE + ".tmp"), self.stage / schema.INDEX_FILE)
        shutil.rmtree(self.stage / _PARTS_DIR)
        (self.stage / _PLAN_FILE).unlink()
        atomic_write_bytes(self.stage / schema.SOURCE_FILE, source_info.to_json().encode())
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.stage, self.final)
        _fsync_dir(self.final.parent)
        return source_info
