"""`lite-convert md` on TF-written fixtures: bytes round-trip, determinism, manifests, views, skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from convert.md import ConvertConfig, convert_planned, plan_datasets
from manifests import open_source, verify_source
from manifests.md_spec import load_md_spec, md_v2_view, parse_md_spec, spec_view

from manifests.md_spec import SHIPPED_SPECS_DIR as SPECS_DIR  # MD's specs, shipped in manifests/md_specs/

SPECS = SPECS_DIR


def _convert(records: Path, out: Path, **kwargs):
    config = ConvertConfig(records=str(records), out=str(out), **kwargs)
    return convert_planned(plan_datasets(config), config)


@pytest.fixture(scope="module")
def converted(md_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    results = _convert(md_records["root"], out, max_shard_samples=40)
    return out, results


def test_every_image_round_trips_byte_for_byte(md_records, converted):
    out, results = converted
    assert sorted(r.source for r in results) == ["md/dtd", "md/ilsvrc_2012", "md/omniglot"]
    for name, images in md_records["images"].items():
        with open_source(out, name) as reader:
            samples = reader.samples().to_pydict()
            for row, (c, i) in enumerate(zip(samples["class_id"], samples["index_in_class"])):
                assert reader.read(row) == images[c][i]
            assert reader.num_samples == sum(map(len, images))
        verify_source(out / "md" / name)


def test_gray_cmyk_jpegs_stay_jpg_and_png_payload_stays_png(md_records, converted):
    out, _ = converted
    samples = pq.read_table(out / "md" / "dtd" / "samples.parquet").to_pandas()
    fmt = {(c, i): f for c, i, f in zip(samples.class_id, samples.index_in_class, samples.format)}
    assert fmt[(0, 0)] == "jpg" and fmt[(1, 0)] == "jpg"
    last = len(md_records["images"]["dtd"][2]) - 1
    assert fmt[(2, last)] == "png"
    assert sum(f == "png" for f in fmt.values()) == 1


def test_converting_twice_gives_identical_shards_and_manifests(md_records, converted, tmp_path):
    out, _ = converted
    _convert(md_records["root"], tmp_path, datasets=("dtd", "omniglot"), max_shard_samples=40, workers=2)
    for name in ("dtd", "omniglot"):
        first, second = out / "md" / name, tmp_path / "md" / name
        files = sorted(p.name for p in first.iterdir())
        assert files == sorted(p.name for p in second.iterdir())
        assert sum(f.endswith(".tar") for f in files) > 1
        for f in files:
            if f != "source.json":  # holds the config (paths, workers)
                assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_manifests_read_with_pyarrow_and_pandas(md_records, converted):
    out, _ = converted
    src = out / "md" / "omniglot"
    classes = pd.read_parquet(src / "classes.parquet")
    samples = pq.read_table(src / "samples.parquet").to_pandas()
    spec = load_md_spec(SPECS / "omniglot_dataset_spec.json")
    assert list(classes.class_id) == list(range(1623))
    assert classes.split.value_counts().to_dict() == {"train": 883, "test": 659, "valid": 81}
    assert list(classes.superclass) == [spec.superclass_of(c) for c in range(1623)]
    assert list(classes.name) == list(spec.class_names)
    assert (samples.groupby("class_id").size().values == classes.num_images.values).all()
    info = json.loads((src / "source.json").read_text())
    assert info["dataset_spec"] == json.loads((md_records["root"] / "omniglot" / "dataset_spec.json").read_text())
    assert info["benchmark"] == "md-v1" and info["converter_version"]
    assert set(info["extra"]) == {"fingerprint", "convert_config", "staging_plan", "manifest_bytes"}
    assert info["extra"]["convert_config"]["max_shard_samples"] == 40


def test_webdataset_reads_the_same_keys_bytes_and_labels(md_records, converted):
    import webdataset as wds

    out, _ = converted
    src = out / "md" / "dtd"
    urls = [str(p) for p in sorted(src.glob("*.tar"))]
    got = [(s["__key__"], int(s["cls"]), s.get("jpg", s.get("png"))) for s in wds.WebDataset(urls, shardshuffle=False)]
    samples = pq.read_table(src / "samples.parquet").to_pydict()
    images = md_records["images"]["dtd"]
    assert got == [(k, c, images[c][i]) for k, c, i in zip(samples["key"], samples["class_id"],
                                                            samples["index_in_class"])]


def test_dataset_spec_is_kept_verbatim_and_v1_splits_follow_it(md_records, converted):
    out, _ = converted
    src = out / "md" / "ilsvrc_2012"
    info = json.loads((src / "source.json").read_text())
    original = json.loads((md_records["root"] / "ilsvrc_2012" / "dataset_spec.json").read_text())
    assert info["dataset_spec"] == original and info["sampling_spec"] == original
    classes = pd.read_parquet(src / "classes.parquet")
    assert classes.split.value_counts().to_dict() == {"train": 712, "valid": 158, "test": 130}


def test_md_v2_view_is_chosen_when_reading_not_baked_into_the_shards(md_records, converted):
    out, _ = converted
    with pytest.raises(TypeError):  # no --benchmark: the view is not part of the conversion
        ConvertConfig(records=str(md_records["root"]), out=str(out), benchmark="md-v2")
    src = out / "md" / "ilsvrc_2012"
    info = json.loads((src / "source.json").read_text())
    assert "benchmark" not in info["extra"]["fingerprint"] and info["benchmark"] == "md-v1"
    original = load_md_spec(md_records["root"] / "ilsvrc_2012" / "dataset_spec.json")
    stored = parse_md_spec(info["sampling_spec"], "stored")
    v2 = spec_view(stored, "md-v2")  # LITE's flat ImageNet: all 1000 classes train, v1 ids and counts
    assert v2.raw == md_v2_view(original) and v2.classes_per_split == {"train": 1000, "valid": 0, "test": 0}
    assert v2.images_per_class == original.images_per_class and v2.class_names == original.class_names
    assert spec_view(stored, "md-v1") == original
    omniglot = parse_md_spec(json.loads((out / "md" / "omniglot" / "source.json").read_text())["sampling_spec"], "x")
    assert spec_view(omniglot, "md-v2") == omniglot  # MD-v2 re-splits only ImageNet and MNIST


def test_complete_source_with_same_fingerprint_is_up_to_date(md_records, converted):
    out, _ = converted
    before = (out / "md" / "dtd" / "dtd-000000.tar").stat().st_mtime_ns
    results = _convert(md_records["root"], out, datasets=("dtd",), max_shard_samples=40)
    assert [r.status for r in results] == ["up to date"]
    assert (out / "md" / "dtd" / "dtd-000000.tar").stat().st_mtime_ns == before
