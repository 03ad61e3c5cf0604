"""Reading and checking "ordered" sources (format version 2): provenance.parquet in, rows per role / errors out.

An ordered source (a VTAB task) keeps its samples in source order: support rows, then query rows, each in
TFDS canonical order. `provenance.parquet` holds one row per sample (`schema.PROVENANCE_SCHEMA`): its role,
the TFDS split slice it came from, its canonical index in that split, the raw value its label was derived
from and TFDS's record id. The label itself is `samples.parquet`'s `class_id` (and the tar's `.cls`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from manifests import schema
from manifests.reader import ManifestError, SourceReader, read_manifest


def read_provenance(reader: SourceReader) -> pa.Table:
    """provenance.parquet of an ordered source, schema-checked; ManifestError for other layouts."""
    if reader.info.layout != "ordered":
        raise ManifestError(f"{reader.path}: layout {reader.info.layout!r} has no {schema.PROVENANCE_FILE}")
    table = read_manifest(reader.path / schema.PROVENANCE_FILE, schema.PROVENANCE_SCHEMA)
    if table.num_rows != reader.num_samples:
        raise ManifestError(f"{reader.path / schema.PROVENANCE_FILE}: {table.num_rows} rows, "
                            f"source.json says {reader.num_samples} samples")
    return table


def role_rows(reader: SourceReader, role: str) -> np.ndarray:
    """Global sample indices (rows) of `role` ("support" or "query"), in source order."""
    if role not in schema.ROLES:
        raise ValueError(f"role {role!r} is not one of {schema.ROLES}")
    roles = read_provenance(reader)["role"].to_numpy(zero_copy_only=False)
    return np.flatnonzero(roles == role)


def verify_ordered(reader: SourceReader, class_ids: np.ndarray, index_in_class: np.ndarray) -> None:
    """Check classes.parquet and provenance.parquet of an ordered source against samples.parquet.

    Rules: classes are 0..C-1; `num_images` = the class's row count; `first_sample` = its first row (-1 if
    none); `index_in_class` = the row's rank among its class's rows; roles valid and support rows before
    query rows; no TFDS example (split, canonical index) appears twice, so support and query are disjoint.
    Raises ManifestError naming the file and the first violation.
    """
    where = reader.path / schema.CLASSES_FILE
    ids = reader.classes["class_id"].to_numpy()
    count = reader.classes["num_images"].to_numpy()
    first = reader.classes["first_sample"].to_numpy()
    _check(bool(np.array_equal(ids, np.arange(len(ids)))), where, "class ids are not 0..C-1")
    _check(len(ids) == reader.info.num_classes, where,
           f"{len(ids)} classes, source.json says {reader.info.num_classes}")
    _check(class_ids.size == 0 or (class_ids.min() >= 0 and class_ids.max() < len(ids)), where,
           "a sample's class_id has no class row")
    _check(bool(np.array_equal(np.bincount(class_ids, minlength=len(ids)), count)), where,
           "num_images differs from the samples' class counts")
    for c in range(len(ids)):
        rows = np.flatnonzero(class_ids == c)
        _check(int(first[c]) == (int(rows[0]) if rows.size else -1), where, f"class {c}: first_sample {first[c]}")
        _check(bool(np.array_equal(index_in_class[rows], np.arange(rows.size))), where,
               f"class {c}: index_in_class is not the rank of its rows")
    prov_path = reader.path / schema.PROVENANCE_FILE
    prov = read_provenance(reader)
    roles = prov["role"].to_numpy(zero_copy_only=False)
    codes = np.array([schema.ROLES.index(r) if r in schema.ROLES else -1 for r in roles], dtype=np.int64)
    _check(bool(np.all(codes >= 0)), prov_path, f"role not one of {schema.ROLES}")
    _check(bool(np.all(np.diff(codes) >= 0)), prov_path, "a support row comes after a query row")
    positions = list(zip(prov["tfds_split"].to_pylist(), prov["tfds_index"].to_pylist()))
    _check(len(set(positions)) == len(positions), prov_path, "a TFDS example appears twice (support and query "
                                                             "must be disjoint)")
    _check(bool(np.all(prov["tfds_index"].to_numpy() >= 0)), prov_path, "negative tfds_index")


def _check(ok: bool, where, message: str) -> None:
    if not ok:
        raise ManifestError(f"{where}: {message}")
