"""One source's staging folder: committed run shards in -> manifests, `source.json` and a published source out.

Everything is staged in a hidden folder `<root>/<group>/.<source>.partial/` (`plan.json` + `runs/<run>/`,
written by `manifests.writer.RunWriter`). `SourceStaging.finish()` links the run shards under their global
names, writes the manifests (streamed part by part, never the whole sample table in memory) and, last,
`source.json`; `publish()` then swaps the staging folder into `<root>/<group>/<source>/`. Every step can be
killed: opening a `SourceStaging` (or `recover_publish`) completes or undoes an interrupted publish, and a
finished staging folder is published, not thrown away. A reader never sees a half-written source. With
`fsync=True` every data file and manifest is also fsynced before its rename and every folder after one, so
that a published source survives a power loss too; without it (the default) a kill still loses nothing, and
staged shards are re-checked before a rerun resumes (see `manifests.writer`).
`SourceWriter` is the one-run front end (MNIST, tests, benchmarks); `output_lock` keeps a second converter
out of an output root.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import schema
from manifests.writer import (ClassRecord, RunWriter, _arrow_array, _arrow_table, _atomic_write_parquet, _fsync_dir,
                              _numpy_column, _read_table, _write_error, atomic_write_bytes, source_dir, staging_dir)

_PLAN_FILE = "plan.json"
_RUNS_DIR = "runs"
_OLD_SUFFIX = ".old"  # `.<source>.old`: the previous version of a source while a new one is swapped in
_LOCK_FILE = ".lite-convert.lock"
_PARQUET_BATCH = 1 << 16  # rows per row group when manifests are streamed


@contextlib.contextmanager
def output_lock(root: str | os.PathLike) -> Iterator[int]:
    """Hold an exclusive lock on an output root while converting into it (`<root>/.lite-convert.lock`).

    Yields the lock file's descriptor (forked workers close their copy: only this process holds the lock).

    Raises:
        ValueError: another process holds it: "another lite-convert (pid N) is writing <root>".
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / _LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ValueError(f"another lite-convert (pid {holder}) is writing {root}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting process)



def _run_folder(stage: Path, run: int) -> Path:
    return stage / _RUNS_DIR / f"{run:06d}"


class SourceStaging:
    """The staging folder of one source: recovery, the plan, the runs, `finish()` and `publish()`.

    Opening it settles whatever an interrupted earlier run left: a publish that was killed between its
    renames is completed or undone; a staging folder with a different plan (other input or shard limits)
    is discarded; one with the same plan is kept, with its committed shards.

    Args:
        root, group, source: the source goes to `<root>/<group>/<source>/`.
        fingerprint: JSON-able description of the input and settings.
        runs: number of runs (see `plan_runs`); part of the plan.
        max_shard_samples / max_shard_bytes: shard limits; part of the plan.
        fsync: fsync data files and manifests before their renames and folders after them (not part of
            the plan: it never changes the bytes written).
        crc32: the run writers' CRC-32 implementation (see `RunWriter`).
    """

    def __init__(self, root: Path, group: str, source: str, *, fingerprint: dict[str, Any], runs: int = 1,
                 max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES,
                 max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES, fsync: bool = False,
                 crc32: Callable[[bytes | memoryview], int] = zlib.crc32):
        schema.check_name("group", group)
        schema.check_name("source", source)
        if max_shard_samples < 1 or max_shard_bytes < 1:
            raise ValueError("max_shard_samples and max_shard_bytes must be positive")
        self.root, self.group, self.source = Path(root), group, source
        self.stage = staging_dir(self.root, group, source)
        self.final = source_dir(self.root, group, source)
        self.old = _old_dir(self.root, group, source)
        self.runs = runs
        self.max_shard_samples, self.max_shard_bytes = max_shard_samples, max_shard_bytes
        self.fsync, self.crc32 = fsync, crc32
        self.plan = json.loads(json.dumps(
            {"format_version": schema.FORMAT_VERSION, "max_shard_samples": max_shard_samples,
             "max_shard_bytes": max_shard_bytes, "runs": runs, "fingerprint": fingerprint}))
        self._recover()
        self._start_or_resume()

    # -- recovery -----------------------------------------------------------------------------------------
    def finished_info(self) -> schema.SourceInfo | None:
        """The SourceInfo of a staging folder whose source.json was written for this plan, else None."""
        return finished_staging_info(self.stage, self.plan)

    def _recover(self) -> None:
        recover_publish(self.root, self.group, self.source, fsync=self.fsync)

    def _start_or_resume(self) -> None:
        self.resumed = True  # work of an earlier, interrupted run is kept
        if self.finished_info() is not None:
            return  # finished, not yet published: publish() will do it
        plan_path = self.stage / _PLAN_FILE
        try:
            same = json.loads(plan_path.read_text()) == self.plan
        except (OSError, ValueError):
            same = False
        if same:
            return
        self.resumed = False
        if self.stage.exists():
            shutil.rmtree(self.stage)
        try:
            (self.stage / _RUNS_DIR).mkdir(parents=True)
        except OSError as e:
            raise _write_error(self.stage, "the staging folder", e) from None
        atomic_write_bytes(plan_path, json.dumps(self.plan, sort_keys=True).encode(), "the conversion plan",
                           fsync=self.fsync)

    def run_writer(self, run: int) -> RunWriter:
        """The writer of run `run` (0 <= run < runs), resuming its committed shards."""
        if not 0 <= run < self.runs:
            raise ValueError(f"run {run} is not in 0..{self.runs - 1}")
        return RunWriter(_run_folder(self.stage, run), max_shard_samples=self.max_shard_samples,
                         max_shard_bytes=self.max_shard_bytes, fsync=self.fsync, crc32=self.crc32)

    # -- finishing ----------------------------------------------------------------------------------------
    def _parts(self) -> list[Path]:
        """The part of every committed shard, in sample order (its shard is the same name with .tar)."""
        found = []
        for run in range(self.runs):
            folder, n = _run_folder(self.stage, run), 0
            while (folder / f"{n:06d}.parquet").is_file():
                found.append(folder / f"{n:06d}.parquet")
                n += 1
        return found

    def finish(self, classes: Sequence[ClassRecord], info: dict[str, Any]) -> schema.SourceInfo:
        """Write the manifests and source.json into the staging folder (call `publish()` next).

        The sample manifest is streamed part by part into samples.parquet and index.npy, so memory stays
        bounded by one part whatever the number of samples.

        Args:
            classes: every class of the source in class-id order, with its expected image count.
            info: the SourceInfo fields the converter knows (origin, converter_version, benchmark,
                dataset_spec, sampling_spec, extra); counts and shards are filled in here.
        """
        done = self.finished_info()
        if done is not None:
            return done
        parts = self._parts()
        num_samples = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        counts = np.zeros(max((c.class_id for c in classes), default=-1) + 1, dtype=np.int64)
        index_path = self.stage / schema.INDEX_FILE
        samples_path = self.stage / schema.SAMPLES_FILE
        shards = []
        try:
            with open(index_path.with_name(index_path.name + ".tmp"), "wb") as index_file, \
                    open(samples_path.with_name(samples_path.name + ".tmp"), "wb") as samples_file:
                np.lib.format.write_array_header_1_0(index_file, {
                    "descr": np.lib.format.dtype_to_descr(schema.INDEX_DTYPE), "fortran_order": False,
                    "shape": (num_samples,)})
                out = pq.ParquetWriter(samples_file, schema.SAMPLE_SCHEMA, compression="zstd")
                for g, path in enumerate(parts):
                    part = _read_table(path)
                    shard = schema.SAMPLE_SCHEMA.field("shard")
                    part = part.set_column(part.schema.get_field_index("shard"), shard,
                                           _arrow_array(shard, np.full(part.num_rows, g, np.int32)))
                    out.write_table(part, row_group_size=_PARQUET_BATCH)
                    class_ids = _numpy_column(part, "class_id")
                    if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= len(counts)):
                        raise ValueError(f"{path}: class ids outside the {len(classes)} classes given")
                    counts += np.bincount(class_ids, minlength=len(counts))
                    rows = np.empty(part.num_rows, dtype=schema.INDEX_DTYPE)  # (rows,) of this part
                    for field in ("offset", "size", "shard"):
                        rows[field] = _numpy_column(part, field)
                    index_file.write(rows.tobytes())
                    name = schema.shard_name(self.source, g)
                    target = self.stage / name
                    # Linked afresh: a link left by a killed finish() may name a shard rewritten since.
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
                    os.link(path.with_suffix(".tar"), target)
                    shards.append(schema.ShardInfo(name=name, num_samples=part.num_rows,
                                                   num_bytes=target.stat().st_size))
                out.close()
                for f in (index_file, samples_file):
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
        except OSError as e:
            raise _write_error(self.stage, "the sample manifests (samples.parquet, index.npy)", e) from None
        class_table = self._class_table(classes, counts, num_samples)
        _atomic_write_parquet(class_table, self.stage / schema.CLASSES_FILE, "the class manifest", fsync=self.fsync)
        try:
            os.replace(samples_path.with_name(samples_path.name + ".tmp"), samples_path)
            os.replace(index_path.with_name(index_path.name + ".tmp"), index_path)
        except OSError as e:
            raise _write_error(self.stage, "the sample manifests", e) from None
        splits = class_table["split"].to_pylist()
        extra = dict(info.get("extra", {}), staging_plan=self.plan,
                     manifest_bytes={name: (self.stage / name).stat().st_size
                                     for name in (schema.CLASSES_FILE, schema.SAMPLES_FILE, schema.INDEX_FILE)})
        source_info = schema.SourceInfo(
            format_version=schema.FORMAT_VERSION, group=self.group, source=self.source,
            num_classes=len(classes), num_samples=num_samples,
            classes_per_split={s: splits.count(s) for s in schema.SPLITS},
            shards=tuple(shards), **dict(info, extra=extra),
        )
        if self.fsync:  # the shard links and renamed manifests before source.json marks the folder finished
            _fsync_dir(self.stage)
        atomic_write_bytes(self.stage / schema.SOURCE_FILE, source_info.to_json().encode(), "source.json",
                           fsync=self.fsync)
        return source_info

    def _class_table(self, classes: Sequence[ClassRecord], counts: np.ndarray, num_samples: int) -> pa.Table:
        rows: dict[str, list] = {f.name: [] for f in schema.CLASS_SCHEMA}
        start = 0
        for c in classes:
            if c.split not in schema.SPLITS:
                raise ValueError(f"class {c.class_id}: split {c.split!r} is not one of {schema.SPLITS}")
            written = int(counts[c.class_id]) if 0 <= c.class_id < len(counts) else 0
            if written != c.num_images:
                raise ValueError(f"class {c.class_id}: {c.num_images} images expected, {written} written")
            for field, value in (("class_id", c.class_id), ("name", c.name), ("split", c.split),
                                 ("superclass", c.superclass), ("num_images", c.num_images),
                                 ("first_sample", start)):
                rows[field].append(value)
            start += c.num_images
        if start != num_samples:
            raise ValueError(f"{num_samples} samples written, classes account for {start}")
        return _arrow_table(schema.CLASS_SCHEMA, rows)

    def publish(self) -> None:
        """Move a finished staging folder into place; an existing source is replaced, never half-deleted.

        Steps, each safe to kill: drop the run folders and plan (source.json marks the staging folder
        finished), rename the old source to `.<source>.old`, rename the staging folder into place, remove
        the old copy. `SourceStaging` completes or undoes an interrupted sequence.
        """
        if self.finished_info() is None:
            raise ValueError(f"{self.stage}: not finished (no source.json for this plan)")
        publish_staged(self.stage, self.final, self.old, _RUNS_DIR, self._swap_in)

    def _swap_in(self) -> None:
        _swap_in(self.stage, self.final, self.old, self.fsync)


def finished_staging_info(stage: Path, plan: dict[str, Any]) -> schema.SourceInfo | None:
    """The SourceInfo of a staging folder whose source.json was written for `plan` (its `staging_plan`), else
    None: such a folder is finished and only waits to be published."""
    path = stage / schema.SOURCE_FILE
    try:
        info = schema.SourceInfo.from_json(path.read_text(), origin=str(path))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return info if info.extra.get("staging_plan") == plan else None


def publish_staged(stage: Path, final: Path, old: Path, work_dir: str, swap_in: Callable[[], None]) -> None:
    """The publish sequence of `SourceStaging` and `OrderedSourceWriter`, each step safe to kill: drop the
    staging folder's `work_dir` and plan (its source.json marks it finished), rename an existing source to
    `old`, then `swap_in()` (rename the staging folder into place, remove the old copy: `_swap_in`).
    `recover_publish` completes or undoes a sequence killed half-way."""
    shutil.rmtree(stage / work_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (stage / _PLAN_FILE).unlink()
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    swap_in()


def _old_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / f".{source}{_OLD_SUFFIX}"


def _swap_in(stage: Path, final: Path, old: Path, fsync: bool) -> None:
    os.replace(stage, final)
    if fsync:
        _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_publish(root: Path, group: str, source: str, *, fsync: bool = False) -> bool:
    """Complete or undo a publish that was killed between its steps; True when it published a source.

    `.<source>.old` exists only while a publish runs. With the source in place, only the old copy is left to
    remove; without it, the finished staging folder is moved in (killed between the two renames), or, if
    there is none, the old source is put back.
    """
    stage, final, old = staging_dir(root, group, source), source_dir(root, group, source), _old_dir(root, group, source)
    if not old.exists():
        return False
    if final.exists():
        shutil.rmtree(old)
        return False
    if (stage / schema.SOURCE_FILE).is_file():
        _swap_in(stage, final, old, fsync)
        return True
    os.replace(old, final)
    return False


class SourceWriter:
    """A source written sample by sample in one run (MNIST, tests, benchmarks): `add`..., `finish`.

    Args:
        root: output root; the source goes to `<root>/<group>/<source>/`.
        group: e.g. "md" or "vtab".
        source: e.g. "omniglot".
        fingerprint: JSON-able description of the input and settings. A staging folder left by an
            interrupted run is resumed only if its fingerprint is equal; otherwise it is discarded.
        max_shard_samples / max_shard_bytes: a shard is closed as soon as it holds this many samples or
            this many bytes of image data.
        fsync: fsync every file and folder before it counts (see `SourceStaging`).
    """

    def __init__(self, root: Path, group: str, source: str, *, fingerprint: dict[str, Any],
                 max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES,
                 max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES, fsync: bool = False):
        self.staging = SourceStaging(root, group, source, fingerprint=fingerprint, runs=1,
                                     max_shard_samples=max_shard_samples, max_shard_bytes=max_shard_bytes,
                                     fsync=fsync)
        self.stage, self.final = self.staging.stage, self.staging.final
        self._run = None if self.staging.finished_info() is not None else self.staging.run_writer(0)

    @property
    def num_committed(self) -> int:
        """Samples in committed shards: what survives an interruption."""
        info = self.staging.finished_info()
        return info.num_samples if info is not None else self._run.num_committed

    @property
    def last_committed(self) -> tuple[int, int] | None:
        """(class_id, index_in_class) of the last committed sample, or None if nothing is committed.

        A finished (unpublished) staging folder reports every sample as committed.
        """
        if self._run is None:
            return (1 << 31, 0)
        return self._run.last_committed

    def add(self, class_id: int, index_in_class: int, data: bytes | memoryview, fmt: str) -> None:
        """Append one sample. Samples must come in increasing (class_id, index_in_class) order."""
        self._run.add(class_id, index_in_class, data, fmt)

    def abort(self) -> None:
        """Close the open shard file without committing it (the staging folder stays resumable)."""
        if self._run is not None:
            self._run.abort()

    def finish(self, classes: Sequence[ClassRecord], info: dict[str, Any]) -> schema.SourceInfo:
        """Commit the last shard, write the manifests and publish the source (see `SourceStaging`)."""
        if self._run is not None:
            self._run.close()
        source_info = self.staging.finish(classes, info)
        self.staging.publish()
        return source_info
