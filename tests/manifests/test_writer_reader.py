"""The format contract end to end: SourceWriter -> shards + manifests -> SourceReader / verify / webdataset."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from manifests import (ClassRecord, ManifestError, SourceReader, SourceWriter, find_sources, open_source,
                       schema, verify_source)
from manifests.staging import staging_dir

INFO = dict(origin="test", converter_version="0", benchmark="md-v1", dataset_spec=None, sampling_spec=None)


def _payload(class_id: int, index: int) -> bytes:
    rng = np.random.RandomState(class_id * 1000 + index)
    return b"\xff\xd8" + rng.bytes(int(rng.randint(10, 3000)))


def _classes(counts):
    return [ClassRecord(c, f"class_{c}", schema.SPLITS[c % 3], c // 2, n) for c, n in enumerate(counts)]


def write_source(root: Path, counts, *, stop_after=None, **kw) -> SourceWriter:
    """Write classes with the given image counts; stop (without finishing) after `stop_after` samples."""
    kw.setdefault("fingerprint", {"counts": list(counts)})
    writer = SourceWriter(root, "md", "toy", **kw)
    done = writer.last_committed
    n = 0
    for c, count in enumerate(counts):
        for i in range(count):
            if done is not None and (c, i) <= done:
                continue
            if stop_after is not None and n == stop_after:
                writer.abort()
                return writer
            writer.add(c, i, _payload(c, i), "png" if i % 7 == 3 else "jpg")
            n += 1
    writer.finish(_classes(counts), INFO)
    return writer


COUNTS = [5, 9, 1, 12, 3, 8]


def test_every_sample_reads_back_byte_identical(tmp_path):
    write_source(tmp_path, COUNTS, max_shard_samples=7)
    reader = SourceReader(tmp_path / "md" / "toy")
    assert reader.num_samples == sum(COUNTS)
    for c, count in enumerate(COUNTS):
        first, n = reader.class_range(c)
        assert n == count
        for i in range(count):
            assert reader.read(first + i) == _payload(c, i)
            assert reader.read_class_image(c, i) == _payload(c, i)
    assert list(reader.class_ids("valid")) == [1, 4]
    with pytest.raises(IndexError):
        reader.read_class_image(0, 5)


def test_shards_roll_over_by_count_and_by_bytes(tmp_path):
    write_source(tmp_path / "a", COUNTS, max_shard_samples=10)
    info = SourceReader(tmp_path / "a" / "md" / "toy").info
    assert [s.num_samples for s in info.shards] == [10, 10, 10, 8]
    write_source(tmp_path / "b", COUNTS, max_shard_bytes=5000)
    info = SourceReader(tmp_path / "b" / "md" / "toy").info
    assert len(info.shards) > 3 and sum(s.num_samples for s in info.shards) == sum(COUNTS)


def test_samples_are_class_contiguous_in_record_order(tmp_path):
    write_source(tmp_path, COUNTS, max_shard_samples=4)
    samples = pq.read_table(tmp_path / "md" / "toy" / schema.SAMPLES_FILE).to_pandas()
    assert list(zip(samples.class_id, samples.index_in_class)) == [
        (c, i) for c, n in enumerate(COUNTS) for i in range(n)]
    assert list(samples.key) == [schema.sample_key(c, i) for c, n in enumerate(COUNTS) for i in range(n)]
    classes = pd.read_parquet(tmp_path / "md" / "toy" / schema.CLASSES_FILE)
    assert list(classes.first_sample) == list(np.cumsum([0] + COUNTS[:-1]))
    assert classes.superclass.tolist() == [c // 2 for c in range(len(COUNTS))]


def test_same_input_gives_byte_identical_shards(tmp_path):
    for name in "ab":
        write_source(tmp_path / name, COUNTS, max_shard_samples=7)
    a, b = (sorted((tmp_path / n / "md" / "toy").iterdir()) for n in "ab")
    assert [p.name for p in a] == [p.name for p in b]
    for pa_, pb in zip(a, b):
        assert pa_.read_bytes() == pb.read_bytes(), pa_.name


@pytest.mark.parametrize("stop_after", [0, 3, 7, 15, 30])
def test_interrupted_write_resumes_to_identical_output(tmp_path, stop_after):
    write_source(tmp_path / "full", COUNTS, max_shard_samples=7)
    partial = write_source(tmp_path / "resumed", COUNTS, max_shard_samples=7, stop_after=stop_after)
    assert partial.num_committed == (stop_after // 7) * 7
    assert not (tmp_path / "resumed" / "md" / "toy").exists()  # nothing visible before finish()
    write_source(tmp_path / "resumed", COUNTS, max_shard_samples=7)
    for p in sorted((tmp_path / "full" / "md" / "toy").iterdir()):
        assert (tmp_path / "resumed" / "md" / "toy" / p.name).read_bytes() == p.read_bytes(), p.name
    assert not staging_dir(tmp_path / "resumed", "md", "toy").exists()


def test_changed_input_discards_the_staged_partial_work(tmp_path):
    write_source(tmp_path, COUNTS, max_shard_samples=7, stop_after=20, fingerprint={"v": 1})
    writer = SourceWriter(tmp_path, "md", "toy", fingerprint={"v": 2}, max_shard_samples=7)
    assert writer.num_committed == 0 and writer.last_committed is None


def test_out_of_order_samples_are_rejected(tmp_path):
    writer = SourceWriter(tmp_path, "md", "toy", fingerprint={})
    writer.add(1, 0, b"x", "jpg")
    with pytest.raises(ValueError, match="order"):
        writer.add(0, 5, b"x", "jpg")
    with pytest.raises(ValueError, match="format"):
        writer.add(2, 0, b"x", "gif")


def test_finish_rejects_a_class_count_mismatch(tmp_path):
    writer = SourceWriter(tmp_path, "md", "toy", fingerprint={})
    for i in range(3):
        writer.add(0, i, b"x", "jpg")
    with pytest.raises(ValueError, match="class 0: 4 images expected, 3 written"):
        writer.finish([ClassRecord(0, "a", "train", None, 4)], INFO)


def test_reader_keeps_open_files_bounded(tmp_path):
    write_source(tmp_path, [40] * 5, max_shard_samples=2)  # 100 shards
    reader = SourceReader(tmp_path / "md" / "toy", max_open_files=4)
    rng = np.random.RandomState(0)
    for i in rng.randint(0, reader.num_samples, size=500):
        reader.read(int(i))
        assert reader.num_open_files <= 4
    reader.close()
    assert reader.num_open_files == 0


def _read_all_in_child(reader: SourceReader) -> list[int]:
    return [zlib.crc32(reader.read(i)) for i in range(reader.num_samples)]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_works_in_worker_processes(tmp_path, method):
    write_source(tmp_path, COUNTS, max_shard_samples=5)
    reader = SourceReader(tmp_path / "md" / "toy")
    reader.read(0)  # the parent holds a descriptor before forking
    expected = _read_all_in_child(reader)
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        for got in pool.map(_read_all_in_child, [reader, reader]):
            assert got == expected
    assert _read_all_in_child(pickle.loads(pickle.dumps(reader))) == expected


def test_webdataset_reads_the_same_samples(tmp_path):
    wds = pytest.importorskip("webdataset")
    write_source(tmp_path, COUNTS, max_shard_samples=7)
    reader = SourceReader(tmp_path / "md" / "toy")
    urls = [str(reader.path / s.name) for s in reader.info.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False))
    samples = reader.samples().to_pandas()
    assert [g["__key__"] for g in got] == list(samples.key)
    for i, g in enumerate(got):
        image = g.get("jpg", g.get("png"))
        assert image == reader.read(i)
        assert int(g["cls"]) == samples.class_id[i]


def test_verify_accepts_a_good_source_and_decodes_through_the_callback(tmp_path):
    write_source(tmp_path, COUNTS, max_shard_samples=7)
    seen = []
    report = verify_source(tmp_path / "md" / "toy", decode=seen.append)
    assert report.num_samples == sum(COUNTS) == report.decoded == len(seen)
    assert report.num_shards == 6


def test_verify_names_the_shard_and_key_of_a_corrupted_image(tmp_path):
    write_source(tmp_path, COUNTS, max_shard_samples=7)
    src = tmp_path / "md" / "toy"
    samples = pq.read_table(src / schema.SAMPLES_FILE).to_pandas()
    row = samples.iloc[9]
    shard = src / schema.shard_name("toy", int(row.shard))
    data = bytearray(shard.read_bytes())
    data[int(row.offset) + 1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"toy-000001\.tar: sample {row.key} \(row 9\): image bytes"):
        verify_source(src)


def test_verify_reports_a_truncated_shard(tmp_path):
    write_source(tmp_path, COUNTS, max_shard_samples=7)
    shard = tmp_path / "md" / "toy" / schema.shard_name("toy", 2)
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ManifestError, match="toy-000002.tar"):
        verify_source(tmp_path / "md" / "toy")


def test_verify_reports_an_index_that_disagrees_with_the_manifest(tmp_path):
    write_source(tmp_path, COUNTS)
    src = tmp_path / "md" / "toy"
    index = np.load(src / schema.INDEX_FILE)
    index["offset"][4] += 512
    np.save(src / schema.INDEX_FILE, index)
    with pytest.raises(ManifestError, match="index.npy: column offset differs .* row \\[4\\]"):
        verify_source(src)


@pytest.mark.parametrize("column, row, value, message", [
    ("class_id", 7, 2, "classes.parquet: class 1: its rows are not contiguous"),  # row 7 is class 1's third
    ("class_id", 0, 1, "classes.parquet: class 0: its rows are not contiguous"),
    ("index_in_class", 16, 0, "classes.parquet: class 3: index_in_class is not 0..11"),  # class 3 starts at 15
])
def test_verify_reports_class_columns_that_disagree_with_the_class_blocks(tmp_path, column, row, value, message):
    """samples.parquet edited in one cell (its keys unchanged): verify names the class whose block it breaks."""
    import pyarrow as pa

    write_source(tmp_path, COUNTS)
    src = tmp_path / "md" / "toy"
    table = pq.read_table(src / schema.SAMPLES_FILE)
    values = table[column].to_pylist()
    values[row] = value
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                             pa.array(values, table.schema.field(column).type))
    pq.write_table(table, src / schema.SAMPLES_FILE)
    with pytest.raises(ManifestError, match=message):
        verify_source(src)


def test_open_source_finds_sources_and_explains_missing_ones(tmp_path):
    write_source(tmp_path, COUNTS)
    assert find_sources(tmp_path) == [tmp_path / "md" / "toy"]
    assert open_source(tmp_path, "toy").name == "toy"
    with pytest.raises(ManifestError, match="no converted source named 'nope'"):
        open_source(tmp_path, "nope")
    write_source(tmp_path / "partial", COUNTS, max_shard_samples=7, stop_after=10)
    with pytest.raises(ManifestError, match="interrupted conversion"):
        SourceReader(tmp_path / "partial" / "md" / "toy")


def test_source_json_with_an_unknown_format_version_is_refused(tmp_path):
    write_source(tmp_path, COUNTS)
    path = tmp_path / "md" / "toy" / schema.SOURCE_FILE
    path.write_text(path.read_text().replace(f'"format_version": {schema.FORMAT_VERSION}', '"format_version": 99'))
    with pytest.raises(ManifestError, match="format version 99"):
        SourceReader(tmp_path / "md" / "toy")


def test_keys_and_names_follow_the_webdataset_rules():
    schema.check_key(schema.sample_key(99999, 9999999))
    for bad in ("a.b", "a/b", "x" * 100):
        with pytest.raises(ValueError):
            schema.check_key(bad)
    with pytest.raises(ValueError):
        schema.check_name("source", "Bad-Name")


def test_tar_headers_are_byte_identical_to_tarfiles():
    from manifests._tar import tar_header, tarfile_header

    rng = np.random.RandomState(0)
    names = ["a", "c00001_0000001.cls", "x" * 100] + ["k" * int(rng.randint(1, 101)) for _ in range(50)]
    for name in names:
        for size in (0, 1, 511, 512, 10**6, 8**11 - 1, int(rng.randint(0, 2**31))):
            assert tar_header(name, size) == tarfile_header(name, size), (name, size)


@pytest.mark.parametrize("class_bytes,class_samples,max_samples,max_bytes,runs", [
    ([10, 10, 10, 10], [1, 1, 1, 1], 100, 25, ((0, 2), (2, 4))),  # by bytes: a run never exceeds the limit
    ([10, 10, 10, 10], [3, 3, 3, 3], 7, 10**9, ((0, 2), (2, 4))),  # by samples
    ([5, 50, 5, 5], [1, 1, 1, 1], 100, 20, ((0, 1), (1, 2), (2, 4))),  # a class over the limit: a run of its own
    ([], [], 10, 10, ((0, 0),)),
])
def test_runs_are_a_pure_function_of_the_input_and_the_shard_limits(class_bytes, class_samples, max_samples,
                                                                     max_bytes, runs):
    from manifests.writer import plan_runs

    assert plan_runs(class_bytes, class_samples, max_samples, max_bytes) == runs


def test_writing_and_verifying_hold_one_batch_of_the_sample_manifest_at_a_time(tmp_path, monkeypatch):
    """Neither the writer (Arrow memory) nor verify (Python objects, NumPy arrays) holds every sample's row at
    once: the writer's Arrow peak stays below the whole table's, and verify's peak does not grow with the
    number of samples (quickdraw has 50 million)."""
    import tracemalloc

    import pyarrow as pa

    import manifests.verify as verify_module

    def write(root: Path, samples: int, per_class: int = 1000) -> Path:
        writer = SourceWriter(root, "md", "many", fingerprint={}, max_shard_samples=500)
        for i in range(samples):
            writer.add(i // per_class, i % per_class, b"\xff\xd8\xff", "jpg")
        writer.finish([ClassRecord(c, f"c{c}", "train", None, per_class) for c in range(samples // per_class)],
                      INFO)
        return root / "md" / "many"

    small, large = 10_000, 40_000
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        small_source = write(tmp_path / "small", small)
    finally:
        pa.set_memory_pool(previous)
    # The whole sample table in Arrow is > 40 bytes per row; one part is 500 rows.
    assert pool.max_memory() < 40 * small / 4, pool.max_memory()
    large_source = write(tmp_path / "large", large)
    monkeypatch.setattr(verify_module, "_BATCH_ROWS", 1000)

    def peak_of(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def arrow_peak_of(source: Path) -> int:
        """Arrow's peak allocation while verifying `source`, in a fresh process (Arrow's own pool keeps its peak
        for the life of a process, and its readers allocate from it whatever pool is set later)."""
        code = ("import sys, pyarrow as pa, manifests.verify as v; v._BATCH_ROWS = 1000; "
                "v.verify_source(sys.argv[1]); print(pa.default_memory_pool().max_memory())")
        run = subprocess.run([sys.executable, "-c", code, str(source)], capture_output=True, text=True, check=True)
        return int(run.stdout)

    verify_source(small_source)  # imports and one-time set-up happen here, outside the measurements
    peaks = [peak_of(lambda: verify_source(source)) for source in (small_source, large_source)]
    arrow = [arrow_peak_of(source) for source in (small_source, large_source)]
    # Per-sample state (e.g. the class columns as int32: 8 bytes per sample, or Arrow reading samples.parquet
    # ahead whole) would add > 200 kB for the 30,000 more samples; one batch's rows and the 1 MiB read buffer
    # are the same for both.
    assert peaks[1] - peaks[0] < 3 * (large - small), peaks
    assert arrow[1] - arrow[0] < 3 * (large - small), arrow
