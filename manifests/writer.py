"""The class-contiguous layout (Meta-Dataset sources): samples in (class, record) order in, a published source out.

A source's classes are cut into *runs* of consecutive classes (`plan_runs`, a pure function of the input); a
shard never spans a run boundary, so runs can be written by separate processes in any order, each through
its `RunWriter`, and the result is byte-identical whatever the number of workers. `SourceStaging` is the
source's staging folder in this layout: its `finish` checks every class's count against what the converter
expected and writes the class table. `SourceWriter` is the one-run front end (MNIST, tests, benchmarks).
The staging protocol (files, commit order, resume, publish) and the durability policy are those of both
layouts, in docs/architecture.md, "Staging".
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import schema
from manifests._arrow import arrow_table
from manifests._shards import Crc32, ShardWriter
from manifests.staging import CLASS_CONTIGUOUS, Staging


@dataclasses.dataclass(frozen=True)
class ClassRecord:
    """What the converter knows about one class; the writer adds the sample positions."""

    class_id: int
    name: str
    split: str  # one of schema.SPLITS
    superclass: int | None
    num_images: int  # expected count; finish() checks it against the samples written


def warm_up() -> None:
    """Pay pyarrow's one-time costs (the first Parquet write sets up the codec) in this process, so that
    processes forked from it do not each pay them again."""
    table = arrow_table(schema.SAMPLE_SCHEMA, {f.name: [] for f in schema.SAMPLE_SCHEMA})
    pq.write_table(table, pa.BufferOutputStream(), compression="zstd")


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


class RunWriter(ShardWriter):
    """The shards of one run of a class-contiguous source: `add(class_id, index_in_class, data, fmt)` takes the
    samples in strictly increasing (class_id, index_in_class) order, and `last_committed` says where a resumed
    run continues.

    Args: as `manifests._shards.ShardWriter` (folder, max_shard_samples, max_shard_bytes, fsync, crc32).
    """

    def __init__(self, folder: Path, **options: Any):
        super().__init__(folder, class_order=True, **options)


def _class_table(classes: Sequence[ClassRecord], counts: np.ndarray, first: np.ndarray, num_samples: int) -> pa.Table:
    """The class table of a class-contiguous source: each class's block starts where the previous one ends,
    and holds exactly the images the converter expected (`first` needs no check: verify_source checks it)."""
    rows: dict[str, list] = {f.name: [] for f in schema.CLASS_SCHEMA}
    start = 0
    for c in classes:
        if c.split not in schema.SPLITS:
            raise ValueError(f"class {c.class_id}: split {c.split!r} is not one of {schema.SPLITS}")
        written = int(counts[c.class_id]) if 0 <= c.class_id < len(counts) else 0
        if written != c.num_images:
            raise ValueError(f"class {c.class_id}: {c.num_images} images expected, {written} written")
        for field, value in (("class_id", c.class_id), ("name", c.name), ("split", c.split),
                             ("superclass", c.superclass), ("num_images", c.num_images), ("first_sample", start)):
            rows[field].append(value)
        start += c.num_images
    if start != num_samples:
        raise ValueError(f"{num_samples} samples written, classes account for {start}")
    return arrow_table(schema.CLASS_SCHEMA, rows)


class SourceStaging(Staging):
    """The staging folder of a class-contiguous source: `run_writer` per run, then `finish()` and `publish()`.

    Args:
        root, group, source: the source goes to `<root>/<group>/<source>/`.
        fingerprint: JSON-able description of the input and settings.
        runs: number of runs (see `plan_runs`); part of the plan.
        max_shard_samples / max_shard_bytes: shard limits; part of the plan.
        fsync: fsync every file and folder before it counts (not part of the plan).
        crc32: the run writers' CRC-32 implementation.
    """

    def __init__(self, root: Path, group: str, source: str, *, fingerprint: dict[str, Any], runs: int = 1,
                 max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES,
                 max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES, fsync: bool = False, crc32: Crc32 = zlib.crc32):
        super().__init__(root, group, source, fingerprint=fingerprint, layout=CLASS_CONTIGUOUS,
                         plan_fields={"runs": runs}, runs=runs, max_shard_samples=max_shard_samples,
                         max_shard_bytes=max_shard_bytes, fsync=fsync, crc32=crc32)

    def run_writer(self, run: int) -> RunWriter:
        """The writer of run `run` (0 <= run < runs), resuming its committed shards."""
        return self.shard_writer(run, RunWriter)  # type: ignore[return-value]

    def finish(self, classes: Sequence[ClassRecord], info: dict[str, Any]) -> schema.SourceInfo:
        """Write the manifests and source.json into the staging folder (call `publish()` next).

        Args:
            classes: every class of the source in class-id order, with its expected image count.
            info: the SourceInfo fields the converter knows (see `Staging.write_manifests`).
        """
        num_classes = max((c.class_id for c in classes), default=-1) + 1
        return self.write_manifests(num_classes, functools.partial(_class_table, classes), info)


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
