"""`lite-convert verify --decode` runs the runtime's decoder (manifests.decode), not PIL: it passes exactly when
training can decode every image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from convert.cli import app
from manifests import ClassRecord, SourceWriter

runner = CliRunner()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _with_bad_text_chunk(png: bytes) -> bytes:
    """An ancillary tEXt chunk with a wrong CRC after IHDR: libpng (TF) drops it, Pillow refuses the file."""
    payload = b"tEXtk\0note"
    chunk = struct.pack(">I", len(payload) - 4) + payload + struct.pack(">I", zlib.crc32(payload) ^ 1)
    return png[:33] + chunk + png[33:]


def _source(root, images: list[bytes]):
    spec = {"__class__": "DatasetSpecification", "name": "pics", "classes_per_split": {"TRAIN": 1, "VALID": 0,
            "TEST": 0}, "images_per_class": {"0": len(images)}, "class_names": {"0": "c0"}}
    writer = SourceWriter(root, "md", "pics", fingerprint={"spec": "pics"}, max_shard_samples=10)
    for i, data in enumerate(images):
        writer.add(0, i, data, "png")
    writer.finish([ClassRecord(0, "c0", "train", None, len(images))],
                  dict(origin="test", converter_version="0", benchmark="md-v1", dataset_spec=spec,
                       sampling_spec=spec))


def test_verify_decode_refuses_a_png_that_pil_reads_but_tf_does_not(tmp_path):
    no_iend = _png(1)[:-12]  # IEND chunk lost: Pillow decodes it, TensorFlow (libpng) fails
    Image.open(io.BytesIO(no_iend)).load()  # the premise: PIL alone would have passed it
    _source(tmp_path, [_png(0), no_iend])
    result = runner.invoke(app, ["verify", str(tmp_path), "--decode"])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "pics-000000.tar: sample" in line and "(row 1): image does not decode: bad PNG: data ends before the " \
        "IEND chunk" in line, line
    assert runner.invoke(app, ["verify", str(tmp_path)]).exit_code == 0  # bytes intact: only decoding fails


def test_verify_decode_accepts_a_png_that_tf_reads_but_pil_alone_does_not(tmp_path):
    bad_text = _with_bad_text_chunk(_png(2))
    try:
        Image.open(io.BytesIO(bad_text)).load()
        raise AssertionError("premise: Pillow alone refuses a chunk with a bad CRC")
    except (OSError, SyntaxError):
        pass
    _source(tmp_path, [bad_text])
    result = runner.invoke(app, ["verify", str(tmp_path), "--decode"])
    assert result.exit_code == 0, result.output
    assert "1 decoded" in result.output
