"""Fixtures: every VTAB builder under `tfds.testing.mock_data`, offline, with real split sizes.

`tfds_dir` holds, for each pinned builder of the registry, a `dataset_info.json` written by TFDS itself
with the split sizes VTAB's own tests expect (`shared/reference/vtab_webdataset.md` §1.2), so slices
resolve exactly as on prepared data; `mock_data(policy=USE_FILES)` then makes `as_dataset` yield
`num_examples` deterministic random examples for any split string. The mock's random Sequence fields
(every field its own length, depths in [0, 1)) would break clevr and kitti's label rules, and its random
dsprites masks are not 0/1, so `_crafted` rewrites those examples into valid ones. Nothing touches the
network: GCS look-ups are disabled and `download_and_prepare` is mocked.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from convert.vtab.convert import _tfds
from convert.vtab.registry import TASKS

# Full TFDS split sizes [TA *_test.py, vtab_webdataset.md §1.2]; sun397 train as VTAB's test expects.
SPLIT_SIZES = {
    "caltech101": {"train": 3060, "test": 6084},
    "cifar100": {"train": 50000, "test": 10000},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "sun397": {"train": 76128, "validation": 10875, "test": 21750},
    "svhn_cropped": {"train": 73257, "test": 26032, "extra": 531131},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy_detection": {"train": 35126, "validation": 10906, "test": 42670, "sample": 10},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites": {"train": 737280},
    "smallnorb": {"train": 24300, "test": 24300},
}


def write_dataset_info(data_dir: Path, tfds_spec: str, sizes: dict[str, int]) -> Path:
    """`<data_dir>/<name>[/<config>]/<version>/dataset_info.json` (+ features.json) with these split sizes."""
    tfds = _tfds()
    builder = tfds.builder(tfds_spec, data_dir=str(data_dir))
    path = builder.data_path
    splits = [tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                                  filename_template=tfds.core.ShardedFileTemplate(
                                      data_dir=path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                      dataset_name=builder.name, split=name, filetype_suffix="tfrecord"))
              for name, n in sizes.items()]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(path)
    return Path(path)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> Path:
    """A TFDS data_dir in which every pinned VTAB builder looks prepared (metadata only)."""
    root = tmp_path_factory.mktemp("tfds")
    for spec in sorted({t.tfds_spec for t in TASKS.values()}):
        write_dataset_info(root, spec, SPLIT_SIZES[spec.split("/")[0].split(":")[0]])
    return root


def _crafted(original):
    """Wrap the mock's example generator: valid clevr/kitti object lists and 0/1 dsprites masks."""

    def generate(self, rng: np.random.Generator):
        ex = original(self, rng)
        for name, value in list(ex.items()):
            # Other Sequences (clevr's question_answer: Text fields, which the mock encodes in a form tf.data
            # cannot carry) are emptied; no label rule reads them.
            if isinstance(value, dict) and name != "objects":
                ex[name] = {k: v[:0] for k, v in value.items()}
        objects = ex.get("objects")
        if isinstance(objects, dict) and "pixel_coords" in objects:  # clevr: 3..10 objects, depths around the bins
            n = int(rng.integers(3, 11))
            objects = {k: np.resize(v, (n,) + np.shape(v)[1:]) for k, v in objects.items()}
            objects["pixel_coords"] = objects["pixel_coords"].astype(np.float32)
            objects["pixel_coords"][:, 2] = rng.uniform(7.0, 12.0, n).astype(np.float32)
            ex["objects"] = objects
        elif isinstance(objects, dict) and "location" in objects:  # kitti: 0..5 objects of any type
            n = int(rng.integers(0, 6))
            objects = {k: np.resize(v, (n,) + np.shape(v)[1:]) for k, v in objects.items()}
            objects["type"] = rng.integers(0, 8, n).astype(objects["type"].dtype)
            objects["location"] = objects["location"].astype(np.float32)
            objects["location"][:, 2] = rng.uniform(1.0, 40.0, n).astype(np.float32)
            box = np.sort(rng.random((n, 2, 2)), axis=1).astype(np.float32)  # min <= max per axis
            objects["bbox"] = box.reshape(n, 4)  # ymin, xmin, ymax, xmax
            ex["objects"] = objects
        if "label_orientation" in ex:  # dsprites: a binary mask
            ex["image"] = (ex["image"] % 2).astype(ex["image"].dtype)
        return ex

    return generate


@contextlib.contextmanager
def mocked_tfds(data_dir: Path, num_examples: int):
    """TFDS mocked offline: builders read metadata from `data_dir`, `as_dataset` yields crafted examples."""
    tfds = _tfds()
    from tensorflow_datasets.testing import mocking

    generator = mocking.RandomFakeGenerator
    with mock.patch.object(generator, "_generate_example", _crafted(generator._generate_example)), \
            tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES,
                                   data_dir=str(data_dir)):
        yield tfds
