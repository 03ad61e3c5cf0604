"""Python lists and NumPy arrays in, Arrow arrays and tables out (and fixed-width columns back to NumPy).

Everything is built from buffers: pyarrow's own conversions (`pa.array`, `Table.from_pydict`, `to_numpy`,
`pq.read_table`) import pandas on first use, which would dominate the start-up of every converter process
(tests/manifests/test_writer_arrow.py checks both the equality and the import).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# NumPy dtype of each fixed-width Arrow type the manifests use.
NUMPY_TYPES = {pa.int32(): np.int32, pa.int64(): np.int64, pa.uint32(): np.uint32, pa.float64(): np.float64}


def arrow_array(field: pa.Field, values) -> pa.Array:
    """`values` (a list, None for a null, or a NumPy array) as an Arrow array of `field`'s type: string or one
    of `NUMPY_TYPES`."""
    n = len(values)
    validity, null_count = None, 0
    if not isinstance(values, np.ndarray) and None in values:
        valid = np.array([v is not None for v in values])  # (n,) bool
        validity, null_count = pa.py_buffer(np.packbits(valid, bitorder="little")), int(n - valid.sum())
        values = [v if v is not None else "" if field.type == pa.string() else 0 for v in values]
    if field.type == pa.string():
        data = [v.encode() for v in values]
        offsets = np.zeros(n + 1, dtype=np.int32)  # (n + 1,) byte offset of each value in the joined data
        np.cumsum([len(d) for d in data], out=offsets[1:])
        buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
    else:
        buffers = [validity, pa.py_buffer(np.ascontiguousarray(values, dtype=NUMPY_TYPES[field.type]))]
    return pa.Array.from_buffers(field.type, n, buffers, null_count=null_count)


def arrow_table(table_schema: pa.Schema, columns: dict) -> pa.Table:
    """A table of `table_schema` from {field name: values} (see `arrow_array`)."""
    return pa.Table.from_arrays([arrow_array(f, columns[f.name]) for f in table_schema], schema=table_schema)


def numpy_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-width column without nulls as a NumPy array (shape (rows,)), read from the Arrow buffers."""
    dtype = np.dtype(NUMPY_TYPES[table.schema.field(name).type])
    chunks = [c for c in table[name].chunks if len(c)]
    if any(c.null_count for c in chunks):
        raise ValueError(f"column {name!r} holds nulls")
    return np.concatenate([np.zeros(0, dtype)] + [np.frombuffer(c.buffers()[1], dtype, len(c),
                                                                c.offset * dtype.itemsize) for c in chunks])


def read_table(path: Path) -> pa.Table:
    """A whole Parquet file as a table (`pq.read_table` would import pandas)."""
    with pq.ParquetFile(path) as f:
        return f.read()
