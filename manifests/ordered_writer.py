"""The ordered layout (format version 2, VTAB tasks): samples in source order with provenance in, a source out.

Unlike the class-contiguous layout (`manifests.writer`), samples arrive in the order the source defines —
support rows, then query rows, each in TFDS canonical order — with any label, plus a provenance row each
(`schema.PROVENANCE_SCHEMA`). Tar members, keys (`schema.sample_key(label, rank in class)`) and
`samples.parquet` / `index.npy` are exactly those of the class-contiguous layout, so plain `webdataset`
and `manifests.SourceReader` read both alike.

`OrderedSourceWriter` is a one-run staging folder in the ordered layout (each shard commits its provenance
part before its sample part) and follows the staging protocol of docs/architecture.md, "Staging": a new
writer with the same fingerprint keeps the committed shards that are still intact and reports
`num_committed`, the number of leading samples of the source order that need not be added again; a
finished staging folder is published by the next writer, not thrown away.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from manifests import schema
from manifests._arrow import arrow_table
from manifests.staging import ORDERED, Staging


@dataclasses.dataclass(frozen=True)
class SampleOrigin:
    """Where one sample of an ordered source came from: one row of provenance.parquet (same field names)."""

    role: str  # one of schema.ROLES
    tfds_split: str  # TFDS split name
    tfds_slice: str  # the split string read, e.g. "train[2754:2954]"
    tfds_index: int  # position in the TFDS split's canonical order
    raw_value: float  # the value the label was derived from
    tfds_id: str | None = None  # TFDS's record id, when the reader gave one


def _class_table(names: Sequence[str], split: str, counts: np.ndarray, first: np.ndarray,
                 num_samples: int) -> pa.Table:
    """One row per class 0..C-1 (a class may have no sample): its count and first row (-1 if none)."""
    return arrow_table(schema.CLASS_SCHEMA, {
        "class_id": list(range(len(names))), "name": list(names), "split": [split] * len(names),
        "superclass": [None] * len(names), "num_images": counts, "first_sample": first,
    })


class OrderedSourceWriter:
    """Append samples in source order; shards roll over by count and bytes, as in the class-contiguous layout.

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
        self.staging = Staging(root, group, source, fingerprint=fingerprint, layout=ORDERED,
                               plan_fields={"layout": ORDERED.name}, max_shard_samples=max_shard_samples,
                               max_shard_bytes=max_shard_bytes, fsync=fsync)
        self.stage, self.final = self.staging.stage, self.staging.final
        # Rebuilt from the committed parts on a resume: per-class counts (next index_in_class), TFDS positions
        # seen (no example may appear twice) and the role reached (support rows come before query rows).
        self._count: dict[int, int] = {}
        self._seen: set[tuple[str, int]] = set()
        self._role = 0
        self._finished = self.staging.finished_info()  # finished, not yet published: finish() publishes it
        self._run = None if self._finished is not None else self.staging.shard_writer(0, on_kept=self._kept)

    def _kept(self, samples: pa.Table, prov: pa.Table) -> None:
        for label in samples["class_id"].to_pylist():
            self._count[label] = self._count.get(label, 0) + 1
        self._seen.update(zip(prov["tfds_split"].to_pylist(), prov["tfds_index"].to_pylist()))
        self._role = schema.ROLES.index(prov["role"][prov.num_rows - 1].as_py())

    @property
    def num_committed(self) -> int:
        """Samples in committed shards: the first `num_committed` samples of the source order survive (all of
        them for a finished, unpublished staging folder)."""
        return self._finished.num_samples if self._finished is not None else self._run.num_committed

    def add(self, label: int, data: bytes, fmt: str, origin: SampleOrigin) -> None:
        """Append the next sample of the source order with its label and provenance."""
        if self._finished is not None:
            raise ValueError(f"{self.stage}: finished already (all {self.num_committed} samples committed)")
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
        index_in_class = self._count.get(label, 0)
        self._run.add(label, index_in_class, data, fmt, origin)  # checks the format before writing anything
        self._role = role
        self._seen.add(position)
        self._count[label] = index_in_class + 1

    def abort(self) -> None:
        """Close the open shard without committing it (the staging folder stays resumable)."""
        if self._run is not None:
            self._run.abort()

    def finish(self, class_names: Sequence[str], split: str, info: dict[str, Any]) -> schema.SourceInfo:
        """Write the manifests and source.json into the staging folder, then publish it (see `publish`).

        Args:
            class_names: name of every class, index = label; every label written must be below its length.
            split: the class split all classes belong to (VTAB tasks are evaluation tasks: "test").
            info: the SourceInfo fields the converter knows (origin, converter_version, benchmark,
                dataset_spec, sampling_spec, extra, tfds); counts, shards and layout are filled in here, and
                the staging plan and the manifests' sizes are added to extra.
        """
        if self._finished is None:  # else finished by an earlier, interrupted run: only the publish is left
            if split not in schema.SPLITS:
                raise ValueError(f"split {split!r} is not one of {schema.SPLITS}")
            self._run.close()
            names = tuple(class_names)
            self._finished = self.staging.write_manifests(len(names), functools.partial(_class_table, names, split),
                                                          info)
        self.publish()
        return self._finished

    def publish(self) -> None:
        """Move the finished staging folder into place (`manifests.staging.Staging.publish`)."""
        self.staging.publish()
