"""`lite-convert mnist`: idx validation, MD's file order and encoding, the TRAIN/TEST views."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from convert.cli import app
from convert.demo_data import write_idx
from convert.mnist import encode_digit, md_file_order, mnist_md_spec
from manifests import open_source
from manifests.md_spec import md_v2_view, parse_md_spec

from tests.shared_specs import SPECS_DIR

runner = CliRunner()
LITE_MNIST = SPECS_DIR / "lite_v2_mnist_dataset_spec.json"


@pytest.fixture
def idx(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.RandomState(5)
    labels = rng.randint(0, 10, size=150).astype(np.uint8)
    images = rng.randint(0, 256, size=(150, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "idx", images, labels)
    return tmp_path / "idx", images, labels


def test_md_order_sorts_file_names_as_strings():
    assert md_file_order(12) == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


def test_generated_spec_train_view_equals_lite_v2_mnist_modulo_path():
    lite = json.loads(LITE_MNIST.read_text())
    counts = [lite["images_per_class"][str(c)] for c in range(10)]
    spec = mnist_md_spec(counts, "/x/md/mnist")
    assert spec["classes_per_split"] == {"TRAIN": 0, "VALID": 0, "TEST": 10}
    view = md_v2_view(parse_md_spec(spec, "generated"))
    assert {k: v for k, v in view.items() if k != "path"} == {k: v for k, v in lite.items() if k != "path"}
    assert list(view) == list(lite)  # MD's key order too


@pytest.mark.parametrize("split,lossless", [("train", False), ("test", True)])
def test_conversion_follows_md_order_encoding_and_view(idx, tmp_path, split, lossless):
    idx_dir, images, labels = idx
    args = ["mnist", "--idx-dir", str(idx_dir), "--out", str(tmp_path / "out"), "--split", split]
    result = runner.invoke(app, args + (["--lossless"] if lossless else []))
    assert result.exit_code == 0, result.output
    with open_source(tmp_path / "out", "mnist") as reader:
        info = reader.info
        assert info.classes_per_split[split] == 10 and info.benchmark == ("md-v2" if split == "train" else "md-v1")
        assert info.dataset_spec["classes_per_split"] == {"TRAIN": 0, "VALID": 0, "TEST": 10}
        assert info.sampling_spec["classes_per_split"]["TRAIN" if split == "train" else "TEST"] == 10
        for c in range(10):
            rows = np.flatnonzero(labels == c)
            first, count = reader.class_range(c)
            assert count == len(rows)
            for index, i in enumerate(md_file_order(len(rows))):
                data = reader.read(first + index)
                assert data == encode_digit(images[rows[i]], lossless)
        sample = Image.open(io.BytesIO(reader.read(0)))
        assert sample.size == (84, 84) and sample.mode == "RGB" and sample.format == ("PNG" if lossless else "JPEG")
        if lossless:
            expected = Image.fromarray(images[np.flatnonzero(labels == 0)[0]]).resize((84, 84), Image.LANCZOS)
            assert np.array_equal(np.asarray(sample)[..., 0], np.asarray(expected))
    again = runner.invoke(app, args + (["--lossless"] if lossless else []))
    assert "up to date" in again.stdout


def _write(path: Path, header: bytes, body: bytes) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + body)


@pytest.mark.parametrize("which,header,body,message", [
    ("images", struct.pack(">IIII", 2049, 150, 28, 28), bytes(150 * 784), "magic number 2049, expected 2051"),
    ("images", struct.pack(">IIII", 2051, 151, 28, 28), bytes(150 * 784), "header says 151 images"),
    ("images", struct.pack(">IIII", 2051, 150, 28, 27), bytes(150 * 28 * 27), "28x27"),
    ("labels", struct.pack(">II", 2051, 150), bytes(150), "magic number 2051, expected 2049"),
    ("labels", struct.pack(">II", 2049, 149), bytes(149), "149 labels for 150 images"),
    ("labels", struct.pack(">II", 2049, 150), bytes(149), "header says 150 labels, file has 149"),
])
def test_bad_idx_is_one_line_error_naming_the_file(idx, tmp_path, which, header, body, message):
    idx_dir = idx[0]
    name = {"images": "t10k-images-idx3-ubyte.gz", "labels": "t10k-labels-idx1-ubyte.gz"}[which]
    _write(idx_dir / name, header, body)
    result = runner.invoke(app, ["mnist", "--idx-dir", str(idx_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {idx_dir / name}: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_missing_idx_file(tmp_path):
    result = runner.invoke(app, ["mnist", "--idx-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "t10k-images-idx3-ubyte[.gz]: missing" in result.stderr
