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
from convert.mnist import md_file_order, mnist_md_spec
from manifests import open_source
from manifests.md_spec import md_v2_view, parse_md_spec, spec_view

from manifests.md_spec import SHIPPED_SPECS_DIR as SPECS_DIR  # MD's specs, shipped in manifests/md_specs/

runner = CliRunner()
LITE_MNIST = SPECS_DIR / "lite_v2_mnist_dataset_spec.json"


def _reference_rgb(digit: np.ndarray) -> Image.Image:
    """CNAPs/LITE `prepare_extra_datasets.py` `process_mnist`, written here from the reference, not from
    convert/mnist.py: `Image.fromarray(image).convert('RGB').resize((84, 84), resample=Image.LANCZOS)`, saved
    as `image_<i>.png`; returned as MD's writer reads that PNG file back."""
    im = Image.fromarray(digit).convert("RGB").resize((84, 84), resample=Image.LANCZOS)
    png = io.BytesIO()
    im.save(png, format="PNG")
    return Image.open(io.BytesIO(png.getvalue()))


def _reference_record(digit: np.ndarray) -> bytes:
    """The image bytes of MD's record: `load_and_process_image` re-encodes a non-JPEG file with
    `img.save(buf, format='JPEG')`, i.e. Pillow's defaults."""
    img = _reference_rgb(digit)
    assert img.format == "PNG" and img.mode == "RGB"  # not a JPEG: MD's writer re-encodes it
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


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


@pytest.mark.parametrize("view,split,lossless", [("md-v2", "train", False), ("md-v1", "test", True)])
def test_conversion_follows_md_order_encoding_and_view(idx, tmp_path, view, split, lossless):
    idx_dir, images, labels = idx
    args = ["mnist", "--idx-dir", str(idx_dir), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args + (["--lossless"] if lossless else []))
    assert result.exit_code == 0, result.output
    with open_source(tmp_path / "out", "mnist") as reader:
        info = reader.info
        assert info.classes_per_split["test"] == 10 and info.benchmark == "md-v1"  # the source's own split
        assert info.dataset_spec["classes_per_split"] == {"TRAIN": 0, "VALID": 0, "TEST": 10}
        # The view is chosen when reading: a function of the stored spec.
        assert spec_view(parse_md_spec(info.sampling_spec, "stored"), view).classes_per_split[split] == 10
        for c in range(10):
            rows = np.flatnonzero(labels == c)
            first, count = reader.class_range(c)
            assert count == len(rows)
            for index, i in enumerate(md_file_order(len(rows))):
                data = reader.read(first + index)
                if lossless:  # PNG bytes depend on zlib settings: compare pixels with the reference's PNG file
                    stored = Image.open(io.BytesIO(data))
                    assert stored.format == "PNG" and stored.mode == "RGB"
                    assert np.array_equal(np.asarray(stored), np.asarray(_reference_rgb(images[rows[i]])))
                else:
                    assert data == _reference_record(images[rows[i]])
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
