"""Format version 2: "ordered" sources (VTAB) written, read, verified; version-1 sources still read.

No TensorFlow: samples are made here, written with `manifests.ordered_writer.OrderedSourceWriter`.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from manifests import ManifestError, SourceReader, schema
from manifests.ordered_writer import OrderedSourceWriter, SampleOrigin
from manifests.provenance import read_provenance, role_rows
from manifests.verify import verify_source

# (role, tfds split, index, label): support from two slices, then query; labels not class-sorted
ROWS = [("support", "train", 0, 2), ("support", "train", 1, 0), ("support", "train", 50, 2),
        ("query", "test", 0, 1), ("query", "test", 1, 2), ("query", "test", 2, 0)]


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root, rows=ROWS, max_shard_samples=4):
    writer = OrderedSourceWriter(root, "vtab", "toy", fingerprint={"t": 1}, max_shard_samples=max_shard_samples)
    for i, (role, split, index, label) in enumerate(rows):
        writer.add(label, _png(i), "png", SampleOrigin(role, split, f"{split}[0:99]", index, float(label) + 0.5,
                                                        f"toy-{split}.tfrecord-00000-of-00001__{index}"))
    tfds = schema.TfdsOrigin("toy", None, "1.0.0", "4.9.6", "vtab1k", "label")
    return writer.finish(["a", "b", "c"], "test", {"origin": "test", "converter_version": "0", "benchmark": "vtab1k",
                                                   "dataset_spec": None, "sampling_spec": None, "tfds": tfds})


def test_ordered_source_keeps_source_order_and_reads_everywhere(tmp_path):
    info = _write(tmp_path)
    path = tmp_path / "vtab" / "toy"
    assert info.format_version == 2 and info.layout == "ordered" and len(info.shards) == 2
    verify_source(path)
    reader = SourceReader(path)
    assert reader.info == info
    samples = reader.samples().to_pydict()
    assert samples["class_id"] == [2, 0, 2, 1, 2, 0]  # source order, not class order
    assert samples["index_in_class"] == [0, 0, 1, 0, 2, 1]
    assert samples["key"][:3] == ["c00002_0000000", "c00000_0000000", "c00002_0000001"]
    assert [reader.read(i) for i in range(6)] == [_png(i) for i in range(6)]
    classes = reader.classes.to_pydict()
    assert classes["num_images"] == [2, 1, 3] and classes["first_sample"] == [1, 3, 0]
    prov = read_provenance(reader).to_pydict()
    assert prov["tfds_index"] == [0, 1, 50, 0, 1, 2] and prov["raw_value"][0] == 2.5
    assert np.array_equal(role_rows(reader, "support"), [0, 1, 2])
    with pytest.raises(ManifestError, match="not contiguous"):
        reader.class_range(2)
    shards = [str(path / s.name) for s in info.shards]
    got = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)]
    assert got == list(zip(samples["key"], samples["class_id"]))


@pytest.mark.parametrize("bad_rows, message", [
    ([("support", "train", 0, 1), ("query", "train", 0, 1)], "added twice"),
    ([("query", "test", 0, 1), ("support", "train", 0, 1)], "support rows come first"),
])
def test_writer_refuses_overlap_and_role_order(tmp_path, bad_rows, message):
    with pytest.raises(ValueError, match=message):
        _write(tmp_path, bad_rows)


def _rewrite_provenance(path, column: str, values: list) -> None:
    table = pq.read_table(path / schema.PROVENANCE_FILE)
    table = table.set_column(table.schema.get_field_index(column), schema.PROVENANCE_SCHEMA.field(column),
                             pa.array(values, schema.PROVENANCE_SCHEMA.field(column).type))
    pq.write_table(table, path / schema.PROVENANCE_FILE)


@pytest.mark.parametrize("column, values, message", [
    ("tfds_index", [0, 1, 50, 0, 1, 1], "appears twice"),
    ("role", ["support", "query", "support", "query", "query", "query"], "support row comes after a query row"),
])
def test_verify_catches_overlapping_or_misordered_provenance(tmp_path, column, values, message):
    _write(tmp_path)
    path = tmp_path / "vtab" / "toy"
    _rewrite_provenance(path, column, values)
    with pytest.raises(ManifestError, match=message):
        verify_source(path)


def test_verify_catches_a_wrong_class_table(tmp_path):
    _write(tmp_path)
    path = tmp_path / "vtab" / "toy"
    table = pq.read_table(path / schema.CLASSES_FILE)
    table = table.set_column(5, schema.CLASS_SCHEMA.field("first_sample"), pa.array([0, 3, 0], pa.int64()))
    pq.write_table(table, path / schema.CLASSES_FILE)
    with pytest.raises(ManifestError, match="class 0: first_sample 0"):
        verify_source(path)


def test_interrupted_ordered_writer_resumes_at_the_last_committed_shard(tmp_path):
    writer = OrderedSourceWriter(tmp_path, "vtab", "toy", fingerprint={"t": 1}, max_shard_samples=4)
    for i, (role, split, index, label) in enumerate(ROWS[:5]):
        writer.add(label, _png(i), "png", SampleOrigin(role, split, f"{split}[0:99]", index, float(label) + 0.5,
                                                        f"toy-{split}.tfrecord-00000-of-00001__{index}"))
    writer.abort()  # killed with shard 1 open: only shard 0 (4 samples) survives
    resumed = OrderedSourceWriter(tmp_path, "vtab", "toy", fingerprint={"t": 1}, max_shard_samples=4)
    assert resumed.num_committed == 4
    with pytest.raises(ValueError, match="added twice"):  # positions of committed samples are remembered
        resumed.add(0, _png(0), "png", SampleOrigin("query", "test", "test", 0, 0.0))


def test_version_1_source_json_still_reads_as_class_contiguous(tmp_path):
    from manifests import ClassRecord, SourceWriter

    writer = SourceWriter(tmp_path, "md", "toy", fingerprint={})
    writer.add(0, 0, _png(0), "png")
    writer.finish([ClassRecord(0, "a", "train", None, 1)], {
        "origin": "t", "converter_version": "0", "benchmark": "md-v1", "dataset_spec": None, "sampling_spec": None})
    path = tmp_path / "md" / "toy" / schema.SOURCE_FILE
    raw = json.loads(path.read_text())
    for field in ("layout", "tfds"):
        raw.pop(field)
    raw["format_version"] = 1
    path.write_text(json.dumps(raw))
    reader = SourceReader(path.parent)
    assert reader.info.layout == "class-contiguous" and reader.info.tfds is None
    assert reader.class_range(0) == (0, 1)
    verify_source(path.parent)
