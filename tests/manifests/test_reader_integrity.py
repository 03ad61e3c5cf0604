"""Integrity at read time: per-sample checksums, classes.parquet vs source.json, non-regular shards."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import ManifestError, SourceReader, schema, verify_source
from manifests.reader import ChecksumError
from tests.lite_train.tiny_sources import bilevel_spec, flat_spec, write_converted


@pytest.fixture()
def glyphs(tmp_path) -> Path:
    """A bilevel source (names, superclasses and all three splits are meaningful)."""
    return write_converted(tmp_path, bilevel_spec("toyglyphs", [3, 2, 2, 3], (2, 1, 1), 4), max_shard_samples=16)


def _flip_byte_of_sample(source: Path, index: int) -> None:
    entry = SourceReader(source, verify_checksums=False).index[index]
    shard = source / schema.shard_name(source.name, int(entry["shard"]))
    with open(shard, "r+b") as f:
        f.seek(int(entry["offset"]) + int(entry["size"]) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def test_flipped_byte_raises_naming_source_shard_key_and_row(glyphs):
    index = 21  # class 5, its second image (4 images a class)
    original = SourceReader(glyphs).read(index)
    _flip_byte_of_sample(glyphs, index)
    reader = SourceReader(glyphs)
    with pytest.raises(ChecksumError) as e:
        reader.read(index)
    message = str(e.value)
    shard = schema.shard_name("toyglyphs", int(reader.index[index]["shard"]))
    for part in ("source toyglyphs", shard, schema.sample_key(5, 1), f"row {index}", "crc32"):
        assert part in message
    assert reader.read(index - 1) == SourceReader(glyphs, verify_checksums=False).read(index - 1)
    # Off: the damaged bytes come back as stored (what the loader served silently before).
    unchecked = SourceReader(glyphs, verify_checksums=False).read(index)
    assert unchecked != original and len(unchecked) == len(original)


def test_checksum_option_travels_with_a_pickled_reader(glyphs):
    import pickle

    _flip_byte_of_sample(glyphs, 0)
    assert pickle.loads(pickle.dumps(SourceReader(glyphs, verify_checksums=False))).read(0)
    with pytest.raises(ChecksumError):
        pickle.loads(pickle.dumps(SourceReader(glyphs))).read(0)


def _edit_classes(source: Path, column: str, edit) -> None:
    path = source / schema.CLASSES_FILE
    table = pq.read_table(path)
    values = table[column].to_pylist()
    edit(values)
    field = table.schema.field(column)
    table = table.set_column(table.schema.get_field_index(column), field, pa.array(values, field.type))
    pq.write_table(table, path)


def _swap(i: int, j: int):
    def edit(values):
        values[i], values[j] = values[j], values[i]
    return edit


def _set(i: int, value):
    def edit(values):
        values[i] = value
    return edit


@pytest.mark.parametrize("column, edit, says", [
    ("first_sample", _set(3, 13), "class 3: first_sample 13"),
    # classes 0-4 train (alphabets 0, 1), 5-6 valid, 7-9 test; a swap keeps the counts per split
    ("split", _swap(4, 7), "class 4: split 'test'"),
    ("split", _swap(4, 5), "class 4: split 'valid'"),
    ("name", _set(2, "char7"), "class 2: name 'char7'"),
    ("superclass", _swap(2, 3), "class 2: superclass 1"),
    ("num_images", _set(9, 3), "num_images"),
])
def test_edited_classes_parquet_is_refused_by_reader_and_verify(glyphs, column, edit, says):
    _edit_classes(glyphs, column, edit)
    with pytest.raises(ManifestError, match="classes.parquet") as e:
        SourceReader(glyphs)
    assert says in str(e.value)
    with pytest.raises(ManifestError, match=says):
        verify_source(glyphs)


def test_unedited_sources_open_and_verify(tmp_path, glyphs):
    flat = write_converted(tmp_path, flat_spec("toyflat", [3, 5, 2, 4, 6], (2, 2, 1)))
    for source in (glyphs, flat):
        verify_source(source)
        assert SourceReader(source).read(0)


def _read_in_thread(reader: SourceReader, index: int) -> BaseException | None:
    """The exception reader.read raised, run where a hang cannot stop the test run."""
    outcome: list = []

    def run():
        try:
            reader.read(index)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)  # a hang guard, not a timing assertion: a blocked open never returns
    assert outcome, "reader.read blocked on a shard that is not a regular file"
    return outcome[0]


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_non_regular_shard_is_refused_not_waited_on(glyphs, kind):
    reader = SourceReader(glyphs)
    shard = glyphs / reader.info.shards[0].name
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    error = _read_in_thread(reader, 0)
    assert isinstance(error, ManifestError)
    assert str(shard) in str(error) and "not a regular file" in str(error)
