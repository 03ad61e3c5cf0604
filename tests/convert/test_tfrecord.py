"""convert.tfrecord against TensorFlow's own writer: framing bytes, CRC checks, Example wire format."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from convert.demo_data import write_md_records
from convert.tfrecord import (RecordError, _md_example_fast, encode_md_example, encode_varint, frame, iter_records,
                              length_delimited, parse_example, read_md_example, write_records)


def _example_payload(image: bytes, label: int) -> bytes:
    import tensorflow as tf

    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    })).SerializeToString()


_len = encode_varint
_ld = length_delimited


def test_plain_framing_equals_tf_writer_bytes(tmp_path):
    images = [bytes([i]) * (i * 37) for i in range(20)]
    write_md_records(tmp_path / "tf.tfrecords", images, 7)
    payloads = list(iter_records(tmp_path / "tf.tfrecords"))
    assert [read_md_example(p, "x") for p in payloads] == [(im, 7) for im in images]
    write_records(tmp_path / "plain.tfrecords", payloads)
    assert (tmp_path / "plain.tfrecords").read_bytes() == (tmp_path / "tf.tfrecords").read_bytes()


def test_example_parser_accepts_unpacked_int64_any_entry_order_and_negative_values():
    label_unpacked = _ld(2, _ld(3, _len(1 << 3 | 0) + _len((-5) & 0xFFFFFFFFFFFFFFFF)))  # Feature{int64_list}
    image = _ld(2, _ld(1, _ld(1, b"abc")))
    entries = _ld(1, _ld(1, b"label") + label_unpacked) + _ld(1, _ld(1, b"image") + image)
    payload = _ld(1, entries)
    assert read_md_example(payload, "x") == (b"abc", -5)
    packed = _ld(1, _ld(1, _ld(1, b"label") + _ld(2, _ld(3, _ld(1, _len(3) + _len(300))))))
    assert parse_example(packed) == {"label": [3, 300]}
    floats = _ld(1, _ld(1, _ld(1, b"f") + _ld(2, _ld(2, _ld(1, struct.pack("<2f", 1.5, -2.0))))))
    assert parse_example(floats) == {"f": [1.5, -2.0]}
    assert parse_example(_example_payload(b"\x00\xff", 2**40)) == {"image": [b"\x00\xff"], "label": [2**40]}


@pytest.mark.parametrize("payload,problem", [
    (b"\x0a\x05\x0a\x03", "not a tf.train.Example"),
    (_ld(1, b""), "feature 'image'"),
])
def test_malformed_example_is_one_line_error(payload, problem):
    with pytest.raises(RecordError, match=problem) as info:
        read_md_example(payload, "f.tfrecords: record 3")
    assert str(info.value).startswith("f.tfrecords: record 3: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("offset,problem", [(2, "length CRC mismatch"), (20, "payload CRC mismatch"),
                                            (9, "length CRC mismatch")])
def test_flipped_byte_is_detected_with_record_index(tmp_path, offset, problem):
    data = bytearray(frame(b"first" * 10) + frame(b"second" * 10))
    record_1 = len(frame(b"first" * 10))
    data[record_1 + offset] ^= 0x01
    path = tmp_path / "x.tfrecords"
    path.write_bytes(bytes(data))
    with pytest.raises(RecordError, match=rf"x\.tfrecords: record 1 .*{problem}"):
        list(iter_records(path))


@pytest.mark.parametrize("cut", [1, 5, 13, 30])
def test_truncated_file_is_detected(tmp_path, cut):
    data = frame(np.arange(64, dtype=np.uint8).tobytes()) * 2
    path = tmp_path / "t.tfrecords"
    path.write_bytes(data[:-cut])
    with pytest.raises(RecordError, match=r"t\.tfrecords: record 1 .*truncated"):
        list(iter_records(path))


def test_plain_example_encoder_equals_tf_deterministic_serialization():
    tf = pytest.importorskip("tensorflow")
    for image, label in ((b"", 0), (b"\xff\xd8" * 300, 7), (bytes(range(256)) * 9, 1622)):
        ours = encode_md_example(image, label)
        example = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        }))
        # Map entry order of a plain SerializeToString() is unspecified (it differs between protobuf
        # builds); deterministic serialization sorts by key, which is what the encoder writes.
        assert ours == example.SerializeToString(deterministic=True)
        assert tf.train.Example.FromString(ours) == example
        assert read_md_example(ours, "x") == (image, label)
        assert read_md_example(example.SerializeToString(), "x") == (image, label)


def test_md_fast_path_reads_what_tf_writes():
    """The fast path takes TF's own serialization (either entry order) and returns what TF was given."""
    tf = pytest.importorskip("tensorflow")
    for image, label in ((b"", 0), (b"\xff\xd8" * 70, 7), (bytes(range(256)) * 70, 1622), (b"x", 2**40), (b"y", -3)):
        example = _example_payload(image, label)
        for payload in (example, tf.train.Example.FromString(example).SerializeToString(deterministic=True)):
            assert _md_example_fast(payload) == (image, label)
            assert _md_example_fast(memoryview(payload)) == (image, label)


_IMAGE = _ld(1, _ld(1, b"image") + _ld(2, _ld(1, _ld(1, b"abc"))))
_LABEL = _ld(1, _ld(1, b"label") + _ld(2, _ld(3, _ld(1, _len(4)))))


@pytest.mark.parametrize("payload", [
    _ld(1, _IMAGE + _LABEL + _ld(1, _ld(1, b"other") + _ld(2, _ld(1, _ld(1, b"z"))))),  # a third feature
    _ld(1, _IMAGE + _LABEL) + _ld(7, b"unknown"),  # an unknown Example field after the features
    _ld(1, _IMAGE + _LABEL + _LABEL),  # a repeated key: the last one counts
    _ld(1, _ld(1, _ld(1, b"image") + _ld(2, _ld(1, _ld(1, b"abc") + _ld(1, b"d")))) + _LABEL),  # two images
    _ld(1, _IMAGE + _ld(1, _ld(1, b"label") + _ld(2, _ld(3, _ld(1, _len(4) + _len(5)))))),  # two labels
    _ld(1, _IMAGE + _ld(1, _ld(1, b"label") + _ld(2, _ld(1, _ld(1, b"4"))))),  # a bytes label
    _ld(1, _IMAGE + _ld(1, _ld(1, b"imagf") + _ld(2, _ld(3, _ld(1, _len(4)))))),  # no label
    _ld(1, _IMAGE + _LABEL)[:-1],  # truncated
    _ld(1, _IMAGE),
    b"",
])
def test_md_fast_path_leaves_every_other_layout_to_the_parser(payload):
    """Anything but TF's MD layout is read by `parse_example`: the same result, or its error."""
    assert _md_example_fast(payload) is None
    try:
        features = parse_example(payload)
        expected = (features["image"][0], features["label"][0]) if len(features.get("image", ())) == 1 and len(
            features.get("label", ())) == 1 and isinstance(features["label"][0], int) else "error"
    except ValueError:
        expected = "error"
    if expected == "error":
        with pytest.raises(RecordError):
            read_md_example(payload, "x")
    else:
        assert read_md_example(payload, "x") == expected
