"""Meta-Dataset records folders (`<dataset>/{dataset_spec.json, 0..C-1.tfrecords}`) in, `<out>/md/<dataset>/` sources out.

Per dataset: load and check the spec, check that every class file exists (before anything is written),
cut the classes into runs (`manifests.writer.plan_runs`), then stream every record of a run (both CRCs,
label == file's class id, count == images_per_class) into its `RunWriter` in class-then-record order with
the image bytes untouched. Runs of every dataset are converted `--workers` at a time, so one big dataset
uses every worker, and the output is byte-identical for any number of workers. A dataset whose runs are
all written is finished and published by this process. A complete source with the same input fingerprint
and every published file at its recorded size is skipped; a staged one resumes after each run's last
committed (and re-checked) shard. The class table keeps the dataset's own splits; the MD-v2 view is chosen
when reading (`manifests.md_spec.spec_view`). `--fsync` makes every committed file survive a power loss too
(`manifests.staging`); a kill loses nothing without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from isal import isal_zlib

from manifests import schema
from manifests._version import __version__
from manifests.md_spec import MDSpec, load_md_spec
from manifests.staging import SourceStaging, output_lock, recover_publish
from manifests.writer import ClassRecord, RunWriter, is_complete, plan_runs, source_dir, warm_up

from convert._workers import run_tasks
from convert.tfrecord import ReadBuffer, RecordError, iter_records, read_md_example

GROUP = "md"
SPEC_FILE = "dataset_spec.json"
_FILE_PATTERN = "{}.tfrecords"  # the only pattern MD's reader supports (POOL_SUPPORTED = False)
_PROGRESS_EVERY = 256  # records between progress reports
_RECORD_OVERHEAD = 16  # framing bytes per record (length, two CRCs), counted in the bytes read

# Leading bytes of the two image formats the shard format stores (schema.IMAGE_FORMATS).
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))

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
class SourceResult:
    """What one source conversion did (one row of the summary table)."""

    source: str  # "<group>/<source>"
    status: str  # "converted" | "resumed" | "up to date"
    classes: int
    samples: int
    shards: int
    bytes: int  # total shard bytes
    seconds: float


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


def converter_version() -> str:
    """The lite-train version (written into every source.json); the package metadata gets it from the same
    constant, which is read here without importing importlib.metadata (part of every command's start-up)."""
    return __version__


def sniff_format(data: bytes | memoryview, where: str) -> str:
    """"jpg" or "png" from the magic bytes; RecordError otherwise."""
    head = bytes(data[:8])
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    raise RecordError(f"{where}: image bytes are neither JPEG nor PNG (start {head.hex() or 'empty'})")


def published_files_intact(path: Path, info: schema.SourceInfo) -> bool:
    """Every file a complete source publishes is present with the size source.json recorded."""
    sizes = {s.name: s.num_bytes for s in info.shards}
    sizes.update(info.extra.get("manifest_bytes", {}))
    for name in (schema.CLASSES_FILE, schema.SAMPLES_FILE, schema.INDEX_FILE):
        sizes.setdefault(name, None)
    for name, size in sizes.items():
        try:
            st = (path / name).stat()
        except OSError:
            return False
        if size is not None and st.st_size != size:
            return False
    return True


def up_to_date(out: Path, source: str, fingerprint: dict[str, Any]) -> schema.SourceInfo | None:
    """The SourceInfo of `<out>/md/<source>` if it is complete, was written from this fingerprint, and every
    published file is present with its recorded size; None otherwise (the source is converted again)."""
    if not is_complete(out, GROUP, source):
        return None
    folder = source_dir(out, GROUP, source)
    path = folder / schema.SOURCE_FILE
    try:
        info = schema.SourceInfo.from_json(path.read_text(), origin=str(path))
    except (ValueError, TypeError, KeyError):
        return None
    if info.extra.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    return info if published_files_intact(folder, info) else None


def plan_dataset(folder: Path, config: ConvertConfig) -> DatasetPlan:
    """Pre-flight one dataset folder: valid spec, name and file pattern, every class file present."""
    spec_path = folder / SPEC_FILE
    spec = load_md_spec(spec_path)
    if spec.name != folder.name:
        raise ValueError(f"{spec_path}: spec name {spec.name!r} differs from its folder name {folder.name!r}")
    schema.check_name("source", folder.name)
    pattern = spec.raw.get("file_pattern", _FILE_PATTERN)
    if pattern != _FILE_PATTERN:
        raise ValueError(f"{spec_path}: file_pattern {pattern!r} is not supported (only {_FILE_PATTERN!r})")
    files = tuple(folder / _FILE_PATTERN.format(c) for c in range(spec.num_classes))
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


def _checked_records(path: Path, class_id: int, expected: int, expected_from: str,
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
    for index, image, record_bytes in _checked_records(path, class_id, expected, f"images_per_class[{class_id}]",
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


@dataclasses.dataclass(frozen=True)
class RecordsComparison:
    """What `compare_with_records` checked: every record of every class file, in order."""

    source: str
    classes: int
    images: int
    bytes: int


def compare_with_records(source_path: str | os.PathLike, records: str | os.PathLike) -> RecordsComparison:
    """Re-read the TFRecords a converted MD source came from and check, record by record, that the image
    bytes and label equal the converted sample's (same class, same index), with equal counts.

    This is the byte-identity check for real Meta-Dataset records: `lite-convert verify OUT --records ROOT`.

    Raises:
        RecordError / ValueError: the first difference, naming the record file, the record index and the
            shard member it was compared with.
    """
    from manifests.reader import SourceReader  # here: `lite-convert md` never reads a source back

    reader = SourceReader(source_path)
    folder = Path(records) / reader.info.source
    images = nbytes = 0
    buffer = ReadBuffer()
    with reader:
        for class_id in range(reader.info.num_classes):
            first, count = reader.class_range(class_id)
            path = folder / _FILE_PATTERN.format(class_id)
            if not path.is_file():
                raise ValueError(f"{path}: missing record file for class {class_id} of {source_path}")
            for index, image, _ in _checked_records(path, class_id, count, f"converted samples of class {class_id}",
                                                    buffer):
                if reader.read(first + index) != image:
                    raise RecordError(f"{path}: record {index}: image bytes differ from {reader.locate(first + index)}")
                nbytes += len(image)
            images += count
    return RecordsComparison(reader.info.source, reader.info.num_classes, images, nbytes)


def source_result(info: schema.SourceInfo, status: str, start_time: float) -> SourceResult:
    """The summary row of a source described by `info`, timed from `start_time` (perf_counter)."""
    return SourceResult(f"{info.group}/{info.source}", status, info.num_classes, info.num_samples,
                        len(info.shards), sum(s.num_bytes for s in info.shards),
                        time.perf_counter() - start_time)


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
            recovered = recover_publish(Path(config.out), GROUP, plan.name, fsync=config.fsync)  # killed half-way
            done = up_to_date(Path(config.out), plan.name, plan.fingerprint)
            if done is not None:
                if progress:
                    progress(plan.name, plan.num_records, 0)
                results[i] = source_result(done, "resumed" if recovered else "up to date", start)
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
