"""Episode plans and the multiworker loader on tiny converted sources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.episodes import EpisodePlanner, open_readers
from lite_train.data.loader import EpisodeLoaderConfig, make_episode_loader
from manifests.md_spec import shipped_spec_path

from tests.lite_train.tiny_sources import class_colour, write_converted

GOLDEN = Path(__file__).parent / "golden" / "md_sampler"  # from MD's own sampling.py (its README)


def plans(converted, sources=("toyflat",), split="train", seed=0, n=30, **kw):
    return list(EpisodePlanner(open_readers(converted, sources), split, seed, num_episodes=n, **kw))


@pytest.fixture(scope="module")
def converted_dtd(tmp_path_factory) -> Path:
    """MD's real dtd spec (47 classes of 120 images) converted with tiny synthetic images."""
    root = tmp_path_factory.mktemp("dtd")
    write_converted(root, json.loads(shipped_spec_path("dtd").read_text()), max_shard_samples=2000)
    return root


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_planned_descriptions_equal_md_sampling_py_golden(converted_dtd, split, seed):
    expected = json.loads((GOLDEN / f"seed{seed}.json").read_text())[f"dtd/{split.upper()}"]
    got = plans(converted_dtd, ("dtd",), split, seed=seed, n=len(expected))
    assert [[list(entry) for entry in p.description] for p in got] == expected


def test_every_image_of_an_episode_is_distinct_and_from_its_class(converted):
    reader = open_readers(converted, ["toyflat"])[0]
    for plan in plans(converted, split="train", n=40):
        both = np.concatenate([plan.support, plan.query])
        assert len(set(both.tolist())) == len(both)
        for label, class_id in enumerate(plan.class_ids):
            first, count = reader.class_range(int(class_id))
            for picked in (plan.support[plan.support_labels == label], plan.query[plan.query_labels == label]):
                assert np.all((picked >= first) & (picked < first + count))
        assert set(plan.class_ids.tolist()) <= set(reader.class_ids("train").tolist())


def test_support_is_grouped_by_class_in_description_order(converted):
    for plan in plans(converted, n=10):
        shots = [k for _, k, _ in plan.description]
        assert plan.support_labels.tolist() == [i for i, k in enumerate(shots) for _ in range(k)]
        assert len(plan.query) == sum(q for _, _, q in plan.description)


def test_consecutive_episodes_draw_disjoint_images_of_a_class_until_its_pass_ends(converted):
    """Replays MD's per-class cursor: a class's request of `need` = shots + query images that does not fit in
    what is left of its pass starts a new pass; inside one pass no image may come twice."""
    cursor: dict[int, int] = {}
    used: dict[int, set] = {}
    new_passes = 0
    reader = open_readers(converted, ["toyflat"])[0]
    for plan in plans(converted, n=60, seed=3):
        for label, class_id in enumerate(plan.class_ids.tolist()):
            picked = plan.support[plan.support_labels == label].tolist() + \
                plan.query[plan.query_labels == label].tolist()
            _, count = reader.class_range(class_id)
            if class_id not in cursor:  # first request: the first pass starts
                cursor[class_id], used[class_id] = 0, set()
            elif len(picked) > count - cursor[class_id]:  # MD's flush: the rest of the pass is dropped
                cursor[class_id], used[class_id] = 0, set()
                new_passes += 1
            assert not used[class_id] & set(picked), (plan.index, class_id)
            used[class_id] |= set(picked)
            cursor[class_id] += len(picked)
    assert new_passes >= 10  # the premise: many classes ran out of their first pass


def test_the_same_seed_gives_the_same_plans_and_another_seed_does_not(converted):
    a, b, c = plans(converted, seed=1), plans(converted, seed=1), plans(converted, seed=2)
    assert all(np.array_equal(x.support, y.support) and np.array_equal(x.query, y.query) for x, y in zip(a, b))
    assert any(x.description != z.description for x, z in zip(a, c))


def test_a_resumed_stream_continues_exactly_where_it_stopped(converted):
    full = plans(converted, ("toyflat", "toyglyphs"), n=25, seed=4)
    tail = plans(converted, ("toyflat", "toyglyphs"), n=25, seed=4, start=17)
    assert [p.index for p in tail] == list(range(17, 25))
    for x, y in zip(full[17:], tail):
        assert x.source == y.source and np.array_equal(x.support, y.support) and np.array_equal(x.query, y.query)


def test_multi_source_episodes_come_from_each_source_about_equally(converted):
    got = plans(converted, ("toyflat", "toyglyphs"), n=400, seed=5)
    share = np.mean([p.source == "toyflat" for p in got])
    assert 0.42 < share < 0.58


def test_use_hierarchy_false_mixes_alphabets(converted):
    reader = open_readers(converted, ["toyglyphs"])[0]
    superclass = dict(zip(reader.classes["class_id"].to_pylist(), reader.classes["superclass"].to_pylist()))
    mixed = lambda ps: sum(len({superclass[c] for c in p.class_ids.tolist()}) > 1 for p in ps)  # noqa: E731
    assert mixed(plans(converted, ("toyglyphs",), n=30)) == 0
    assert mixed(plans(converted, ("toyglyphs",), n=30, use_hierarchy=False)) > 0


def _episodes(converted, workers, **kw):
    cfg = EpisodeLoaderConfig(data=str(converted), sources=("toyflat", "toyglyphs"), split="train", seed=11,
                              image_size=24, num_episodes=6, num_workers=workers, **kw)
    return list(make_episode_loader(cfg))


def test_episode_content_is_identical_for_0_1_and_2_workers(converted):
    reference = _episodes(converted, 0)
    for workers in (1, 2):
        got = _episodes(converted, workers)
        assert [e["index"] for e in got] == list(range(6))
        for a, b in zip(reference, got):
            assert a["source"] == b["source"]
            for key in ("support_images", "support_labels", "support_class_ids", "query_images", "query_labels",
                        "query_class_ids"):
                assert torch.equal(a[key], b[key]), key


def test_pixels_belong_to_the_labelled_class(converted):
    for ep in _episodes(converted, 0):
        for part in ("support", "query"):
            images, ids = ep[f"{part}_images"], ep[f"{part}_class_ids"]
            assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32
            assert images.min() >= -1.0 and images.max() <= 1.0
            centre = (images[:, :, 12, 12] + 1) * 127.5  # (n, 3), away from the index bar
            expected = torch.tensor([class_colour(int(c)) for c in ids], dtype=torch.float32)
            assert (centre - expected).abs().max() < 12  # JPEG quality 95 on a flat colour


def test_open_files_stay_bounded_whatever_the_number_of_shards(converted):
    readers = open_readers(converted, ["toyflat", "toyglyphs"], max_open_files=3)
    planner = EpisodePlanner(readers, "train", 0, num_episodes=20)
    for plan in planner:
        reader = readers[plan.source_index]
        for i in plan.support.tolist() + plan.query.tolist():
            reader.read(i)
            assert reader.num_open_files <= 3
    assert len(readers[0].info.shards) + len(readers[1].info.shards) > 3


def test_a_split_with_too_few_classes_fails_at_construction(converted):
    with pytest.raises(ValueError, match="min_ways"):
        EpisodePlanner(open_readers(converted, ["toyglyphs"]), "train", 0,
                       EpisodeDescriptionConfig(min_ways=30))


def test_describe_cli_prints_one_json_line_per_episode(converted):
    cmd = [sys.executable, "-m", "lite_train.cli", "describe", "--data", str(converted), "--source", "toyglyphs",
           "--split", "test", "--seed", "7", "--count", "4"]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(lines) == 4
    expected = [p.description for p in plans(converted, ("toyglyphs",), "test", seed=7, n=4)]
    assert [tuple(tuple(t) for t in json.loads(line)) for line in lines] == expected


def test_episodes_cli_writes_a_picture(converted, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "lite_train.cli", "episodes", "--data", str(converted), "--source", "toyglyphs",
           "--split", "test", "--n", "2", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from PIL import Image
    with Image.open(out) as img:
        assert img.size[0] > 300 and img.size[1] > 100


def test_cli_errors_are_one_line_and_exit_non_zero(converted):
    cmd = [sys.executable, "-m", "lite_train.cli", "describe", "--data", str(converted), "--source", "nope"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no converted source named 'nope'" in result.stderr
