"""A staging folder's committed shards and parts in, the source's shards and its streamed sample manifests out.

Finishing a source (`manifests.staging.Staging.write_manifests`, docs/architecture.md "Staging") starts here:
the committed shards of all run folders, in run then shard order, become the source's shards 0..S-1, hard
linked under their global names in the staging folder; their sample parts are streamed, shard column
renumbered, into `samples.parquet.tmp` and `index.npy.tmp`, and their side parts (the ordered layout's
provenance) into the side manifest's `.tmp`, so memory stays bounded by one part (by the whole manifest where
the layout writes one row group). The caller renames the `.tmp` files once the class table is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests import schema
from manifests._arrow import arrow_array, numpy_column, read_table
from manifests._files import write_error
from manifests._shards import SidePart, committed_shards, part_path, shard_path

_PARQUET_BATCH = 1 << 16  # rows per row group when manifests are streamed part by part


@dataclasses.dataclass(frozen=True)
class Assembled:
    """What `assemble` wrote and counted."""

    shards: tuple[schema.ShardInfo, ...]  # the source's shards, linked under their global names
    num_samples: int
    counts: np.ndarray  # (classes,) int64: samples per class
    first: np.ndarray  # (classes,) int64: row of each class's first sample, -1 for a class without samples
    manifests: tuple[str, ...]  # the manifests written as `<name>.tmp` (samples, index, side manifest)


def assemble(stage: Path, source: str, run_folders: Sequence[Path], num_classes: int, *, side: SidePart | None,
             one_row_group: bool, fsync: bool) -> Assembled:
    """Link the committed shards of `run_folders` into `stage` as `source`'s shards and stream their parts into
    the sample manifests (see the module doc); fsync the manifests if `fsync`.

    Raises:
        ValueError: a class id outside 0..num_classes-1, naming the part.
        OSError: a failed write, naming the staging folder.
    """
    parts = [(folder, n) for folder in run_folders for n in range(committed_shards(folder))]
    num_samples = sum(pq.ParquetFile(part_path(folder, n)).metadata.num_rows for folder, n in parts)
    manifests = (schema.SAMPLES_FILE, schema.INDEX_FILE) + (() if side is None else (side.manifest,))
    counts = np.zeros(num_classes, dtype=np.int64)
    first = np.full(num_classes, -1, dtype=np.int64)
    shard_field = schema.SAMPLE_SCHEMA.field("shard")
    shards, row = [], 0
    try:
        with contextlib.ExitStack() as files:
            out = {name: files.enter_context(open(stage / (name + ".tmp"), "wb")) for name in manifests}
            index = out[schema.INDEX_FILE]
            np.lib.format.write_array_header_1_0(index, {
                "descr": np.lib.format.dtype_to_descr(schema.INDEX_DTYPE), "fortran_order": False,
                "shape": (num_samples,)})
            tables = [_ParquetOut(out[schema.SAMPLES_FILE], schema.SAMPLE_SCHEMA, one_row_group)]
            if side is not None:
                tables.append(_ParquetOut(out[side.manifest], side.schema, one_row_group))
            for g, (folder, n) in enumerate(parts):
                part = read_table(part_path(folder, n))
                part = part.set_column(part.schema.get_field_index("shard"), shard_field,
                                       arrow_array(shard_field, np.full(part.num_rows, g, np.int32)))
                tables[0].write(part)
                if side is not None:
                    tables[1].write(read_table(part_path(folder, n, side)))
                class_ids = numpy_column(part, "class_id")
                if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= num_classes):
                    raise ValueError(f"{part_path(folder, n)}: class ids outside the {num_classes} classes given")
                counts += np.bincount(class_ids, minlength=num_classes)
                ids, at = np.unique(class_ids, return_index=True)  # each class's first row in this part
                unseen = first[ids] < 0
                first[ids[unseen]] = row + at[unseen]
                rows = np.empty(part.num_rows, dtype=schema.INDEX_DTYPE)  # (rows,) of this part
                for field in ("offset", "size", "shard"):
                    rows[field] = numpy_column(part, field)
                index.write(rows.tobytes())
                row += part.num_rows
                shards.append(_link(stage, schema.shard_name(source, g), shard_path(folder, n), part.num_rows))
            for table in tables:
                table.close()
            for f in out.values():
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
    except OSError as e:
        raise write_error(stage, "the sample manifests (samples.parquet, index.npy)", e) from None
    return Assembled(tuple(shards), num_samples, counts, first, manifests)


def _link(stage: Path, name: str, shard: Path, rows: int) -> schema.ShardInfo:
    target = stage / name
    # Linked afresh: a link left by a killed finish may name a shard rewritten since.
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    os.link(shard, target)
    return schema.ShardInfo(name=name, num_samples=rows, num_bytes=target.stat().st_size)


class _ParquetOut:
    """Tables in, one Parquet file out: each table as row groups of at most _PARQUET_BATCH rows, or, with
    `one_row_group`, all tables as one row group when closed."""

    def __init__(self, file: BinaryIO, table_schema: pa.Schema, one_row_group: bool):
        self._writer = pq.ParquetWriter(file, table_schema, compression="zstd")
        self._schema, self._tables = table_schema, [] if one_row_group else None

    def write(self, table: pa.Table) -> None:
        if self._tables is not None:
            self._tables.append(table)
        else:
            self._writer.write_table(table, row_group_size=_PARQUET_BATCH)

    def close(self) -> None:
        if self._tables is not None:
            self._writer.write_table(pa.concat_tables(self._tables) if self._tables else self._schema.empty_table())
        self._writer.close()
