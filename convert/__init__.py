"""Converters: Meta-Dataset TFRecords and MNIST idx files in, lite-train shards + manifests out.

The only package allowed to import TensorFlow and TFDS (lazily: `demo_data` writes genuine records,
`vtab` reads prepared TFDS datasets); it never imports torch. Reading TFRecords needs no TF (`convert.tfrecord`).
"""

from manifests.lazy import lazy_exports

# Exported names -> defining module, imported on first use (PEP 562): `lite-convert md` then loads only
# the modules it runs, not every converter's (start-up is part of every conversion's time, BENCHMARKS.md).
_EXPORTS = {
    "ConvertConfig": "convert.md",
    "MnistConfig": "convert.mnist",
    "RecordError": "convert.tfrecord",
    "SourceResult": "convert._common",
    "convert_mnist": "convert.mnist",
    "convert_planned": "convert.md",
    "convert_run": "convert.md",
    "iter_records": "convert.tfrecord",
    "parse_example": "convert.tfrecord",
    "plan_datasets": "convert.md",
    "read_md_example": "convert.tfrecord",
    "read_mnist_idx": "convert.mnist",
    "write_demo_data": "convert.demo_data",
    "write_md_records": "convert.demo_data",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
