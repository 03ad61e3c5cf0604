"""Meta-Dataset records folders (`<dataset>/{dataset_spec.json, 0..C-1.tfrecords}`) in, `<out>/md/<dataset>/` sources out.

Per dataset: load and check the spec, check that every class file exists (before anything is written),
cut the classes into runs (`manifests.writer.plan_runs`), then stream every record of a run (both CRCs,
label == file's class id, count == images_per_class) into its `RunWriter` in class-then-record order with
the image bytes untouched. Runs of every dataset are converted `--workers` at a time, so one big dataset
uses every worker, and the output is byte-identical for any number of workers. A dataset whose runs are
all written is finished and published by this process. A complete source with the same input fingerprint
and every published file at its recorded size is skipped; a staged one resumes after each run's last
committed (and re-checked) shard (the staging protocol: docs/architecture.md, "Staging"). The class table keeps
the dataset's own splits; the MD-v2 view is chosen when reading (`manifests.md_spec.spec_view`). `--fsync` makes
every committed file survive a power loss too; a kill loses nothing without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from isal import isal_zlib

from manifests import schema
from manifests.md_spec import MDSpec, load_md_spec
from manifests.staging import output_lock
from manifests.writer import ClassRecord, RunWriter, SourceStaging, plan_runs, warm_up

from convert._common import SourceResult, converter_version, published_result, sniff_format, source_result
from convert._workers import run_tasks
from convert.tfrecord import ReadBuffer, RecordError, iter_records, read_md_example

GROUP = "md"
SPEC_FILE = "dataset_spec.json"
FILE_PATTERN = "{}.tfrecords"  # the only pattern MD's reader supports (POOL_SUPPORTED = False)
_PROGRESS_EVERY = 256  # records between progress reports
_RECORD_OVERHEAD = 16  # framing bytes per record (length, two CRCs), counted in the bytes read

Progress = Callable[[str, int, int], None]  # (dataset, records done since last call, bytes since last call)


MAX_DEFAULT_WORKERS = 8  # each worker holds one class file in memory (ILSVRC's: ~150 MB)


def default_workers() -> int:
    """One converting process per CPU core this process may run on (its affinity: a batch job's share), at most
    MAX_DEFAULT_WORKERS. The output is the same for any number of workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """`lite-convert md` settings; one field per CLI flag. Saved in source.json `extra["convert_config"]`."""

    records: str  # MD records root: one folder per dataset
    out: str  # output root; sources go to <out>/md/<dataset>/
    datasets: tuple[str, ...] = ()  # dataset folder names; () = every folder with a dataset_spec.json
    workers: int = dataclasses.field(default_factory=default_workers)  # processes converting runs in parallel
    max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES
    max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES
    fsync: bool = False  # fsync every shard, manifest and folder before it counts (survives a power loss)

    def __post_init__(self):
        if self.workers < 1 or self.max_shard_samples < 1 or self.max_shard_bytes < 1:
            raise ValueError("--workers, --max-shard-samples and --max-shard-bytes must be positive")
        twice = sorted({d for d in self.datasets if self.datasets.count(d) > 1})
        if twice:
            raise ValueError(f"--datasets names {', '.join(twice)} more than once")


@dataclasses.dataclass(frozen=True)
class DatasetPlan:
    """A dataset that passed the pre-flight checks: its spec, class files, input fingerprint and runs."""

    name: str
    spec: MDSpec
    files: tuple[Path, ...]  # files[c] = the record file of class c
    fingerprint: dict[str, Any]
    runs: tuple[tuple[int, int], ...]  # (first class, end class) of each run, see manifests.writer.plan_runs

    @property
    def num_records(self) -> int:
        return sum(self.spec.images_per_class)


def plan_dataset(folder: Path, config: ConvertConfig) -> DatasetPlan:
    """Pre-flight one dataset folder: valid spec, name and file pattern, every class file present."""
    spec_path = folder / SPEC_FILE
    spec = load_md_spec(spec_path)
    if spec.name != folder.name:
        raise ValueError(f"{spec_path}: spec name {spec.name!r} differs from its folder name {folder.name!r}")
    schema.check_name("source", folder.name)
    pattern = spec.raw.get("file_pattern", FILE_PATTERN)
    if pattern != FILE_PATTERN:
        raise ValueError(f"{spec_path}: file_pattern {pattern!r} is not supported (only {FILE_PATTERN!r})")
    files = tuple(folder / FILE_PATTERN.format(c) for c in range(spec.num_classes))
    records = hashlib.sha256()
    sizes = []
    for c, path in enumerate(files):
        if not path.is_file():
            raise ValueError(f"{path}: missing record file for class {c} ({spec.num_classes} classes in {SPEC_FILE})")
        st = path.stat()
        sizes.append(st.st_size)
        records.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    fingerprint = {
        "spec_sha256": hashlib.sha256(spec_path.read_bytes()).hexdigest(),
        "records_sha256": records.hexdigest(),  # over (name, size, mtime) of every class file
        "num_files": len(files),
        "num_bytes": sum(sizes),
        "converter_version": converter_version(),
    }
    runs = plan_runs(sizes, spec.images_per_class, config.max_shard_samples, config.max_shard_bytes)
    return DatasetPlan(folder.name, spec, files, fingerprint, runs)


def plan_datasets(config: ConvertConfig) -> list[DatasetPlan]:
    """Pre-flight every selected dataset; raises on the first problem, before anything is written."""
    root = Path(config.records)
    if not root.is_dir():
        raise ValueError(f"{root}: records root is not a directory")
    if config.datasets:
        folders = [root / name for name in config.datasets]
        for folder in folders:
            if not (folder / SPEC_FILE).is_file():
                raise ValueError(f"{folder / SPEC_FILE}: missing (dataset {folder.name!r} was asked for)")
    else:
        folders = sorted(p.parent for p in root.glob(f"*/{SPEC_FILE}"))
        if not folders:
            raise ValueError(f"{root}: no dataset folder with a {SPEC_FILE}")
    return [plan_dataset(folder, config) for folder in folders]


def checked_records(path: Path, class_id: int, expected: int, expected_from: str,
                    buffer: ReadBuffer | None = None) -> Iterator[tuple[int, memoryview, int]]:
    """(index, image bytes, record bytes) of every record of one class file, in order, once its CRCs are
    checked and its label equals `class_id`; the file must hold exactly `expected` records, which
    `expected_from` names in errors (checked when the iteration ends). Image bytes are views into
    `buffer`, valid until it reads the next file."""
    count = 0
    for index, payload in enumerate(iter_records(path, buffer)):
        if index >= expected:
            raise RecordError(f"{path}: record {index}: more records than {expected_from} = {expected}")
        image, label = read_md_example(payload, f"{path}: record {index}")
        if label != class_id:
            raise RecordError(f"{path}: record {index}: label {label} differs from the file's class id {class_id}")
        yield index, image, len(payload)
        count += 1
    if count != expected:
        raise RecordError(f"{path}: {count} records, {expected_from} = {expected}")


def convert_run(plan: DatasetPlan, run: int, writer: RunWriter, progress: Progress | None = None) -> None:
    """Convert the classes of one run into its writer, after the writer's last committed sample."""
    first_class, end_class = plan.runs[run]
    resume = writer.last_committed  # (class, index) of the last sample that survived an interruption
    buffer = ReadBuffer()
    try:
        for class_id in range(first_class, end_class):
            expected = plan.spec.images_per_class[class_id]
            if resume is not None and (class_id < resume[0] or (class_id == resume[0] and resume[1] + 1 >= expected)):
                if progress:
                    progress(plan.name, expected, 0)
                continue  # finished before the interruption: not read again
            first = resume[1] + 1 if resume is not None and class_id == resume[0] else 0
            _convert_class(writer, plan.files[class_id], class_id, expected, first, plan.name, progress, buffer)
        writer.close()
    finally:
        writer.abort()


def _convert_class(writer: RunWriter, path: Path, class_id: int, expected: int, first: int,
                   name: str, progress: Progress | None, buffer: ReadBuffer) -> None:
    """Stream one class file into the writer, adding records `first..expected-1` (all are checked)."""
    pending = pending_bytes = 0
    for index, image, record_bytes in checked_records(path, class_id, expected, f"images_per_class[{class_id}]",
                                                      buffer):
        fmt = sniff_format(image, f"{path}: record {index}")
        if index >= first:
            writer.add(class_id, index, image, fmt)
        pending += 1
        pending_bytes += record_bytes + _RECORD_OVERHEAD
        if progress and pending >= _PROGRESS_EVERY:
            progress(name, pending, pending_bytes)
            pending = pending_bytes = 0
    if progress:
        progress(name, pending, pending_bytes)


def _source_fields(plan: DatasetPlan, config: ConvertConfig) -> dict[str, Any]:
    """The SourceInfo fields the converter knows. The class table and sampling spec keep the dataset's own
    splits (`benchmark` "md-v1"); views such as MD-v2 are applied when reading."""
    return {
        "origin": f"meta-dataset tfrecords ({Path(config.records) / plan.name})",
        "converter_version": converter_version(),
        "benchmark": "md-v1",
        "dataset_spec": plan.spec.raw,
        "sampling_spec": plan.spec.raw,
        # --workers and --fsync are left out: neither changes the output.
        "extra": {"fingerprint": plan.fingerprint,
                  "convert_config": {k: v for k, v in dataclasses.asdict(config).items()
                                     if k not in ("workers", "fsync")}},
    }


def _classes(spec: MDSpec) -> list[ClassRecord]:
    return [ClassRecord(c, spec.class_names[c], spec.class_split(c), spec.superclass_of(c), spec.images_per_class[c])
            for c in range(spec.num_classes)]


def convert_planned(plans: list[DatasetPlan], config: ConvertConfig,
                    progress: Progress | None = None) -> list[SourceResult]:
    """Convert pre-flighted datasets into `config.out` (locked meanwhile); results in plan order.

    Up-to-date datasets are skipped; the runs of every other dataset are converted `config.workers` at a
    time (in this process when there is one worker or one run), and each dataset is finished and published
    here once its runs are written. The first failure stops every worker and is raised; committed shards
    stay staged, so the same command resumes.
    """
    with output_lock(config.out) as lock_fd:
        start = time.perf_counter()
        results: list[SourceResult | None] = [None] * len(plans)
        stagings: dict[int, SourceStaging] = {}
        for i, plan in enumerate(plans):
            results[i] = published_result(config.out, GROUP, plan.name, plan.fingerprint, fsync=config.fsync,
                                          start_time=start)
            if results[i] is not None:
                if progress:
                    progress(plan.name, plan.num_records, 0)
                continue
            stagings[i] = SourceStaging(Path(config.out), GROUP, plan.name, fingerprint=plan.fingerprint,
                                        runs=len(plan.runs), max_shard_samples=config.max_shard_samples,
                                        max_shard_bytes=config.max_shard_bytes, fsync=config.fsync,
                                        crc32=isal_zlib.crc32)  # zlib's CRC-32, computed faster
        tasks = [(i, run) for i, staging in stagings.items() if staging.finished_info() is None
                 for run in range(len(plans[i].runs))]
        left = {i: sum(1 for t in tasks if t[0] == i) for i in stagings}

        def finish(i: int) -> None:
            staging = stagings[i]
            info = staging.finish(_classes(plans[i].spec), _source_fields(plans[i], config))
            staging.publish()
            results[i] = source_result(info, "resumed" if staging.resumed else "converted", start)

        def work(task: int, report: Progress | None) -> None:
            i, run = tasks[task]
            convert_run(plans[i], run, stagings[i].run_writer(run), report)

        def done(task: int, _result: None) -> None:
            i = tasks[task][0]
            left[i] -= 1
            if left[i] == 0:
                finish(i)

        if config.workers == 1 or len(tasks) <= 1:
            for task in range(len(tasks)):
                work(task, progress)
                done(task, None)
        else:
            warm_up()
            run_tasks(len(tasks), work, done, workers=config.workers, on_progress=progress, close_fds=(lock_fd,))
        for i in stagings:  # finished before an interruption, not yet published (after forking: no threads)
            if left[i] == 0 and results[i] is None:
                if progress:
                    progress(plans[i].name, plans[i].num_records, 0)
                finish(i)
    return results  # type: ignore[return-value]
