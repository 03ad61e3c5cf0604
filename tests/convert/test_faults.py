"""Bad input -> `error: <one line naming the file (and record)>`, exit 1, and no visible output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convert.cli import app
from convert.demo_data import write_md_records
from convert.tfrecord import iter_records, read_md_example, write_records

runner = CliRunner()


def _run_md(records: Path, out: Path):
    return runner.invoke(app, ["md", "--records", str(records), "--out", str(out)])


def _assert_failed(result, out: Path, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    # Progress bars may precede it; the error itself is exactly one line, the last.
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and result.stderr.strip().endswith(lines[0]), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    visible = [p for p in (out / "md").glob("*")] if (out / "md").exists() else []
    assert not [p for p in visible if not p.name.startswith(".")], visible


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _record_payloads(path: Path) -> list[bytes]:
    return [bytes(p) for p in iter_records(path)]  # iter_records yields views into one buffer


@pytest.mark.parametrize("offset,message", [(3, "record 0 (byte 0): length CRC mismatch"),
                                            (40, "record 0 (byte 0): payload CRC mismatch")])
def test_bad_crc(tiny, tmp_path, offset, message):
    _flip(tiny / "tiny" / "1.tfrecords", offset)
    _assert_failed(_run_md(tiny, tmp_path / "out"), tmp_path / "out", "1.tfrecords", message)


def test_truncated_file(tiny, tmp_path):
    path = tiny / "tiny" / "2.tfrecords"
    path.write_bytes(path.read_bytes()[:-7])
    _assert_failed(_run_md(tiny, tmp_path / "out"), tmp_path / "out", "2.tfrecords: record 2", "truncated")


def test_more_records_than_spec(tiny, tmp_path):
    path = tiny / "tiny" / "0.tfrecords"
    payloads = _record_payloads(path)
    write_records(path, payloads + payloads[:1])
    _assert_failed(_run_md(tiny, tmp_path / "out"), tmp_path / "out", "0.tfrecords: record 3",
                   "more records than images_per_class[0] = 3")


def test_fewer_records_than_spec(tiny, tmp_path):
    path = tiny / "tiny" / "2.tfrecords"
    write_records(path, _record_payloads(path)[:2])
    _assert_failed(_run_md(tiny, tmp_path / "out"), tmp_path / "out", "2.tfrecords: 2 records",
                   "images_per_class[2] = 3")


def test_label_differs_from_file_id(tiny, tmp_path):
    path = tiny / "tiny" / "1.tfrecords"
    images = [read_md_example(p, "")[0] for p in _record_payloads(path)]
    write_md_records(path, images, 2)
    _assert_failed(_run_md(tiny, tmp_path / "out"), tmp_path / "out", "1.tfrecords: record 0",
                   "label 2 differs from the file's class id 1")


def test_missing_class_file_fails_before_anything_is_written(tiny, tmp_path):
    (tiny / "tiny" / "2.tfrecords").unlink()
    result = _run_md(tiny, tmp_path / "out")
    _assert_failed(result, tmp_path / "out", "2.tfrecords: missing record file for class 2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,message", [
    ("{not json", "cannot read dataset spec"),
    (json.dumps({"__class__": "DatasetSpecification", "name": "tiny", "classes_per_split": {"TRAIN": 1},
                 "images_per_class": {}, "class_names": {}}), "classes_per_split"),
    (json.dumps({"__class__": "Nope", "name": "tiny"}), "__class__"),
])
def test_invalid_spec(tiny, tmp_path, text, message):
    (tiny / "tiny" / "dataset_spec.json").write_text(text)
    _assert_failed(_run_md(tiny, tmp_path / "out"), tmp_path / "out", "dataset_spec.json", message)
    assert not (tmp_path / "out").exists()


def test_unreadable_spec(tiny, tmp_path):
    spec = tiny / "tiny" / "dataset_spec.json"
    spec.unlink()
    spec.mkdir()  # a directory where the file should be: unreadable for every user, root included
    result = runner.invoke(app, ["md", "--records", str(tiny), "--out", str(tmp_path / "out"), "--datasets", "tiny"])
    _assert_failed(result, tmp_path / "out", "dataset_spec.json")


def test_verify_reports_a_corrupted_shard(tiny, tmp_path):
    out = tmp_path / "out"
    assert _run_md(tiny, out).exit_code == 0
    assert runner.invoke(app, ["verify", str(out)]).stdout.startswith("ok md/tiny: 3 classes, 9 samples")
    shard = out / "md" / "tiny" / "tiny-000000.tar"
    _flip(shard, 1024 + 100)  # inside the first image's data
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "tiny-000000.tar: sample c00000_0000000" in result.stderr


def test_verify_records_confirms_byte_identity(tiny, tmp_path):
    out = tmp_path / "out"
    assert _run_md(tiny, out).exit_code == 0
    result = runner.invoke(app, ["verify", str(out), "--records", str(tiny)])
    assert result.exit_code == 0, result.output
    assert "identical md/tiny: 9 images" in result.stdout and "in 3 classes equal their records" in result.stdout


def _rewrite_record(path: Path, index: int, image: bytes | None = None, label: int | None = None) -> None:
    from convert.tfrecord import encode_md_example

    payloads = _record_payloads(path)
    old_image, old_label = read_md_example(payloads[index], "x")
    payloads[index] = encode_md_example(old_image if image is None else image, old_label if label is None else label)
    write_records(path, payloads)


@pytest.mark.parametrize("change,message", [
    (lambda p: _rewrite_record(p, 1, image=b"\xff\xd8\xff" + b"x" * 50), "1.tfrecords: record 1: image bytes differ "
                                                                        "from "),
    (lambda p: _rewrite_record(p, 2, label=0), "1.tfrecords: record 2: label 0 differs"),
    (lambda p: write_records(p, _record_payloads(p)[:2]), "1.tfrecords: 2 records, converted samples of class 1 = 3"),
    (lambda p: write_records(p, _record_payloads(p) * 2),
     "1.tfrecords: record 3: more records than converted samples of class 1 = 3"),
    (lambda p: p.unlink(), "1.tfrecords: missing record file for class 1"),
])
def test_verify_records_names_the_first_difference(tiny, tmp_path, change, message):
    out = tmp_path / "out"
    assert _run_md(tiny, out).exit_code == 0
    change(tiny / "tiny" / "1.tfrecords")
    result = runner.invoke(app, ["verify", str(out), "--records", str(tiny)])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    if "bytes differ" in message:
        assert "tiny/tiny-000000.tar: sample c00001_0000001" in errors[0]


def test_verify_records_fails_when_the_records_root_is_missing_or_holds_none_of_the_sources(tiny, tmp_path):
    out = tmp_path / "out"
    assert _run_md(tiny, out).exit_code == 0
    missing = runner.invoke(app, ["verify", str(out), "--records", str(tmp_path / "elsewhere")])
    assert missing.exit_code == 1 and "elsewhere: records root is not a directory" in missing.stderr
    (tmp_path / "other" / "someset").mkdir(parents=True)
    (tmp_path / "other" / "someset" / "dataset_spec.json").write_text("{}")
    unrelated = runner.invoke(app, ["verify", str(out), "--records", str(tmp_path / "other")])
    assert unrelated.exit_code == 1, unrelated.output
    assert "not compared md/tiny" in unrelated.stdout
    assert "holds none of the converted md/ sources" in unrelated.stderr


def test_a_class_too_small_for_episodes_is_converted_with_a_warning_naming_it(tmp_path):
    # MD's own episodes need >= 2 images per class; the converter writes the class as it is (nothing dropped)
    # and says at once which class training will refuse, instead of the first episode that draws it.
    import numpy as np

    from tests.convert.conftest import encode, write_dataset

    rng = np.random.RandomState(0)
    spec = {"name": "small", "classes_per_split": {"TRAIN": 2, "VALID": 0, "TEST": 1},
            "images_per_class": {"0": 3, "1": 1, "2": 2}, "class_names": {"0": "a", "1": "lonely", "2": "c"},
            "path": "small", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}
    write_dataset(tmp_path / "records", spec, [[encode(rng) for _ in range(n)] for n in (3, 1, 2)])
    result = _run_md(tmp_path / "records", tmp_path / "out")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: md/small: class 1 'lonely' (train) has 1 image(s); an MD episode needs at least 2 "
                        "per class (fixed shots: shots + query), so training or testing on its split will refuse it"]
    assert runner.invoke(app, ["verify", str(tmp_path / "out")]).exit_code == 0
