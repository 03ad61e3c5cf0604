"""`lite-convert vtab` under `tfds.testing.mock_data`: every registry entry converted, verified and re-read.

The mock yields the same N examples for every split string, so each slice of a task holds examples 0..N-1
of the mock; `--limit N` keeps every expected slice count at N. Expected bytes and labels are taken from the
mocked TFDS examples themselves (raw labels, object counts, dsprites masks), not from the converter.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from convert.cli import app
from convert.vtab.convert import VtabConfig, convert_vtab
from convert.vtab.labels import rederive_labels
from convert.vtab.registry import TASKS, VTAB_V2_TASKS, vtab_label
from manifests import SourceReader, schema
from manifests.provenance import read_provenance, role_rows
from manifests.verify import verify_source

from tests.convert.vtab.conftest import mocked_tfds, write_dataset_info, SPLIT_SIZES

N = 3  # examples per slice


def _flat(example: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in example.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _mock_examples(tfds, data_dir: Path, task_id: str) -> list[dict]:
    """The N examples the mock yields for any slice of the task's builder, image still encoded."""
    task = TASKS[task_id]
    builder = tfds.builder(task.tfds_spec, data_dir=str(data_dir))
    ds = builder.as_dataset(split="train", decoders={task.image_feature: tfds.decode.SkipDecoding()})
    return [_flat(ex) for ex in tfds.as_numpy(ds)]


@pytest.fixture(scope="module")
def converted(tfds_dir, tmp_path_factory):
    """All 19 tasks converted (vtab1k, limit N) plus the mock's examples of each task."""
    out = tmp_path_factory.mktemp("vtab_out")
    with mocked_tfds(tfds_dir, N) as tfds:
        results = convert_vtab(VtabConfig(tfds_data_dir=str(tfds_dir), out=str(out), tasks=tuple(TASKS), limit=N))
        examples = {t: _mock_examples(tfds, tfds_dir, t) for t in TASKS}
    return out, {r.source: r for r in results}, examples


def _expected_label(task_id: str, ex: dict) -> int:
    rule = TASKS[task_id].label_rule
    if rule == "label":
        return int(ex["label"])
    if rule == "clevr_count_all":
        return len(ex["objects/size"]) - 3
    if rule.startswith("smallnorb_"):
        return int(ex[rule.removeprefix("smallnorb_")])
    if rule == "dsprites_label_x_position":
        return int(ex["label_x_position"]) // 2
    return vtab_label(task_id, ex)  # binned rules: tested case by case in test_labels.py


@pytest.mark.parametrize("task_id", list(TASKS))
def test_every_registry_task_converts_verifies_and_reads_back(converted, task_id):
    out, results, examples = converted
    task = TASKS[task_id]
    path = out / "vtab" / task_id
    assert results[f"vtab/{task_id}"].status == "converted"
    report = verify_source(path)
    assert report.num_samples == 3 * N and report.num_classes == task.num_classes
    reader = SourceReader(path)
    info = reader.info
    assert info.format_version == 2 and info.layout == "ordered"
    assert info.tfds == schema.TfdsOrigin(task.tfds_name, task.tfds_config, task.tfds_version, "4.9.6", "vtab1k",
                                          task.label_rule)
    prov = read_provenance(reader).to_pydict()
    # support = train800 then val200, query = VTAB's test slice, N each, TFDS canonical indices
    expected_slices = [task.support[0], task.support[1], task.query]
    assert prov["role"] == ["support"] * 2 * N + ["query"] * N
    assert prov["tfds_slice"] == [s.spec for s in expected_slices for _ in range(N)]
    assert prov["tfds_split"] == [s.split for s in expected_slices for _ in range(N)]
    assert prov["tfds_index"] == [s.start + k for s in expected_slices for k in range(N)]
    positions = set(zip(prov["tfds_split"], prov["tfds_index"]))
    assert len(positions) == 3 * N  # support and query disjoint
    labels = reader.samples()["class_id"].to_pylist()
    assert all(0 <= y < task.num_classes for y in labels)
    assert labels == [_expected_label(task_id, ex) for _ in range(3) for ex in examples[task_id]]
    for row in range(3 * N):
        stored, original = reader.read(row), bytes(examples[task_id][row % N][task.image_feature])
        if task.rescale_255:  # dsprites: the 0/1 mask times 255, re-encoded losslessly
            mask = np.asarray(Image.open(io.BytesIO(original)))
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), mask.squeeze() * 255)
        else:
            assert stored == original
    # plain webdataset: same keys and .cls labels, in manifest order
    shards = [str(path / s.name) for s in info.shards]
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert [int(s["cls"]) for s in samples] == labels
    assert [s["__key__"] for s in samples] == reader.samples()["key"].to_pylist()
    assert np.array_equal(role_rows(reader, "query"), np.arange(2 * N, 3 * N))
    reader.close()
    assert rederive_labels(path) == 3 * N  # every label follows from its stored raw value


def test_a_label_that_does_not_follow_from_its_raw_value_is_reported(converted, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "clevr_count_all"
    shutil.copytree(converted[0] / "vtab" / "clevr_count_all", path)
    table = pq.read_table(path / schema.PROVENANCE_FILE)
    raw = table["raw_value"].to_pylist()
    raw[4] += 1.0  # one more object than the stored label says
    column = table.schema.get_field_index("raw_value")
    pq.write_table(table.set_column(column, table.schema.field(column), pa.array(raw)), path / schema.PROVENANCE_FILE)
    with pytest.raises(ValueError, match=r"\(row 4\) has label .* clevr_count_all gives"):
        rederive_labels(path)


def test_default_task_list_is_vtab_v2_without_dtd():
    assert len(VTAB_V2_TASKS) == 18 and "dtd" not in VTAB_V2_TASKS and len(TASKS) == 19
    assert VtabConfig(tfds_data_dir="d", out="o").task_ids == VTAB_V2_TASKS


def test_lite_protocol_reads_the_lite_reader_slices(tfds_dir, tmp_path):
    with mocked_tfds(tfds_dir, N):
        convert_vtab(VtabConfig(tfds_data_dir=str(tfds_dir), out=str(tmp_path), protocol="lite", limit=N,
                                tasks=("eurosat", "clevr_count_all", "cifar100")))
    expected_query = {"eurosat": "train[1000:]", "clevr_count_all": "validation", "cifar100": "test"}
    for task_id, query in expected_query.items():
        reader = SourceReader(tmp_path / "vtab_lite" / task_id)
        prov = read_provenance(reader).to_pydict()
        assert prov["tfds_slice"] == ["train[0:1000]"] * N + [query] * N
        assert reader.info.tfds.protocol == "lite"


def test_interrupted_conversion_resumes_to_identical_shards(tfds_dir, tmp_path):
    config = dict(tfds_data_dir=str(tfds_dir), tasks=("clevr_count_all",), limit=N, max_shard_samples=2)
    with mocked_tfds(tfds_dir, N):
        convert_vtab(VtabConfig(out=str(tmp_path / "clean"), **config))
        seen = []

        def interrupt(task_id, n):
            seen.append(n)
            if sum(seen) >= 5:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            convert_vtab(VtabConfig(out=str(tmp_path / "resumed"), **config), interrupt)
        assert (tmp_path / "resumed" / "vtab" / ".clevr_count_all.partial").is_dir()
        [result] = convert_vtab(VtabConfig(out=str(tmp_path / "resumed"), **config))
        assert result.status == "resumed"
        [again] = convert_vtab(VtabConfig(out=str(tmp_path / "resumed"), **config))
        assert again.status == "up to date"
    clean, resumed = tmp_path / "clean" / "vtab" / "clevr_count_all", tmp_path / "resumed" / "vtab" / "clevr_count_all"
    names = sorted(p.name for p in clean.iterdir() if p.suffix == ".tar")
    assert len(names) == 5 and names == sorted(p.name for p in resumed.iterdir() if p.suffix == ".tar")
    for name in names + [schema.PROVENANCE_FILE, schema.SAMPLES_FILE, schema.CLASSES_FILE]:
        assert (clean / name).read_bytes() == (resumed / name).read_bytes(), name


def test_a_label_outside_the_classes_stops_the_conversion(tfds_dir, tmp_path, monkeypatch):
    from tensorflow_datasets.testing import mocking

    with mocked_tfds(tfds_dir, N):
        crafted = mocking.RandomFakeGenerator._generate_example

        def two_objects(self, rng):  # a 2-object scene: VTAB would label it -1
            ex = crafted(self, rng)
            ex["objects"] = {k: v[:2] for k, v in ex["objects"].items()}
            return ex

        monkeypatch.setattr(mocking.RandomFakeGenerator, "_generate_example", two_objects)
        with pytest.raises(ValueError, match=r"clevr_count_all: train\[0\]: raw value 2.0 gives label -1"):
            convert_vtab(VtabConfig(tfds_data_dir=str(tfds_dir), out=str(tmp_path), tasks=("clevr_count_all",),
                                    limit=N))
    assert not (tmp_path / "vtab" / "clevr_count_all").exists()


def _one_error_line(output: str) -> bool:
    lines = [line for line in output.splitlines() if line.strip()]  # rich may leave a blank progress line
    return len(lines) == 1 and lines[0].startswith("error: ")


@pytest.fixture
def unprepared_dir(tmp_path) -> Path:
    """A TFDS data_dir where only cifar100 is prepared: the manual datasets are not."""
    data = tmp_path / "tfds"
    write_dataset_info(data, TASKS["cifar100"].tfds_spec, SPLIT_SIZES["cifar100"])
    return data


def test_missing_manual_files_are_listed_with_where_to_put_them(unprepared_dir, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "trainLabels.csv").write_text("image,level\n")
    runner = CliRunner()
    with mocked_tfds(unprepared_dir, N):
        base = ["vtab", "--tfds-data-dir", str(unprepared_dir), "--out", str(tmp_path / "out")]
        r = runner.invoke(app, base + ["--tasks", "sun397"])
        assert r.exit_code == 1 and _one_error_line(r.output), r.output
        assert "error: sun397: sun397/tfds:4.0.0 is not prepared and needs --manual-dir with SUN397.tar.gz, " \
               "Partitions.zip" in r.output
        r = runner.invoke(app, base + ["--tasks", "diabetic_retinopathy", "--manual-dir", str(manual)])
        assert r.exit_code == 1 and _one_error_line(r.output), r.output
        for name in ("train/", "test/", "sample/", "retinopathy_solution.csv"):
            assert str(manual / name) in r.output
        assert "trainLabels.csv" not in r.output
        (manual / "NWPU-RESISC45").mkdir()  # complete: TFDS prepares it (mocked: a no-op, so still no splits)
        r = runner.invoke(app, base + ["--tasks", "resisc45", "--manual-dir", str(manual)])
        assert r.exit_code == 1 and "needs these in --manual-dir" not in r.output, r.output
        assert "has no split 'train' (splits: none)" in r.output, r.output
        r = runner.invoke(app, base + ["--tasks", "dmlab"])  # not manual, not prepared
        assert r.exit_code == 1 and "is not a prepared dmlab:2.0.1" in r.output, r.output


def test_cli_converts_and_verify_accepts_vtab_sources(unprepared_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    with mocked_tfds(unprepared_dir, N):
        r = runner.invoke(app, ["vtab", "--tfds-data-dir", str(unprepared_dir), "--out", str(out),
                                "--tasks", "cifar100", "--limit", str(N)])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0 and f"ok vtab/cifar100: 100 classes, {3 * N} samples" in r.output, r.output
    assert f"labels vtab/cifar100: {3 * N} re-derived from their raw values" in r.output
    info = json.loads((out / "vtab" / "cifar100" / schema.SOURCE_FILE).read_text())
    assert info["tfds"]["name"] == "cifar100" and info["extra"]["convert_config"]["limit"] == N
    shutil.rmtree(out)


def test_a_second_converter_on_the_same_output_fails_at_once(unprepared_dir, tmp_path):
    from manifests.staging import output_lock

    runner = CliRunner()
    out = tmp_path / "out"
    with mocked_tfds(unprepared_dir, N):
        with output_lock(out):
            # dmlab is not prepared: the lock must be refused before any builder is opened or planned
            for tasks in ("cifar100", "dmlab"):
                r = runner.invoke(app, ["vtab", "--tfds-data-dir", str(unprepared_dir), "--out", str(out),
                                        "--tasks", tasks, "--limit", str(N)])
                assert r.exit_code == 1 and _one_error_line(r.output), r.output
                assert r.output.strip() == f"error: another lite-convert (pid {os.getpid()}) is writing {out}"
            assert not (out / "vtab").exists()
        r = runner.invoke(app, ["vtab", "--tfds-data-dir", str(unprepared_dir), "--out", str(out),
                                "--tasks", "cifar100", "--limit", str(N)])
        assert r.exit_code == 0, r.output  # released with the first converter
    assert (out / "vtab" / "cifar100" / schema.SOURCE_FILE).is_file()


def test_a_task_named_twice_is_refused_before_anything_is_written(unprepared_dir, tmp_path):
    out = tmp_path / "out"
    with mocked_tfds(unprepared_dir, N):
        r = CliRunner().invoke(app, ["vtab", "--tfds-data-dir", str(unprepared_dir), "--out", str(out),
                                     "--tasks", "cifar100,eurosat, cifar100", "--limit", str(N)])
    assert r.exit_code == 1 and _one_error_line(r.output), r.output
    assert r.output.strip() == "error: --tasks names cifar100 more than once"
    assert not out.exists()
