"""Converters: Meta-Dataset TFRecords and MNIST idx files in, lite-train shards + manifests out.

The only package allowed to import TensorFlow (lazily, for writing genuine records in `demo_data`);
it never imports torch. Reading TFRecords needs no TF (`convert.tfrecord`).
"""

from convert.demo_data import write_demo_data, write_md_records
from convert.md import ConvertConfig, SourceResult, convert_planned, convert_run, plan_datasets
from convert.mnist import MnistConfig, convert_mnist, read_mnist_idx
from convert.tfrecord import RecordError, iter_records, parse_example, read_md_example

__all__ = [
    "ConvertConfig",
    "MnistConfig",
    "RecordError",
    "SourceResult",
    "convert_run",
    "convert_mnist",
    "convert_planned",
    "iter_records",
    "parse_example",
    "plan_datasets",
    "read_md_example",
    "read_mnist_idx",
    "write_demo_data",
    "write_md_records",
]
