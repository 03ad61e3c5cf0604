"""Fixtures: tiny Meta-Dataset records folders written by TensorFlow's own writer, in MD's exact layout.

Specs are the real ones shipped in manifests/md_specs with images_per_class shrunk to 1-3 (every class id
kept, so ImageNet's graphs stay valid; internal-node counts are recomputed as sums over their leaves).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert.demo_data import write_md_records

from manifests.md_spec import SHIPPED_SPECS_DIR as SPECS_DIR  # MD's specs, shipped in manifests/md_specs/

SPECS = SPECS_DIR


def encode(rng: np.random.RandomState, mode: str = "RGB", fmt: str = "JPEG", side: int = 8) -> bytes:
    """A small random image of `mode` encoded as `fmt` (JPEG of L/CMYK/RGB, or PNG)."""
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = rng.randint(0, 256, size=(side, side, channels)).astype(np.uint8)
    image = Image.frombytes(mode, (side, side), pixels.tobytes())
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def shrink_spec(raw: dict, rng: np.random.RandomState) -> dict:
    """A copy of a real spec with 1-3 images per class (hierarchical: node counts = sums over leaves)."""
    spec = copy.deepcopy(raw)
    if spec["__class__"] != "HierarchicalDatasetSpecification":
        spec["images_per_class"] = {k: int(rng.randint(1, 4)) for k in spec["images_per_class"]}
        return spec
    for split, nodes in spec["split_subgraphs"].items():
        by_id = {n["wn_id"]: n for n in nodes}
        leaf_count = {wn: int(rng.randint(1, 4)) for wn, n in sorted(by_id.items()) if not n["children_ids"]}

        memo: dict[str, set] = {}

        def leaves(wn: str) -> set:
            if wn not in memo:
                kids = by_id[wn]["children_ids"]
                memo[wn] = {wn} if not kids else set().union(*(leaves(k) for k in kids))
            return memo[wn]

        spec["images_per_class"][split] = {wn: sum(leaf_count[x] for x in leaves(wn)) for wn in by_id}
    return spec


def spec_counts(spec: dict) -> list[int]:
    """images_per_class by absolute class id (class_names order for hierarchical specs)."""
    if spec["__class__"] != "HierarchicalDatasetSpecification":
        return [spec["images_per_class"][str(i)] for i in range(len(spec["images_per_class"]))]
    counts = {}
    for split in ("TRAIN", "VALID", "TEST"):
        counts.update(spec["images_per_class"][split])
    return [counts[spec["class_names"][str(i)]] for i in range(len(spec["class_names"]))]


def write_dataset(root: Path, spec: dict, images: list[list[bytes]]) -> Path:
    """`<root>/<name>/{0..C-1.tfrecords, dataset_spec.json}` with TF's writer; images[c] = class c's bytes."""
    folder = root / spec["name"]
    folder.mkdir(parents=True)
    for c, class_images in enumerate(images):
        write_md_records(folder / f"{c}.tfrecords", class_images, c)
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=2))
    return folder


def write_real_shrunk(root: Path, spec_file: str, rng: np.random.RandomState) -> tuple[Path, list[list[bytes]]]:
    spec = shrink_spec(json.loads((SPECS / spec_file).read_text()), rng)
    images = [[encode(rng) for _ in range(n)] for n in spec_counts(spec)]
    return write_dataset(root, spec, images), images


@pytest.fixture(scope="session")
def md_records(tmp_path_factory) -> dict:
    """A records root with shrunk dtd (flat; gray, CMYK, PNG payloads), omniglot (bilevel), ilsvrc_2012."""
    if not SPECS.is_dir():
        pytest.fail(f"no dataset specs under {SPECS}")
    root = tmp_path_factory.mktemp("records")
    rng = np.random.RandomState(1)
    spec = shrink_spec(json.loads((SPECS / "dtd_dataset_spec.json").read_text()), rng)
    images = [[encode(rng) for _ in range(n)] for n in spec_counts(spec)]
    images[0][0] = encode(rng, "L")  # grayscale JPEG: stored untouched
    images[1][0] = encode(rng, "CMYK")  # CMYK JPEG: stored untouched
    images[2][-1] = encode(rng, "RGB", "PNG")  # PNG bytes inside a record stay PNG
    write_dataset(root, spec, images)
    _, omniglot = write_real_shrunk(root, "omniglot_dataset_spec.json", rng)
    _, imagenet = write_real_shrunk(root, "ilsvrc_2012_dataset_spec.json", rng)
    return {"root": root, "images": {"dtd": images, "omniglot": omniglot, "ilsvrc_2012": imagenet}}


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> Path:
    """A records root holding `tiny`: a flat 3-class spec (2/0/1), 3 JPEG records per class."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.RandomState(2)
    spec = {"name": "tiny", "classes_per_split": {"TRAIN": 2, "VALID": 0, "TEST": 1},
            "images_per_class": {"0": 3, "1": 3, "2": 3}, "class_names": {"0": "a", "1": "b", "2": "c"},
            "path": "tiny", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}
    write_dataset(root, spec, [[encode(rng) for _ in range(3)] for _ in range(3)])
    return root


@pytest.fixture
def tiny(tiny_template, tmp_path) -> Path:
    """A private copy of the `tiny` records root (tests corrupt it)."""
    root = tmp_path / "records"
    shutil.copytree(tiny_template, root)
    return root


@pytest.fixture
def fsynced(monkeypatch) -> list[tuple[int, int, bool]]:
    """Every os.fsync call of this process, as (device, inode, is a folder) of the descriptor it was given.

    Inodes survive the converter's renames and links, so they name the published files they became."""
    calls: list[tuple[int, int, bool]] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        st = os.fstat(fd)
        calls.append((st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)  # also seen by the writer's commit thread
    return calls


def inode(path: Path) -> tuple[int, int]:
    """(device, inode) of a file, as `fsynced` records them."""
    st = path.stat()
    return st.st_dev, st.st_ino
