"""Writes one "ordered" source (format version 2, VTAB tasks): samples in source order in, shards + manifests out.

Unlike `SourceWriter` (class-contiguous Meta-Dataset sources), samples arrive in the order the source
defines — support rows, then query rows, each in TFDS canonical order — with any label, plus a provenance
row each (`schema.PROVENANCE_SCHEMA`). Tar members, keys (`schema.sample_key(label, rank in class)`) and
`samples.parquet` / `index.npy` are exactly those of the class-contiguous layout, so plain `webdataset`
and `manifests.SourceReader` read both alike.

Crash safety as `manifests.staging.SourceStaging`: everything is staged in `<root>/<group>/.<source>.partial/`;
a shard is renamed into place, then its provenance part, then its sample part (the commit mark) are written
atomically. A new writer with the same fingerprint keeps the committed shards that are still byte for byte
what their part describes (the first damaged one and all later ones are dropped) and reports
`num_committed`, the number of leading samples of the source's order that need not be added again.
`finish()` writes the manifests and, last, `source.json` (with the staging plan: a finished staging folder is
published by the next writer, not thrown away), then publishes as `SourceStaging.publish` does: the old
source is renamed to `.<source>.old`, the staging folder renamed in, the old copy removed; a new writer (or
`manifests.staging.recover_publish`) completes or undoes a sequence killed half-way.

Durability as in `manifests.writer`: a kill loses nothing without fsync; with `fsync=True` every shard,
part, manifest and `source.json` is fsynced before its rename and the folders after one (power loss).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from manifests import schema
from manifests.staging import _old_dir, _swap_in, finished_staging_info, publish_staged, recover_publish
from manifests.writer import (_BLOCK, _RECORD, _atomic_write_parquet, _fsync_dir, _padding, _read_table,
                              _shard_matches, _tar_header, atomic_write_bytes, source_dir, staging_dir)

_PLAN_FILE = "plan.json"
_PARTS_DIR = "parts"


@dataclasses.dataclass(frozen=True)
class SampleOrigin:
    """Where one sample of an ordered source came from: one row of provenance.parquet."""

    role: str  # one of schema.ROLES
    tfds_split: str  # TFDS split name
    tfds_slice: str  # the split string read, e.g. "train[2754:2954]"
    tfds_index: int  # position in the TFDS split's canonical order
    raw_value: float  # the value the label was derived from
    tfds_id: str | None = None  # TFDS's record id, when the reader gave one


class OrderedSourceWriter:
    """Append samples in source order; shards roll over by count and bytes, as in `SourceWriter`.

    Args:
        root, group, source: the source goes to `<root>/<group>/<source>/`.
        fingerprint: JSON-able description of the input and settings; a staged run resumes only if equal.
        max_shard_samples / max_shard_bytes: a shard is closed once it holds this many samples or bytes.
        fsync: fsync data files and manifests before their renames and folders after them (not part of
            the plan: it never changes the bytes written).
    """

    def __init__(self, root: Path, group: str, source: str, *, fingerprint: dict[str, Any],
                 max_shard_samples: int = schema.DEFAULT_MAX_SHARD_SAMPLES,
                 max_shard_bytes: int = schema.DEFAULT_MAX_SHARD_BYTES, fsync: bool = False):
        schema.check_name("group", group)
        schema.check_name("source", source)
        if max_shard_samples < 1 or max_shard_bytes < 1:
            raise ValueError("max_shard_samples and max_shard_bytes must be positive")
        self.root, self.group, self.source = Path(root), group, source
        self.stage = staging_dir(self.root, group, source)
        self.final = source_dir(self.root, group, source)
        self.old = _old_dir(self.root, group, source)
        self.max_shard_samples, self.max_shard_bytes = max_shard_samples, max_shard_bytes
        self.fsync = fsync
        self.plan = json.loads(json.dumps(
            {"format_version": schema.FORMAT_VERSION, "layout": "ordered", "max_shard_samples": max_shard_samples,
             "max_shard_bytes": max_shard_bytes, "fingerprint": fingerprint}))
        self._parts: list[tuple[pa.Table, pa.Table]] = []  # (samples, provenance) of each committed shard
        self._file = None
        self._rows: dict[str, list] = {}
        self._prov: dict[str, list] = {}
        recover_publish(self.root, group, source, fsync=fsync)  # a publish killed half-way
        self._finished = self.finished_info()  # finished, not yet published: finish() publishes it
        if self._finished is None:
            self._resume_or_start(self.plan)
        # Rebuilt from the committed parts: per-class counts (next index_in_class), TFDS positions seen
        # (no example may appear twice) and the role reached (support rows come before query rows).
        self._count: dict[int, int] = {}
        self._seen: set[tuple[str, int]] = set()
        self._role = 0
        for samples, prov in self._parts:
            for label in samples["class_id"].to_pylist():
                self._count[label] = self._count.get(label, 0) + 1
            self._seen.update(zip(prov["tfds_split"].to_pylist(), prov["tfds_index"].to_pylist()))
            if prov.num_rows:
                self._role = schema.ROLES.index(prov["role"][prov.num_rows - 1].as_py())

    def finished_info(self) -> schema.SourceInfo | None:
        """The SourceInfo of a staging folder whose source.json was written for this plan, else None."""
        return finished_staging_info(self.stage, self.plan)

    def _resume_or_start(self, plan: dict[str, Any]) -> None:
        plan_path = self.stage / _PLAN_FILE
        if plan_path.is_file():
            try:
                same = json.loads(plan_path.read_text()) == plan
            except ValueError:
                same = False
            if same:
                self._load_committed_parts()
                return
        if self.stage.exists():
            shutil.rmtree(self.stage)
        (self.stage / _PARTS_DIR).mkdir(parents=True)
        atomic_write_bytes(plan_path, json.dumps(plan, sort_keys=True).encode(), "the conversion plan",
                           fsync=self.fsync)

    def _load_committed_parts(self) -> None:
        """Keep the shards whose two parts exist (the sample part is the commit mark) and that are still byte for
        byte what their part describes (without fsync a power loss can lose pages of a renamed file); the
        first missing or damaged one and everything after it are deleted."""
        parts = self.stage / _PARTS_DIR
        n = 0
        while (parts / f"{n:06d}.parquet").is_file() and (parts / f"{n:06d}.prov.parquet").is_file():
            try:
                samples = _read_table(parts / f"{n:06d}.parquet")
                prov = _read_table(parts / f"{n:06d}.prov.parquet")
            except (OSError, pa.ArrowException):
                break
            if (samples.num_rows == 0 or prov.num_rows != samples.num_rows
                    or not _shard_matches(self.stage / schema.shard_name(self.source, n), samples)):
                break
            self._parts.append((samples, prov))
            n += 1
        keep = {schema.shard_name(self.source, i) for i in range(n)} | {_PLAN_FILE, _PARTS_DIR}
        for p in self.stage.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        names = {f"{i:06d}{ext}" for i in range(n) for ext in (".parquet", ".prov.parquet")}
        for p in parts.iterdir():
            if p.name not in names:
                p.unlink()

    @property
    def num_committed(self) -> int:
        """Samples in committed shards: the first `num_committed` samples of the source order survive (all of
        them for a finished, unpublished staging folder)."""
        if self._finished is not None:
            return self._finished.num_samples
        return sum(t.num_rows for t, _ in self._parts)

    def add(self, label: int, data: bytes, fmt: str, origin: SampleOrigin) -> None:
        """Append the next sample of the source order with its label and provenance."""
        if self._finished is not None:
            raise ValueError(f"{self.stage}: finished already (all {self.num_committed} samples committed)")
        if fmt not in schema.IMAGE_FORMATS:
            raise ValueError(f"image format {fmt!r} is not one of {schema.IMAGE_FORMATS}")
        if origin.role not in schema.ROLES:
            raise ValueError(f"role {origin.role!r} is not one of {schema.ROLES}")
        role = schema.ROLES.index(origin.role)
        if role < self._role:
            raise ValueError(f"a {origin.role} sample after {schema.ROLES[self._role]} samples: "
                             f"support rows come first")
        position = (origin.tfds_split, origin.tfds_index)
        if position in self._seen:
            raise ValueError(f"TFDS example {origin.tfds_split}[{origin.tfds_index}] added twice")
        if label < 0:
            raise ValueError(f"label {label} is negative")
        self._role = role
        self._seen.add(position)
        index_in_class = self._count.get(label, 0)
        self._count[label] = index_in_class + 1
        if self._file is None:
            self._open_shard()
        key = schema.sample_key(label, index_in_class)
        text = str(label).encode()
        f = self._file
        f.write(_tar_header(f"{key}.{schema.LABEL_EXTENSION}", len(text)))
        f.write(text + _padding(len(text)))
        f.write(_tar_header(f"{key}.{fmt}", len(data)))
        offset = f.tell()
        f.write(data)
        f.write(_padding(len(data)))
        for field, value in (("key", key), ("class_id", label), ("index_in_class", index_in_class),
                             ("offset", offset), ("size", len(data)), ("format", fmt), ("crc32", zlib.crc32(data))):
            self._rows[field].append(value)
        for field in schema.PROVENANCE_SCHEMA.names:
            self._prov[field].append(getattr(origin, field))
        self._shard_bytes += len(data)
        if len(self._rows["key"]) >= self.max_shard_samples or self._shard_bytes >= self.max_shard_bytes:
            self._close_shard()

    def _open_shard(self) -> None:
        name = schema.shard_name(self.source, len(self._parts))
        self._file = open(self.stage / (name + ".tmp"), "wb", buffering=1 << 20)
        self._rows = {f.name: [] for f in schema.SAMPLE_SCHEMA if f.name != "shard"}
        self._prov = {f.name: [] for f in schema.PROVENANCE_SCHEMA}
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        f = self._file
        f.write(b"\0" * (2 * _BLOCK))
        f.write(_padding(f.tell(), _RECORD))
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        f.close()
        self._file = None
        index = len(self._parts)
        name = schema.shard_name(self.source, index)
        os.replace(self.stage / (name + ".tmp"), self.stage / name)
        if self.fsync:
            _fsync_dir(self.stage)
        samples = pa.Table.from_pydict(dict(self._rows, shard=[index] * len(self._rows["key"])),
                                       schema=schema.SAMPLE_SCHEMA)
        prov = pa.Table.from_pydict(self._prov, schema=schema.PROVENANCE_SCHEMA)
        _atomic_write_parquet(prov, self.stage / _PARTS_DIR / f"{index:06d}.prov.parquet", "a provenance part",
                              fsync=self.fsync)
        _atomic_write_parquet(samples, self.stage / _PARTS_DIR / f"{index:06d}.parquet",  # the commit mark
                              "a shard's manifest part", fsync=self.fsync)
        self._parts.append((samples, prov))

    def abort(self) -> None:
        """Close the open shard without committing it (the staging folder stays resumable)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, class_names: Sequence[str], split: str, info: dict[str, Any]) -> schema.SourceInfo:
        """Write the manifests and source.json into the staging folder, then publish it (see `publish`).

        Args:
            class_names: name of every class, index = label; every label written must be below its length.
            split: the class split all classes belong to (VTAB tasks are evaluation tasks: "test").
            info: the SourceInfo fields the converter knows (origin, converter_version, benchmark,
                dataset_spec, sampling_spec, extra, tfds); counts, shards and layout are filled in here, and
                the staging plan is added to extra.
        """
        if self._finished is not None:  # finished by an earlier, interrupted run
            self.publish()
            return self._finished
        if split not in schema.SPLITS:
            raise ValueError(f"split {split!r} is not one of {schema.SPLITS}")
        if self._file is not None:
            self._close_shard()
        samples = (pa.concat_tables([s for s, _ in self._parts]) if self._parts
                   else schema.SAMPLE_SCHEMA.empty_table())
        prov = (pa.concat_tables([p for _, p in self._parts]) if self._parts
                else schema.PROVENANCE_SCHEMA.empty_table())
        labels = samples["class_id"].to_numpy()
        if labels.size and int(labels.max()) >= len(class_names):
            raise ValueError(f"label {int(labels.max())} written, but only {len(class_names)} class names given")
        counts = np.bincount(labels, minlength=len(class_names)) if labels.size else np.zeros(len(class_names), int)
        first = [int(np.argmax(labels == c)) if counts[c] else -1 for c in range(len(class_names))]
        classes = pa.Table.from_pydict({
            "class_id": list(range(len(class_names))), "name": list(class_names), "split": [split] * len(class_names),
            "superclass": [None] * len(class_names), "num_images": counts.tolist(), "first_sample": first,
        }, schema=schema.CLASS_SCHEMA)
        index = np.empty(samples.num_rows, dtype=schema.INDEX_DTYPE)
        for field in ("offset", "size", "shard"):
            index[field] = samples[field].to_numpy()
        shards = tuple(
            schema.ShardInfo(name=schema.shard_name(self.source, i), num_samples=t.num_rows,
                             num_bytes=(self.stage / schema.shard_name(self.source, i)).stat().st_size)
            for i, (t, _) in enumerate(self._parts)
        )
        source_info = schema.SourceInfo(
            format_version=schema.FORMAT_VERSION, group=self.group, source=self.source,
            num_classes=len(class_names), num_samples=samples.num_rows,
            classes_per_split={s: len(class_names) if s == split else 0 for s in schema.SPLITS},
            shards=shards, layout="ordered", **dict(info, extra=dict(info.get("extra", {}), staging_plan=self.plan)),
        )
        _atomic_write_parquet(samples, self.stage / schema.SAMPLES_FILE, "the sample manifest", fsync=self.fsync)
        _atomic_write_parquet(classes, self.stage / schema.CLASSES_FILE, "the class manifest", fsync=self.fsync)
        _atomic_write_parquet(prov, self.stage / schema.PROVENANCE_FILE, "the provenance manifest", fsync=self.fsync)
        buf = io.BytesIO()
        np.save(buf, index)
        atomic_write_bytes(self.stage / schema.INDEX_FILE, buf.getvalue(), "the sample index", fsync=self.fsync)
        if self.fsync:  # the renamed manifests before source.json marks the folder finished
            _fsync_dir(self.stage)
        atomic_write_bytes(self.stage / schema.SOURCE_FILE, source_info.to_json().encode(), "source.json",
                           fsync=self.fsync)
        self._finished = source_info
        self.publish()
        return source_info

    def publish(self) -> None:
        """Move the finished staging folder into place; an existing source is replaced, never half-deleted.

        Steps, each safe to kill (as `SourceStaging.publish`): drop the parts and the plan (source.json marks
        the staging folder finished), rename the old source to `.<source>.old`, rename the staging folder into
        place, remove the old copy. The next writer (`recover_publish`) completes or undoes a killed sequence.
        """
        if self._finished is None:
            raise ValueError(f"{self.stage}: not finished (no source.json for this plan)")
        # `_swap_in` looked up at call time: the durability tests replace it to kill the publish there.
        publish_staged(self.stage, self.final, self.old, _PARTS_DIR,
                       lambda: _swap_in(self.stage, self.final, self.old, self.fsync))
