"""The converter's TFDS read path on a real (tiny, locally generated) TFDS dataset, not a mock.

A 160-example builder is prepared offline into 4 shard files (more records per file than the default
interleave block of TFDS, so parallel file reads would show); TFDS's canonical order is, by definition, the
files in order and the records in file order, so the canonical index of an example is
`sum(shard_lengths[:file]) + index in file`, both read from the `tfds_id` TFDS attaches. The converter
records `slice start + position` as `tfds_index`: the two must agree, across shard boundaries and after a
resume skip. Image bytes come back as TFDS stored them (PNG, decoding to the generated pixels).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from convert.vtab.convert import ReadSlice, _read_slice, _tfds
from convert.vtab.registry import Slice

_ID = re.compile(r"-(?P<split>[a-z]+)\.tfrecord-(?P<file>\d{5})-of-(?P<files>\d{5})__(?P<index>\d+)$")


def _pixels(i: int) -> np.ndarray:
    return np.full((4, 4, 3), i, np.uint8)


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
    tfds = _tfds()

    class TinyOrdered(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        __module__ = "__main__"  # TFDS looks for code files next to the module; tests/ is a namespace package

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 3)), "label": tfds.features.ClassLabel(num_classes=3),
                "idx": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(160)}

        def _generate_examples(self, n):
            for i in range(n):  # TFDS orders examples by a hash of the key, not by i
                yield f"k{i}", {"image": _pixels(i), "label": i % 3, "idx": i}

    builder = TinyOrdered(data_dir=str(tmp_path_factory.mktemp("tiny_tfds")))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4, try_download_gcs=False))
    return builder


@pytest.mark.parametrize("skip", [0, 3])
def test_tfds_index_is_the_canonical_index(tiny_builder, skip):
    shard_lengths = tiny_builder.info.splits["train"].shard_lengths
    assert len(shard_lengths) == 4 and sum(shard_lengths) == 160
    first_boundary = shard_lengths[0]
    read = ReadSlice("support", Slice("train", first_boundary - 20, first_boundary + 20), 40)  # spans two files
    examples = list(_read_slice(tiny_builder, read, "image", skip))
    assert len(examples) == 40 - skip
    for position, ex in enumerate(examples, start=skip):
        m = _ID.search(ex["tfds_id"].decode())
        assert m and m["split"] == "train", ex["tfds_id"]
        canonical = sum(shard_lengths[:int(m["file"])]) + int(m["index"])
        assert canonical == read.slice.start + position
        assert ex["image"][:8] == b"\x89PNG\r\n\x1a\n"  # the stored bytes, not a decoded array
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(ex["image"]))), _pixels(int(ex["idx"])))
    idx = [int(ex["idx"]) for ex in examples]
    assert idx != sorted(idx)  # hash order: a test that would also pass in generation order proves nothing
