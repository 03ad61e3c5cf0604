"""Meta-Dataset records folders (`<dataset>/{dataset_spec.json, 0..C-1.tfrecords}`) in, `<out>/md/<dataset>/` sources out.

Per dataset: load and check the spec, check that every class file exists (before anything is written),
stream every record (both CRCs, label == file's class id, count == images_per_class) into a
`SourceWriter` in class-then-record order with the image bytes untouched. A complete source with the same
input fingerprint is skipped; a staged partial one resumes after `writer.last_committed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from manifests import schema
from manifests.md_spec import MDSpec, load_md_spec, md_v2_view, parse_md_spec
from manifests.reader import SourceReader
from manifests.writer import ClassRecord, SourceWriter, is_complete, source_dir

from convert.tfrecord import RecordError, iter_records, read_md_example

GROUP = "md"
SPEC_FILE = "dataset_spec.json"
BENCHMARKS = ("md-v1", "md-v2")
_FILE_PATTERN = "{}.tfrecords"  # the only pattern MD's reader supports (POOL_SUPPORTED = False)
_PROGRESS_EVERY = 256  # records between progress reports

# Leading bytes of the two image formats the shard format stores (schema.IMAGE_FORMATS).
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))

Progress = Callable[[str, int, int], None]  # (dataset, records done since last call, bytes since last call)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """`lite-convert md` settings; one field per CLI flag. Saved in source.json `extra["convert_config"]`."""

    records: str  # MD records root: one folder per dataset
    out: str  # output root; sources go to <out>/md/<dataset>/
    datasets: tuple[str, ...] = ()  # dataset folder names; () = every folder with a dataset_spec.json
    benchmark: str = "md-v1"  # "md-v1" | "md-v2": which class-split view the sources follow
    workers: int = 1  # datasets converted in parallel processes
    max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES
    max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"--benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        if self.workers < 1 or self.max_shard_samples < 1 or self.max_shard_bytes < 1:
            raise ValueError("--workers, --max-shard-samples and --max-shard-bytes must be positive")


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
    """A dataset that passed the pre-flight checks: its spec, its class files and input fingerprint."""

    name: str
    spec: MDSpec
    files: tuple[Path, ...]  # files[c] = the record file of class c
    fingerprint: dict[str, Any]

    @property
    def num_records(self) -> int:
        return sum(self.spec.images_per_class)


def converter_version() -> str:
    """The installed lite-train version (written into every source.json)."""
    try:
        return metadata.version("lite-train")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def sniff_format(data: bytes, where: str) -> str:
    """"jpg" or "png" from the magic bytes; RecordError otherwise."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    raise RecordError(f"{where}: image bytes are neither JPEG nor PNG (start {data[:8].hex() or 'empty'})")


def up_to_date(out: Path, source: str, fingerprint: dict[str, Any]) -> schema.SourceInfo | None:
    """The SourceInfo of `<out>/md/<source>` if it is complete and was written from this fingerprint."""
    if not is_complete(out, GROUP, source):
        return None
    path = source_dir(out, GROUP, source) / schema.SOURCE_FILE
    try:
        info = schema.SourceInfo.from_json(path.read_text(), origin=str(path))
    except (ValueError, TypeError, KeyError):
        return None
    return info if info.extra.get("fingerprint") == json.loads(json.dumps(fingerprint)) else None


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
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: missing record file for class {files.index(path)} "
                             f"({spec.num_classes} classes in {SPEC_FILE})")
    records = hashlib.sha256()
    total = 0
    for path in files:
        st = path.stat()
        total += st.st_size
        records.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    fingerprint = {
        "spec_sha256": hashlib.sha256(spec_path.read_bytes()).hexdigest(),
        "records_sha256": records.hexdigest(),  # over (name, size, mtime) of every class file
        "num_files": len(files),
        "num_bytes": total,
        "benchmark": config.benchmark,
        "converter_version": converter_version(),
    }
    return DatasetPlan(folder.name, spec, files, fingerprint)


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


def _class_view(spec: MDSpec, benchmark: str) -> tuple[MDSpec, dict]:
    """(spec whose splits the class table follows, sampling_spec dict) for a benchmark."""
    view = md_v2_view(spec) if benchmark == "md-v2" else None
    if view is None:
        return spec, spec.raw
    return parse_md_spec(view, f"md-v2 view of {spec.name}"), view


def convert_dataset(plan: DatasetPlan, config: ConvertConfig, progress: Progress | None = None) -> SourceResult:
    """Convert one pre-flighted dataset into `<out>/md/<name>/` (skip if up to date, resume if staged)."""
    start_time = time.perf_counter()
    out, spec = Path(config.out), plan.spec
    done = up_to_date(out, plan.name, plan.fingerprint)
    if done is not None:
        if progress:
            progress(plan.name, plan.num_records, 0)
        return source_result(done, "up to date", start_time)
    writer = SourceWriter(out, GROUP, plan.name, fingerprint=plan.fingerprint,
                          max_shard_samples=config.max_shard_samples, max_shard_bytes=config.max_shard_bytes)
    resume = writer.last_committed  # (class, index) of the last sample that survived an interruption
    try:
        for class_id, path in enumerate(plan.files):
            expected = spec.images_per_class[class_id]
            if resume is not None and (class_id < resume[0] or (class_id == resume[0] and resume[1] + 1 >= expected)):
                if progress:
                    progress(plan.name, expected, 0)
                continue  # finished before the interruption: not read again
            first = resume[1] + 1 if resume is not None and class_id == resume[0] else 0
            _convert_class(writer, path, class_id, expected, first, plan.name, progress)
        split_spec, sampling_spec = _class_view(spec, config.benchmark)
        classes = [ClassRecord(c, spec.class_names[c], split_spec.class_split(c), spec.superclass_of(c),
                               spec.images_per_class[c]) for c in range(spec.num_classes)]
        info = writer.finish(classes, {
            "origin": f"meta-dataset tfrecords ({Path(config.records) / plan.name})",
            "converter_version": converter_version(),
            "benchmark": config.benchmark,
            "dataset_spec": spec.raw,
            "sampling_spec": sampling_spec,
            "extra": {"fingerprint": plan.fingerprint, "convert_config": dataclasses.asdict(config)},
        })
    finally:
        writer.abort()
    return source_result(info, "converted" if resume is None else "resumed", start_time)


def _checked_records(path: Path, class_id: int, expected: int, expected_from: str) -> Iterator[tuple[int, bytes, int]]:
    """(index, image bytes, record bytes) of every record of one class file, in order, once its CRCs are
    checked and its label equals `class_id`; the file must hold exactly `expected` records, which
    `expected_from` names in errors (checked when the iteration ends)."""
    count = 0
    for index, payload in enumerate(iter_records(path)):
        where = f"{path}: record {index}"
        if index >= expected:
            raise RecordError(f"{where}: more records than {expected_from} = {expected}")
        image, label = read_md_example(payload, where)
        if label != class_id:
            raise RecordError(f"{where}: label {label} differs from the file's class id {class_id}")
        yield index, image, len(payload)
        count += 1
    if count != expected:
        raise RecordError(f"{path}: {count} records, {expected_from} = {expected}")


def _convert_class(writer: SourceWriter, path: Path, class_id: int, expected: int, first: int,
                   name: str, progress: Progress | None) -> None:
    """Stream one class file into the writer, adding records `first..expected-1` (all are checked)."""
    pending = pending_bytes = 0
    for index, image, record_bytes in _checked_records(path, class_id, expected, f"images_per_class[{class_id}]"):
        fmt = sniff_format(image, f"{path}: record {index}")
        if index >= first:
            writer.add(class_id, index, image, fmt)
        pending += 1
        pending_bytes += record_bytes + 16
        if progress and pending >= _PROGRESS_EVERY:
            progress(name, pending, pending_bytes)
            pending = pending_bytes = 0
    if progress:
        progress(name, pending, pending_bytes)


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
    reader = SourceReader(source_path)
    folder = Path(records) / reader.info.source
    images = nbytes = 0
    with reader:
        for class_id in range(reader.info.num_classes):
            first, count = reader.class_range(class_id)
            path = folder / _FILE_PATTERN.format(class_id)
            if not path.is_file():
                raise ValueError(f"{path}: missing record file for class {class_id} of {source_path}")
            for index, image, _ in _checked_records(path, class_id, count, f"converted samples of class {class_id}"):
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
    """Convert pre-flighted datasets, `config.workers` at a time in separate processes; results in plan order.

    Worker processes report progress through a queue that this process drains into `progress`. The
    first failure cancels the datasets not yet started and is raised once the running ones are done.
    """
    if config.workers == 1 or len(plans) == 1:
        return [convert_dataset(plan, config, progress) for plan in plans]
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # no inherited state (threads, open files) in the workers
    with ctx.Manager() as manager:
        messages = manager.Queue()
        workers = min(config.workers, len(plans))
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(_convert_in_worker, plan, config, messages): i for i, plan in enumerate(plans)}
            results: list[SourceResult | None] = [None] * len(plans)
            pending = set(futures)
            try:
                while pending:
                    done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                    _drain(messages, progress, queue_mod.Empty)
                    for future in done:
                        results[futures[future]] = future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                _drain(messages, progress, queue_mod.Empty)
    return results  # type: ignore[return-value]


def _convert_in_worker(plan: DatasetPlan, config: ConvertConfig, messages) -> SourceResult:
    return convert_dataset(plan, config, lambda name, n, nbytes: messages.put((name, n, nbytes)))


def _drain(messages, progress: Progress | None, empty: type[Exception]) -> None:
    while True:
        try:
            item = messages.get_nowait()
        except empty:
            return
        if progress:
            progress(*item)
