"""The shared source registry (`manifests.sources`): every entry checked against what it names.

Image magic bytes against real encoders and the format contract; every MD-v2 source against its shipped
dataset spec, viewed as MD-v2 (the VTAB task groups are checked against the task registry in
tests/convert/vtab/test_registry.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from manifests import schema
from manifests.md_spec import load_shipped_spec, spec_view
from manifests.sources import IMAGE_MAGIC, MD_V2_TEST, MD_V2_TRAIN, MD_V2_VALID

# The shipped spec each MD-v2 source is read with: MNIST has no MD spec of its own (the converter writes it),
# LITE's v2 spec stands for it.
_SHIPPED = {"mnist": "lite_v2_mnist"}


@pytest.mark.parametrize("fmt, pil_format", [("jpg", "JPEG"), ("png", "PNG")])
def test_image_magic_is_what_encoders_write_and_names_the_member_extension(fmt, pil_format):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format=pil_format)
    assert buf.getvalue().startswith(IMAGE_MAGIC[fmt])
    assert schema.IMAGE_FORMATS == tuple(IMAGE_MAGIC) == ("jpg", "png")


@pytest.mark.parametrize("split, names", [("train", MD_V2_TRAIN), ("valid", MD_V2_VALID), ("test", MD_V2_TEST)])
def test_every_md_v2_source_has_classes_in_its_split_in_the_md_v2_view(split, names):
    assert len(set(names)) == len(names)
    for name in names:
        spec = spec_view(load_shipped_spec(_SHIPPED.get(name, name)), "md-v2")
        assert spec.name == name and spec.classes_per_split[split] > 0, (name, split)


def test_md_v2_drops_vgg_flower_and_trains_on_imagenet_and_mnist_only():
    # LITE's MD-v2: VGG Flowers belongs to VTAB; ImageNet and MNIST are training sources only.
    every = set(MD_V2_TRAIN) | set(MD_V2_VALID) | set(MD_V2_TEST)
    assert "vgg_flower" not in every
    assert {"ilsvrc_2012", "mnist"} & (set(MD_V2_VALID) | set(MD_V2_TEST)) == set()
