"""Prepared TFDS datasets in, one "ordered" source per VTAB task out (`<out>/vtab/<task>/`, format version 2).

Per task (registry entry): open the pinned TFDS builder offline (GCS look-ups off; a manual dataset that is
not prepared yet is prepared from --manual-dir once every file it needs is there, anything else must be
prepared already), then read the protocol's support slices and its query slice in TFDS canonical order
(`interleave_cycle_length=1`, no file shuffling) with the image left encoded (`SkipDecoding`), derive each
label with `convert.vtab.labels` and append image bytes + label + provenance to an `OrderedSourceWriter`.
Image bytes are stored untouched, except dsprites' 0/1 masks, re-encoded as PNG with values x255 (as
VTAB's preprocessing multiplies them). Crash safety and durability are `lite-convert md`'s, one staging
protocol for both layouts (docs/architecture.md, "Staging"): a publish killed half-way is completed or undone
first, a task that is up to date (same fingerprint, every published file at its recorded size) is skipped, a
staged one resumes after its last committed and re-checked shard, a finished staged one is published, and
`--fsync` adds power-loss durability.

TensorFlow and TFDS are imported lazily, inside the functions that read data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from manifests import schema
from manifests.ordered_writer import OrderedSourceWriter, SampleOrigin
from manifests.staging import output_lock

from convert._common import SourceResult, converter_version, published_result, sniff_format, source_result
from convert.vtab.labels import LABEL_RULES, derive_label, derived_class_names
from convert.vtab.registry import PROTOCOL_GROUP, PROTOCOLS, Slice, VtabTask, get_task, parse_tasks

CLASS_SPLIT = "test"  # VTAB tasks are evaluation tasks: all their classes are test classes in MD's terms
_PROGRESS_EVERY = 64  # examples between progress reports

Progress = Callable[[str, int], None]  # (task id, examples done since the last call)


@dataclasses.dataclass(frozen=True)
class VtabConfig:
    """`lite-convert vtab` settings; one field per CLI flag. Saved in source.json `extra["convert_config"]`
    (without `fsync`, which never changes the output)."""

    tfds_data_dir: str  # TFDS data_dir holding the prepared datasets
    out: str  # output root; tasks go to <out>/vtab/<task>/ (protocol lite: <out>/vtab_lite/<task>/)
    manual_dir: str | None = None  # TFDS manual_dir for sun397, resisc45, diabetic_retinopathy
    tasks: tuple[str, ...] = ()  # task ids; () = VTAB-v2's 18 tasks (DTD only by name)
    protocol: str = "vtab1k"  # "vtab1k" (VTAB+MD) | "lite" (the LITE reader's splits)
    limit: int | None = None  # smoke runs: at most this many examples per slice (None = all)
    max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES
    max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES
    fsync: bool = False  # fsync every shard, manifest and folder before it counts (survives a power loss)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be positive")
        if self.max_shard_samples < 1 or self.max_shard_bytes < 1:
            raise ValueError("--max-shard-samples and --max-shard-bytes must be positive")

    @property
    def task_ids(self) -> tuple[str, ...]:
        return parse_tasks(",".join(self.tasks))


@dataclasses.dataclass(frozen=True)
class ReadSlice:
    """One slice to read, as far as the limit allows: role, TFDS slice, expected example count."""

    role: str  # "support" | "query"
    slice: Slice  # the registry's slice (recorded as provenance)
    count: int  # examples expected from it (checked while reading)


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """A task whose builder opened and whose slices resolved against the builder's split sizes."""

    task: VtabTask
    reads: tuple[ReadSlice, ...]
    class_names: tuple[str, ...]
    tfds_package_version: str
    fingerprint: dict[str, Any]

    @property
    def num_examples(self) -> int:
        return sum(r.count for r in self.reads)


def _tfds():
    """TFDS, set up for offline use: no GCS look-ups, and readable under protobuf >= 7 (see below).

    TensorFlow is imported here too, while tasks are planned: TFDS would import it lazily in the first
    `as_dataset`, and its several seconds would then count as the first task's conversion time.
    """
    import tensorflow  # noqa: F401
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import gcs_utils

    gcs_utils._is_gcs_disabled = True  # TFDS 4.9.6 probes GCS for metadata by default: never go online
    _protobuf_label_shim()
    return tfds


def _protobuf_label_shim() -> None:
    """TFDS 4.9.6 reads `FieldDescriptor.label` when restoring a prepared dataset's dataset_info.json;
    protobuf 7 removed that attribute (keeping `is_repeated`), so every prepared dataset fails to open.
    Restore the attribute from `is_repeated` (LABEL_REPEATED = 3, LABEL_OPTIONAL = 1)."""
    try:
        from google._upb._message import FieldDescriptor
    except ImportError:  # the pure-Python or C++ protobuf backends still have `label`
        return
    if not hasattr(FieldDescriptor, "label"):
        FieldDescriptor.label = property(lambda self: 3 if self.is_repeated else 1)


def check_manual_files(task: VtabTask, manual_dir: str | None) -> None:
    """ValueError listing every file the task's builder needs in --manual-dir and is missing."""
    if manual_dir is None:
        names = ", ".join(f.name for f in task.manual)
        raise ValueError(f"{task.task_id}: {task.tfds_spec} is not prepared and needs --manual-dir with {names}")
    root = Path(manual_dir)
    missing = [f for f in task.manual
               if not ((root / f.name).is_dir() if f.name.endswith("/") else (root / f.name).is_file())]
    if missing:
        listing = "; ".join(f"{root / f.name} ({f.what})" for f in missing)
        raise ValueError(f"{task.task_id}: {task.tfds_spec} needs these in --manual-dir, missing: {listing}")


def open_builder(task: VtabTask, config: VtabConfig):
    """The pinned, prepared TFDS builder of `task` (prepared from --manual-dir for manual datasets)."""
    tfds = _tfds()
    builder = tfds.builder(task.tfds_spec, data_dir=config.tfds_data_dir)
    if str(builder.version) != task.tfds_version:
        raise ValueError(f"{task.task_id}: TFDS resolved {task.tfds_spec} to version {builder.version}")
    if not builder.is_prepared():
        if not task.manual:
            raise ValueError(f"{task.task_id}: {builder.data_path} is not a prepared {task.tfds_spec}; prepare it "
                             f"offline first (tfds build {task.tfds_spec.split(':')[0]} --data_dir "
                             f"{config.tfds_data_dir} --manual_dir <dir with its archives>)")
        check_manual_files(task, config.manual_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=config.manual_dir, try_download_gcs=False))
    return builder


def _slice_count(task: VtabTask, builder, s: Slice, limit: int | None) -> int:
    splits = builder.info.splits
    if s.split not in splits:
        raise ValueError(f"{task.task_id}: {builder.data_path} has no split {s.split!r} "
                         f"(splits: {', '.join(splits) or 'none'})")
    size = splits[s.split].num_examples
    stop = size if s.stop is None else s.stop
    if not 0 <= s.start < stop <= size:
        raise ValueError(f"{task.task_id}: slice {s.spec} does not fit split {s.split} of {size} examples")
    return stop - s.start if limit is None else min(limit, stop - s.start)


def plan_task(task_id: str, config: VtabConfig) -> TaskPlan:
    """Open the task's builder and resolve its slices; raises before anything is written."""
    task = get_task(task_id)
    builder = open_builder(task, config)
    tfds = _tfds()
    features = builder.info.features
    for path in LABEL_RULES[task.label_rule].features + (task.image_feature,):
        head, _, rest = path.partition("/")
        if head not in features or (rest and rest not in features[head].feature):
            raise ValueError(f"{task.task_id}: {task.tfds_spec} has no feature {path!r}")
    reads = tuple(ReadSlice(role, s, _slice_count(task, builder, s, config.limit))
                  for role, slices in task.slices(config.protocol).items() for s in slices)
    names = derived_class_names(task.label_rule)
    if names is None:
        names = tuple(features["label"].names)
    if len(names) != task.num_classes:
        raise ValueError(f"{task.task_id}: {len(names)} class names, the registry says {task.num_classes} classes")
    info_file = Path(builder.data_path) / "dataset_info.json"
    fingerprint = {
        "task": task.task_id, "protocol": config.protocol, "tfds_spec": task.tfds_spec,
        "tfds_package": tfds.__version__, "limit": config.limit,
        "dataset_info_sha256": hashlib.sha256(info_file.read_bytes()).hexdigest() if info_file.is_file() else None,
        "reads": [[r.role, r.slice.spec, r.count] for r in reads],
        "converter_version": converter_version(),
    }
    return TaskPlan(task, reads, names, tfds.__version__, fingerprint)


def _flat(example: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in example.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_slice(builder, read: ReadSlice, image_feature: str, skip: int) -> Iterator[dict[str, Any]]:
    """Flat numpy examples of `read` in TFDS canonical order, the image still encoded; the first `skip` dropped."""
    tfds = _tfds()
    s = read.slice
    stop = s.start + read.count
    ds = builder.as_dataset(
        split=f"{s.split}[{s.start}:{stop}]", shuffle_files=False,
        decoders={image_feature: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1),
    )
    if skip:
        ds = ds.skip(skip)
    import tensorflow as tf

    try:
        for example in tfds.as_numpy(ds):
            yield _flat(example)
    except tf.errors.OpError as e:  # unreadable or truncated TFDS files: one line naming the slice
        raise ValueError(f"{builder.data_path}: reading {s.spec}: {e.message.splitlines()[0]}") from None


def _rescale_255(data: bytes, where: str) -> bytes:
    """dsprites: a 0/1 single-channel PNG re-encoded with values x255 (VTAB multiplies the mask by 255)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image)
    if not np.isin(pixels, (0, 1)).all():
        raise ValueError(f"{where}: dsprites mask holds values other than 0 and 1 (max {int(pixels.max())})")
    buf = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def convert_task(plan: TaskPlan, config: VtabConfig, progress: Progress | None = None) -> SourceResult:
    """Convert one planned task into `<out>/<group>/<task>/` (skip if up to date, resume if staged); the caller
    holds the output root's lock (`convert_vtab` does)."""
    start_time = time.perf_counter()
    task, group = plan.task, PROTOCOL_GROUP[config.protocol]
    done = published_result(config.out, group, task.task_id, plan.fingerprint, fsync=config.fsync,
                            start_time=start_time)
    if done is not None:
        if progress:
            progress(task.task_id, plan.num_examples)
        return done
    writer = OrderedSourceWriter(Path(config.out), group, task.task_id, fingerprint=plan.fingerprint,
                                 max_shard_samples=config.max_shard_samples, max_shard_bytes=config.max_shard_bytes,
                                 fsync=config.fsync)
    resumed = writer.num_committed
    builder = open_builder(task, config) if resumed < plan.num_examples else None
    try:
        position = 0  # examples of the task order handled so far
        for read in plan.reads:
            skip = min(max(resumed - position, 0), read.count)
            if progress and skip:
                progress(task.task_id, skip)
            if skip < read.count:
                _convert_slice(writer, builder, task, read, skip, progress)
            position += read.count
        info = writer.finish(plan.class_names, CLASS_SPLIT, {
            "origin": f"tfds {task.tfds_spec} ({config.tfds_data_dir})",
            "converter_version": converter_version(),
            "benchmark": config.protocol,
            "dataset_spec": None,
            "sampling_spec": None,
            "tfds": schema.TfdsOrigin(task.tfds_name, task.tfds_config, task.tfds_version, plan.tfds_package_version,
                                      config.protocol, task.label_rule),
            "extra": {"fingerprint": plan.fingerprint,
                      "convert_config": {k: v for k, v in dataclasses.asdict(config).items() if k != "fsync"},
                      "group": task.group, "label_rule": LABEL_RULES[task.label_rule].describe,
                      "rescale_255": task.rescale_255},
        })
    finally:
        writer.abort()
    return source_result(info, "converted" if resumed == 0 else "resumed", start_time)


def _convert_slice(writer: OrderedSourceWriter, builder, task: VtabTask, read: ReadSlice, skip: int,
                   progress: Progress | None) -> None:
    rule = LABEL_RULES[task.label_rule]
    count, pending = skip, 0
    for example in _read_slice(builder, read, task.image_feature, skip):
        index = read.slice.start + count
        where = f"{task.task_id}: {read.slice.split}[{index}]"
        if count >= read.count:
            raise ValueError(f"{where}: more examples than the {read.count} expected from {read.slice.spec}")
        derived = derive_label(where, task.label_rule, task.num_classes, {k: example[k] for k in rule.features})
        data = bytes(example[task.image_feature])
        if task.rescale_255:
            data = _rescale_255(data, where)
        fmt = sniff_format(data, where)
        tfds_id = example.get("tfds_id")
        writer.add(derived.label, data, fmt, SampleOrigin(
            read.role, read.slice.split, read.slice.spec, index, derived.raw,
            tfds_id.decode() if isinstance(tfds_id, bytes) else None))
        count += 1
        pending += 1
        if progress and pending >= _PROGRESS_EVERY:
            progress(task.task_id, pending)
            pending = 0
    if progress and pending:
        progress(task.task_id, pending)
    if count != read.count:
        raise ValueError(f"{task.task_id}: {read.slice.spec} gave {count} examples, {read.count} expected")


def convert_vtab(config: VtabConfig, progress: Progress | None = None,
                 planned: Callable[[list[TaskPlan]], None] | None = None) -> list[SourceResult]:
    """Plan every selected task (all builders open, all slices fit) before writing, then convert them in order,
    holding the output root's lock (`manifests.staging.output_lock`) from before planning to the end: a second
    converter on the same --out fails at once, before it prepares a manual dataset or writes anything.

    `planned` is called with the plans before any conversion starts (the CLI sizes its progress bars).
    """
    task_ids = config.task_ids  # unknown or repeated ids are refused before the output root is touched
    with output_lock(config.out):
        plans = [plan_task(t, config) for t in task_ids]
        if planned:
            planned(plans)
        return [convert_task(p, config, progress) for p in plans]
