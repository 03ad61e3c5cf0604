"""One source's staging folder: committed shards and parts in, manifests, `source.json` and a published source out.

The staging protocol, for both layouts (class-contiguous and ordered), is stated once in
docs/architecture.md, "Staging"; this module is its one implementation: the paths, the output lock, the plan
(resume or start afresh), finishing (shards linked under their global names, manifests streamed part by part,
`source.json` last), publishing (the old source swapped out, never half-deleted), the recovery of a publish
killed half-way, and the check that a published source is up to date. Shards and parts are written by
`manifests._shards.ShardWriter`; `manifests.writer` and `manifests.ordered_writer` are the two layouts' front
ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from manifests import schema
from manifests._assemble import assemble
from manifests._files import atomic_write_bytes, atomic_write_parquet, fsync_dir, write_error
from manifests._shards import Crc32, ShardWriter, SidePart

PLAN_FILE = "plan.json"
RUNS_DIR = "runs"
_OLD_SUFFIX = ".old"  # `.<source>.old`: the previous version of a source while a new one is swapped in
_LOCK_FILE = ".lite-convert.lock"


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a source layout changes in the staging protocol."""

    name: str  # one of schema.LAYOUTS, saved as source.json `layout`
    side: SidePart | None  # the second part each shard commits, streamed into its own manifest
    # Manifests written as one row group, as the ordered layout always was (so its bytes stay the same), rather
    # than row groups per part, which keeps memory bounded by one part.
    one_row_group: bool


CLASS_CONTIGUOUS = Layout("class-contiguous", side=None, one_row_group=False)
ORDERED = Layout("ordered", side=SidePart("prov", schema.PROVENANCE_SCHEMA, schema.PROVENANCE_FILE),
                 one_row_group=True)

# (samples per class, first row of each class or -1, number of samples) -> the class table; raises ValueError
# when the samples written contradict what the converter expected.
ClassTable = Callable[[np.ndarray, np.ndarray, int], pa.Table]


def staging_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / f".{source}.partial"


def source_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / source


def old_dir(root: Path, group: str, source: str) -> Path:
    return Path(root) / group / f".{source}{_OLD_SUFFIX}"


def is_complete(root: Path, group: str, source: str) -> bool:
    """True when `<root>/<group>/<source>/source.json` exists (it is written last)."""
    return (source_dir(root, group, source) / schema.SOURCE_FILE).is_file()


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


class Staging:
    """The staging folder of one source: recovery, the plan, the run folders, `write_manifests()`, `publish()`.

    Opening it settles whatever an interrupted earlier run left: a publish that was killed between its
    renames is completed or undone; a staging folder with a different plan (other input or shard limits)
    is discarded; one with the same plan is kept with its run folders (anything else in it is removed).

    Args:
        root, group, source: the source goes to `<root>/<group>/<source>/`.
        fingerprint: JSON-able description of the input and settings.
        layout: CLASS_CONTIGUOUS or ORDERED.
        plan_fields: what the layout adds to the plan (the runs; the layout's name).
        runs: number of run folders (see `manifests.writer.plan_runs`).
        max_shard_samples / max_shard_bytes: shard limits; part of the plan.
        fsync: fsync data files and manifests before their renames and folders after them (not part of
            the plan: it never changes the bytes written).
        crc32: the shard writers' CRC-32 implementation (see `ShardWriter`).
    """

    def __init__(self, root: Path, group: str, source: str, *, fingerprint: dict[str, Any], layout: Layout,
                 plan_fields: dict[str, Any], runs: int = 1,
                 max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES,
                 max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES, fsync: bool = False,
                 crc32: Crc32 = zlib.crc32):
        schema.check_name("group", group)
        schema.check_name("source", source)
        if max_shard_samples < 1 or max_shard_bytes < 1:
            raise ValueError("max_shard_samples and max_shard_bytes must be positive")
        self.root, self.group, self.source, self.layout = Path(root), group, source, layout
        self.stage = staging_dir(self.root, group, source)
        self.final = source_dir(self.root, group, source)
        self.old = old_dir(self.root, group, source)
        self.runs = runs
        self.max_shard_samples, self.max_shard_bytes = max_shard_samples, max_shard_bytes
        self.fsync, self.crc32 = fsync, crc32
        self.plan = json.loads(json.dumps(
            {"format_version": schema.FORMAT_VERSION, "max_shard_samples": max_shard_samples,
             "max_shard_bytes": max_shard_bytes, "fingerprint": fingerprint, **plan_fields}))
        recover_publish(self.root, group, source, fsync=fsync)
        self._start_or_resume()

    def finished_info(self) -> schema.SourceInfo | None:
        """The SourceInfo of a staging folder whose source.json was written for this plan (its `staging_plan`),
        else None: such a folder is finished and only waits to be published."""
        path = self.stage / schema.SOURCE_FILE
        try:
            info = schema.SourceInfo.from_json(path.read_text(), origin=str(path))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return info if info.extra.get("staging_plan") == self.plan else None

    def _start_or_resume(self) -> None:
        self.resumed = True  # work of an earlier, interrupted run is kept
        if self.finished_info() is not None:
            return  # finished, not yet published: publish() will do it
        plan_path = self.stage / PLAN_FILE
        try:
            same = json.loads(plan_path.read_text()) == self.plan
        except (OSError, ValueError):
            same = False
        if same:
            for p in self.stage.iterdir():  # what a killed finish left; the run folders' writers check those
                if p.name not in (PLAN_FILE, RUNS_DIR):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            return
        self.resumed = False
        if self.stage.exists():
            shutil.rmtree(self.stage)
        try:
            (self.stage / RUNS_DIR).mkdir(parents=True)
        except OSError as e:
            raise write_error(self.stage, "the staging folder", e) from None
        atomic_write_bytes(plan_path, json.dumps(self.plan, sort_keys=True).encode(), "the conversion plan",
                           fsync=self.fsync)

    def shard_writer(self, run: int, writer: type[ShardWriter] = ShardWriter, **kwargs) -> ShardWriter:
        """The writer of run folder `run` (0 <= run < runs), keeping its committed shards; `kwargs` go to it."""
        if not 0 <= run < self.runs:
            raise ValueError(f"run {run} is not in 0..{self.runs - 1}")
        return writer(self._run_folder(run), max_shard_samples=self.max_shard_samples,
                      max_shard_bytes=self.max_shard_bytes, fsync=self.fsync, crc32=self.crc32, side=self.layout.side,
                      **kwargs)

    def _run_folder(self, run: int) -> Path:
        return self.stage / RUNS_DIR / f"{run:06d}"

    def write_manifests(self, num_classes: int, class_table: ClassTable, info: dict[str, Any]) -> schema.SourceInfo:
        """Write the manifests and, last, source.json into the staging folder (call `publish()` next).

        The committed shards of all runs become the source's shards and their parts its manifests
        (`manifests._assemble.assemble`); the class table and source.json follow.

        Args:
            num_classes: class ids must lie in 0..num_classes-1.
            class_table: builds the class table from what was written (see `ClassTable`).
            info: the SourceInfo fields the converter knows (origin, converter_version, benchmark,
                dataset_spec, sampling_spec, extra, tfds); counts, shards and layout are filled in here, and
                the staging plan and the manifests' byte sizes are added to extra.
        """
        finished = self.finished_info()
        if finished is not None:
            return finished
        run_folders = [self._run_folder(run) for run in range(self.runs)]
        built = assemble(self.stage, self.source, run_folders, num_classes, side=self.layout.side,
                        one_row_group=self.layout.one_row_group, fsync=self.fsync)
        classes = class_table(built.counts, built.first, built.num_samples)
        atomic_write_parquet(classes, self.stage / schema.CLASSES_FILE, "the class manifest", fsync=self.fsync)
        try:
            for name in built.manifests:
                os.replace(self.stage / (name + ".tmp"), self.stage / name)
        except OSError as e:
            raise write_error(self.stage, "the sample manifests", e) from None
        splits = classes["split"].to_pylist()
        extra = dict(info.get("extra", {}), staging_plan=self.plan,
                     manifest_bytes={name: (self.stage / name).stat().st_size
                                     for name in (schema.CLASSES_FILE, *built.manifests)})
        source_info = schema.SourceInfo(
            format_version=schema.FORMAT_VERSION, group=self.group, source=self.source,
            num_classes=classes.num_rows, num_samples=built.num_samples,
            classes_per_split={s: splits.count(s) for s in schema.SPLITS},
            shards=built.shards, layout=self.layout.name, **dict(info, extra=extra),
        )
        if self.fsync:  # the shard links and renamed manifests before source.json marks the folder finished
            fsync_dir(self.stage)
        atomic_write_bytes(self.stage / schema.SOURCE_FILE, source_info.to_json().encode(), "source.json",
                           fsync=self.fsync)
        return source_info

    def publish(self) -> None:
        """Move the finished staging folder into place; an existing source is replaced, never half-deleted.

        Steps, each safe to kill: drop the run folders and the plan (source.json marks the staging folder
        finished), rename the old source to `.<source>.old`, rename the staging folder into place, remove the
        old copy. The next `Staging` (or `recover_publish`) completes or undoes a killed sequence.
        """
        if self.finished_info() is None:
            raise ValueError(f"{self.stage}: not finished (no source.json for this plan)")
        shutil.rmtree(self.stage / RUNS_DIR, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.stage / PLAN_FILE).unlink()
        if self.final.exists():
            if self.old.exists():
                shutil.rmtree(self.old)
            os.replace(self.final, self.old)
        self._swap_in()

    def _swap_in(self) -> None:
        """The last step of `publish` (a method: the crash-safety tests kill the publish here)."""
        swap_in(self.stage, self.final, self.old, self.fsync)


def swap_in(stage: Path, final: Path, old: Path, fsync: bool) -> None:
    """Rename a finished staging folder into place (fsyncing the group folder if asked), then remove `old`."""
    os.replace(stage, final)
    if fsync:
        fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_publish(root: Path, group: str, source: str, *, fsync: bool = False) -> bool:
    """Complete or undo a publish that was killed between its steps; True when it published a source.

    `.<source>.old` exists only while a publish runs. With the source in place, only the old copy is left to
    remove; without it, the finished staging folder is moved in (killed between the two renames), or, if
    there is none, the old source is put back.
    """
    stage, final, old = staging_dir(root, group, source), source_dir(root, group, source), old_dir(root, group, source)
    if not old.exists():
        return False
    if final.exists():
        shutil.rmtree(old)
        return False
    if (stage / schema.SOURCE_FILE).is_file():
        swap_in(stage, final, old, fsync)
        return True
    os.replace(old, final)
    return False


def published_files_intact(path: Path, info: schema.SourceInfo) -> bool:
    """Every file a complete source publishes is present, with the size source.json recorded (every shard;
    every manifest where `extra["manifest_bytes"]` lists it)."""
    sizes: dict[str, int | None] = {s.name: s.num_bytes for s in info.shards}
    sizes.update(info.extra.get("manifest_bytes", {}))
    manifests = (schema.CLASSES_FILE, schema.SAMPLES_FILE, schema.INDEX_FILE)
    if info.layout == ORDERED.name:
        manifests += (schema.PROVENANCE_FILE,)
    for name in manifests:
        sizes.setdefault(name, None)
    for name, size in sizes.items():
        try:
            st = (path / name).stat()
        except OSError:
            return False
        if size is not None and st.st_size != size:
            return False
    return True


def up_to_date(root: Path, group: str, source: str, fingerprint: dict[str, Any]) -> schema.SourceInfo | None:
    """The SourceInfo of `<root>/<group>/<source>` if it is complete, was written from this fingerprint, and
    every published file is present with its recorded size; None otherwise (the source is converted again)."""
    if not is_complete(root, group, source):
        return None
    folder = source_dir(root, group, source)
    path = folder / schema.SOURCE_FILE
    try:
        info = schema.SourceInfo.from_json(path.read_text(), origin=str(path))
    except (ValueError, TypeError, KeyError):
        return None
    if info.extra.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    return info if published_files_intact(folder, info) else None
