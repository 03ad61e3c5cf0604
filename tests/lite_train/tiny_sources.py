"""Tiny converted sources for loader tests, written through the real SourceWriter (no TF needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from manifests import ClassRecord, SourceWriter


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A colour that identifies the class, so decoded pixels can be traced back to it."""
    return (37 * class_id % 256, 91 * class_id % 256, 53 * (class_id + 1) % 256)


def encode_image(class_id: int, index: int, fmt: str = "jpg") -> bytes:
    """A flat image of the class colour with a bar whose width encodes `index` (varied sizes)."""
    w, h = 40 + (index * 7) % 50, 30 + (index * 11) % 40
    img = Image.new("RGB", (w, h), class_colour(class_id))
    img.paste((255, 255, 255), (0, 0, 1 + index % w, 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()


def flat_spec(name: str, counts: list[int], per_split: tuple[int, int, int]) -> dict:
    """A DatasetSpecification dict as MD writes it."""
    return {
        "__class__": "DatasetSpecification", "name": name,
        "classes_per_split": dict(zip(("TRAIN", "VALID", "TEST"), per_split)),
        "images_per_class": {str(i): n for i, n in enumerate(counts)},
        "class_names": {str(i): f"{name}_class{i}" for i in range(len(counts))},
        "path": "/nowhere", "file_pattern": "{}.tfrecords",
    }


def bilevel_spec(name: str, chars_per_alphabet: list[int], per_split: tuple[int, int, int],
                 images: int) -> dict:
    """A BiLevelDatasetSpecification dict (Omniglot layout)."""
    n = sum(chars_per_alphabet)
    return {
        "__class__": "BiLevelDatasetSpecification", "name": name,
        "superclasses_per_split": dict(zip(("TRAIN", "VALID", "TEST"), per_split)),
        "classes_per_superclass": {str(i): c for i, c in enumerate(chars_per_alphabet)},
        "images_per_class": {str(i): images for i in range(n)},
        "superclass_names": {str(i): f"alphabet{i}" for i in range(len(chars_per_alphabet))},
        "class_names": {str(i): f"char{i}" for i in range(n)},
        "path": "/nowhere", "file_pattern": "{}.tfrecords",
    }


def write_converted(root: Path, spec: dict, *, max_shard_samples: int = 50) -> Path:
    """Convert `spec`'s classes of synthetic images the way lite-convert would; return the source folder."""
    name = spec["name"]
    counts = [spec["images_per_class"][str(i)] for i in range(len(spec["images_per_class"]))]
    splits = []
    if spec["__class__"] == "BiLevelDatasetSpecification":
        per_sc = [spec["classes_per_superclass"][str(i)] for i in range(len(spec["classes_per_superclass"]))]
        sc_split = [s for s, k in zip(("train", "valid", "test"), spec["superclasses_per_split"].values())
                    for _ in range(k)]
        superclass = [sc for sc, n in enumerate(per_sc) for _ in range(n)]
        splits = [sc_split[sc] for sc in superclass]
    else:
        superclass = [None] * len(counts)
        splits = [s for s, k in zip(("train", "valid", "test"), spec["classes_per_split"].values())
                  for _ in range(k)]
    writer = SourceWriter(root, "md", name, fingerprint={"spec": name}, max_shard_samples=max_shard_samples)
    for c, n in enumerate(counts):
        for i in range(n):
            fmt = "png" if (c + i) % 5 == 0 else "jpg"
            writer.add(c, i, encode_image(c, i, fmt), fmt)
    classes = [ClassRecord(c, spec["class_names"][str(c)], splits[c], superclass[c], n)
               for c, n in enumerate(counts)]
    writer.finish(classes, dict(origin="test", converter_version="0", benchmark="md-v1",
                                dataset_spec=spec, sampling_spec=spec))
    return root / "md" / name
