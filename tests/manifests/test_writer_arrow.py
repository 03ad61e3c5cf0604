"""The writer's buffer-built Arrow columns equal pyarrow's own conversion, and writing a source never imports
pandas (pyarrow's `pa.array`, `to_numpy` and `read_table` would, at a cost every converter process pays)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from manifests import schema
from manifests._arrow import arrow_table, numpy_column

ROOT = Path(__file__).resolve().parents[2]

SAMPLES = {"key": ["c00000_0000000", "c00001_0000007", "é"], "class_id": [0, 1, -2],
           "index_in_class": [0, 7, 2**31 - 1], "shard": [0, 0, 3], "offset": [1536, 2**40, 0],
           "size": [5, 0, 2**33], "format": ["jpg", "png", "jpg"], "crc32": [0, 2**32 - 1, 12345]}
CLASSES = {"class_id": [0, 1, 2], "name": ["a", "", "Latin-character01"], "split": ["train", "valid", "test"],
           "superclass": [None, 4, None], "num_images": [3, 0, 5], "first_sample": [0, 3, 3]}


PROVENANCE = {"role": ["support", "query", "query"], "tfds_split": ["train", "test", "test"],
              "tfds_slice": ["train[:800]", "test", "test"], "tfds_index": [0, 2**40, 7],
              "raw_value": [1.5, -0.0, float("inf")], "tfds_id": [None, "x.tfrecord__3", None]}


@pytest.mark.parametrize("table_schema,columns", [
    (schema.SAMPLE_SCHEMA, SAMPLES),
    (schema.CLASS_SCHEMA, CLASSES),
    (schema.CLASS_SCHEMA, dict(CLASSES, superclass=[7, 8, 9])),
    (schema.SAMPLE_SCHEMA, {name: [] for name in SAMPLES}),
    (schema.PROVENANCE_SCHEMA, PROVENANCE),  # float64 and a nullable string column
    (schema.PROVENANCE_SCHEMA, dict(PROVENANCE, tfds_id=["a", "b", "c"])),
])
def test_arrow_table_equals_pyarrows_conversion(table_schema, columns):
    ours = arrow_table(table_schema, columns)
    ours.validate(full=True)
    assert ours.equals(pa.Table.from_pydict(columns, schema=table_schema))
    assert ours.to_pydict() == columns


def test_arrow_table_takes_numpy_columns():
    columns = dict(SAMPLES, offset=np.array(SAMPLES["offset"], np.int64), shard=np.array([0, 0, 3], np.int32))
    expected = pa.Table.from_pydict(SAMPLES, schema=schema.SAMPLE_SCHEMA)
    assert arrow_table(schema.SAMPLE_SCHEMA, columns).equals(expected)


def test_numpy_column_equals_to_numpy_on_sliced_and_chunked_columns():
    table = pa.concat_tables([pa.Table.from_pydict(SAMPLES, schema=schema.SAMPLE_SCHEMA)] * 3).slice(2, 5)
    for name in ("class_id", "offset", "crc32"):
        got = numpy_column(table, name)
        assert got.dtype == table[name].to_numpy().dtype and got.tolist() == table[name].to_numpy().tolist()
    assert numpy_column(table.slice(0, 0), "size").tolist() == []
    with pytest.raises(ValueError, match="superclass"):
        numpy_column(pa.Table.from_pydict(CLASSES, schema=schema.CLASS_SCHEMA), "superclass")


_PROBE = """
import sys
from pathlib import Path
from manifests import ClassRecord, SourceWriter

root = Path(sys.argv[1])
for attempt in range(2):  # the second writer re-checks the committed shards of the first (a resume)
    writer = SourceWriter(root, "md", "tiny", fingerprint={}, max_shard_samples=2)
    for c in range(2):
        for i in range(3):
            if writer.last_committed is None or (c, i) > writer.last_committed:
                writer.add(c, i, b"\\xff\\xd8\\xff" + bytes([c, i]), "jpg")
    if attempt == 0:
        writer.abort()
writer.finish([ClassRecord(c, str(c), "train", None, 3) for c in range(2)],
              dict(origin="test", converter_version="0", benchmark="md-v1", dataset_spec=None, sampling_spec=None))
print("pandas" in sys.modules)
"""


def test_writing_and_resuming_a_source_never_imports_pandas(tmp_path):
    result = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False"]
    assert (tmp_path / "md" / "tiny" / "source.json").is_file()
