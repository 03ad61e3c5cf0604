"""Episode-description sampler on the real MD specs (no images): MD's statistics, invariants, errors."""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import pytest

from lite_train.data.describe import describe
from lite_train.data.episode_description import (
    EpisodeDescriptionConfig,
    EpisodeDescriptionSampler,
    compute_num_query,
    sampler_rngs,
    sampler_seed,
)
from manifests.md_spec import load_md_spec, parse_md_spec

from manifests.md_spec import SHIPPED_SPECS_DIR as SPECS_DIR  # MD's specs, shipped in manifests/md_specs/
# Descriptions from MD's own sampling.py (golden/md_sampler/README.md), never from this code.
GOLDEN = pathlib.Path(__file__).parent / "golden" / "md_sampler"
GOLDEN_SEEDS = (0, 1)

N_EPISODES = 10_000
N_REFERENCE = 20_000  # episodes behind each row of the §4.12 table

# Reference §4.12: MD sampling.py, default variable config, DAG for ilsvrc, bilevel for omniglot.
# (source, split, ways mean, ways sd, support-set size mean, sd, query/class mean, shots/class mean)
REFERENCE = [
    ("ilsvrc_2012", "train", 18.91, 16.00, 369.7, 156.1, 10.00, 19.55),
    ("ilsvrc_2012", "valid", 20.56, 17.33, 371.1, 154.8, 10.00, 18.05),
    ("ilsvrc_2012", "test", 14.71, 11.28, 377.6, 155.6, 10.00, 25.67),
    ("ilsvrc_2012_v2", "train", 18.33, 15.50, 371.3, 155.4, 10.00, 20.25),
    ("omniglot", "train", 20.03, 10.48, 96.0, 75.5, 10.00, 4.79),
    ("omniglot", "valid", 10.58, 3.72, 51.2, 33.4, 10.00, 4.84),
    ("omniglot", "test", 18.86, 9.83, 90.5, 70.3, 10.00, 4.80),
    ("aircraft", "train", 27.40, 13.30, 415.7, 131.2, 10.00, 15.17),
    ("aircraft", "valid", 10.01, 3.15, 338.2, 163.1, 10.00, 33.77),
    ("aircraft", "test", 10.01, 3.15, 338.2, 163.1, 10.00, 33.77),
    ("cu_birds", "train", 27.61, 13.22, 361.5, 157.4, 10.00, 13.09),
    ("cu_birds", "test", 17.46, 7.53, 314.1, 166.0, 10.00, 17.99),
    ("dtd", "train", 19.05, 8.40, 407.3, 140.7, 10.00, 21.38),
    ("dtd", "valid", 6.00, 0.82, 282.1, 153.9, 10.00, 47.03),
    ("dtd", "test", 6.00, 0.82, 282.1, 153.9, 10.00, 47.03),
    ("quickdraw", "train", 27.59, 13.32, 423.4, 126.3, 10.00, 15.34),
    ("quickdraw", "test", 27.61, 13.28, 423.3, 126.3, 10.00, 15.33),
    ("fungi", "train", 27.54, 13.23, 360.6, 159.4, 4.00, 13.09),
    ("fungi", "test", 27.46, 13.23, 363.2, 157.8, 4.07, 13.23),
    ("vgg_flower", "train", 27.52, 13.19, 384.2, 149.2, 10.00, 13.96),
    ("vgg_flower", "test", 10.49, 3.45, 292.5, 163.1, 10.00, 27.87),
    ("traffic_sign", "test", 23.85, 11.22, 418.3, 132.1, 10.00, 17.54),
    ("mscoco", "valid", 22.48, 10.36, 415.1, 134.7, 10.00, 18.47),
    ("mscoco", "test", 22.48, 10.36, 415.1, 134.7, 10.00, 18.47),
]
ROW_IDS = [f"{r[0]}-{r[1]}" for r in REFERENCE]


@functools.lru_cache(maxsize=None)
def spec(name: str):
    return load_md_spec(SPECS_DIR / f"{name}_dataset_spec.json")


def sampler(name, split, seed=0, **config):
    return EpisodeDescriptionSampler(spec(name), split, EpisodeDescriptionConfig(**config),
                                     np.random.RandomState(sampler_seed(seed)))


@functools.lru_cache(maxsize=None)
def episodes(name: str, split: str):
    """N_EPISODES descriptions, flattened: (episode index, class id, shots, query) arrays + ways."""
    s = sampler(name, split, seed=ROW_IDS.index(f"{name}-{split}"))
    descriptions = [s.sample() for _ in range(N_EPISODES)]
    ways = np.array([len(d) for d in descriptions])
    flat = np.array([entry for d in descriptions for entry in d], dtype=np.int64)
    return descriptions, ways, np.repeat(np.arange(N_EPISODES), ways), flat


def _batch_se(values_per_episode_sum, counts_per_episode, n_batches=100):
    """Standard error of a pooled ratio mean by batch means (entries of one episode are correlated)."""
    sums = np.add.reduceat(values_per_episode_sum, np.arange(0, N_EPISODES, N_EPISODES // n_batches))
    counts = np.add.reduceat(counts_per_episode, np.arange(0, N_EPISODES, N_EPISODES // n_batches))
    return (sums / counts).std(ddof=1) / np.sqrt(n_batches)


@pytest.mark.parametrize("row", REFERENCE, ids=ROW_IDS)
def test_statistics_match_md_reference_within_4_standard_errors(row):
    name, split, ways_mean, ways_sd, size_mean, size_sd, query_mean, shots_mean = row
    descriptions, ways, episode, flat = episodes(name, split)
    # The table is itself a sample of N_REFERENCE episodes: the SE of the difference of the two means
    # is sd * sqrt(1/N + 1/N_REFERENCE). Plus half the table's last digit, for its rounding.
    inflate = np.sqrt(1 + N_EPISODES / N_REFERENCE)
    root_n = np.sqrt(N_EPISODES)
    support_size = np.bincount(episode, weights=flat[:, 1], minlength=N_EPISODES)
    query = np.array([d[0][2] for d in descriptions], dtype=float)
    assert abs(ways.mean() - ways_mean) <= 4 * inflate * ways_sd / root_n + 0.005
    assert abs(support_size.mean() - size_mean) <= 4 * inflate * size_sd / root_n + 0.05
    assert abs(query.mean() - query_mean) <= 4 * inflate * query.std(ddof=1) / root_n + 0.005
    shots_se = _batch_se(support_size, ways.astype(float))
    assert abs(flat[:, 1].sum() / ways.sum() - shots_mean) <= 4 * inflate * shots_se + 0.005


@pytest.mark.parametrize("row", REFERENCE, ids=ROW_IDS)
def test_every_description_obeys_md_invariants(row):
    name, split = row[:2]
    descriptions, ways, episode, flat = episodes(name, split)
    n_split = spec(name).classes_per_split[split]
    counts = np.array([spec(name).images_per_class[c] for c in spec(name).split_class_ids(split)])
    class_id, shots, query = flat.T
    assert ways.min() >= 5 and ways.max() <= min(50, n_split)
    assert class_id.min() >= 0 and class_id.max() < n_split  # classes within the split
    # No class twice in an episode.
    assert len(np.unique(episode * n_split + class_id)) == len(flat)
    # Query rule (variable shot): q = min(10, min_c floor(n_c / 2)), one q per episode.
    min_half = np.minimum.reduceat(counts[class_id] // 2, np.cumsum(ways) - ways)
    assert np.array_equal(query, np.repeat(np.minimum(10, min_half), ways))
    # Every class gets 1 <= k_c <= n_c - q support shots; sum k_c <= S <= 500.
    assert shots.min() >= 1
    assert np.all(shots <= counts[class_id] - query)
    support_size = np.bincount(episode, weights=shots, minlength=N_EPISODES)
    assert support_size.max() <= 500 and np.all(support_size >= ways)
    assert all(type(v) is int for entry in descriptions[0] for v in entry)


def test_every_omniglot_episode_stays_inside_one_alphabet():
    descriptions, *_ = episodes("omniglot", "train")
    s = spec("omniglot")
    for d in descriptions[:2000]:
        assert len({s.superclass_of(c) for c, _, _ in d}) == 1  # train split offset is 0


def test_imagenet_dag_episodes_are_node_leaf_sets_in_wnid_order():
    descriptions, *_ = episodes("ilsvrc_2012", "test")
    assert min(len(d) for d in descriptions) == 6  # no TEST node spans exactly 5 leaves (§4.12)
    for d in descriptions[:2000]:
        ids = [c for c, _, _ in d]
        if len(ids) < 50:  # un-subsampled node: its leaves in wn_id (= id) order
            assert ids == sorted(ids)


def test_every_imagenet_train_leaf_is_reachable():
    _, _, _, flat = episodes("ilsvrc_2012", "train")
    assert len(np.unique(flat[:, 0])) > 700  # 392 keeps all 712 leaves reachable; 10k episodes see most


def test_ignoring_the_hierarchy_gives_uniform_ways():
    s = sampler("ilsvrc_2012", "train", ignore_dag_ontology=True)
    ways = np.array([len(s.sample()) for _ in range(3000)])
    assert abs(ways.mean() - 27.5) < 4 * 13.3 / np.sqrt(3000)
    s = sampler("omniglot", "train", ignore_bilevel_ontology=True)
    d = s.sample()
    assert len({spec("omniglot").superclass_of(c) for c, _, _ in d}) > 1


def test_ignore_hierarchy_probability_mixes_both_branches():
    s = sampler("ilsvrc_2012", "train", ignore_hierarchy_probability=0.5)
    ways = np.array([len(s.sample()) for _ in range(4000)])
    assert 20.5 < ways.mean() < 25.5  # halfway between DAG (18.9) and uniform (27.5)


def test_fixed_way_shot_query_gives_exactly_those_numbers():
    s = sampler("aircraft", "test", num_ways=5, num_support=5, num_query=15)
    for _ in range(200):
        d = s.sample()
        assert len(d) == 5 and all(k == 5 and q == 15 for _, k, q in d)
        assert len({c for c, _, _ in d}) == 5


def test_support_range_draws_one_shot_count_per_episode():
    s = sampler("cu_birds", "train", num_ways=10, num_support=(1, 20), num_query=5)
    seen = set()
    for _ in range(300):
        d = s.sample()
        assert len({k for _, k, _ in d}) == 1 and {q for _, _, q in d} == {5}
        seen.add(d[0][1])
    assert seen == set(range(1, 21))


def test_fixed_support_without_query_uses_smallest_class_minus_k():
    s = sampler("fungi", "train", num_support=3, min_examples_in_class=8)
    for _ in range(200):
        d = s.sample()
        n_min = min(spec("fungi").images_per_class[c] for c, _, _ in d)
        assert {q for _, _, q in d} == {min(10, n_min - 3)} and {k for _, k, _ in d} == {3}


def test_use_all_classes_returns_the_split_in_order():
    s = sampler("dtd", "test", use_all_classes=True)
    assert [c for c, _, _ in s.sample()] == list(range(7))


def test_min_examples_in_class_filters_small_classes():
    s = sampler("fungi", "train", min_examples_in_class=50)
    counts = spec("fungi").images_per_class
    for _ in range(200):
        assert all(counts[c] >= 50 for c, _, _ in s.sample())


@pytest.mark.parametrize("source, split, config, message", [
    ("ilsvrc_2012", "train", dict(num_ways=5), '"use_dag_hierarchy" is incompatible with "num_ways"'),
    ("omniglot", "train", dict(num_ways=5), '"use_bilevel_hierarchy" is incompatible with "num_ways"'),
    ("omniglot", "test", dict(use_all_classes=True), "incompatible with \"num_ways\""),
    ("omniglot", "train", dict(min_examples_in_class=1), "incompatible with \"min_examples_in_class\""),
    ("omniglot", "valid", dict(min_ways=15), "Superclass: 25 has num_classes=14 < min_ways=15"),
    ("dtd", "test", dict(min_ways=8), '"min_ways" is set to 8'),
    ("ilsvrc_2012_v2", "valid", dict(), "only has 0 classes"),
    ("fungi", "train", dict(min_examples_in_class=10**6), "only has 0 classes"),
    ("fungi", "test", dict(use_all_classes=True, min_examples_in_class=20), "use_all_classes"),
    ("ilsvrc_2012", "train", dict(min_ways=393), "no classes eligible"),
    ("aircraft", "test", dict(num_ways=16), "num_ways=16 exceeds the 15 classes"),
])
def test_invalid_combinations_raise_like_md_at_construction(source, split, config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sampler(source, split, **config)


@pytest.mark.parametrize("config, message", [
    (dict(num_ways=5, num_support=100), "Expected at least 101 images per class"),
    (dict(num_ways=5, num_support=95, num_query=10), "Some classes do not have enough examples"),
    (dict(num_ways=5, num_support=(5, 95), num_query=10), "range provided for uniform sampling"),
    (dict(max_support_set_size=4), "max_support_set_size is too small"),
    (dict(num_query=100), "Some classes have no remaining examples"),
])
def test_impossible_shot_requests_raise_like_md_when_sampling(config, message):
    s = sampler("aircraft", "train", **config)  # every aircraft class has 100 images
    with pytest.raises(ValueError, match=message):
        s.sample()


def test_variable_shots_need_two_images_per_class():
    with pytest.raises(ValueError, match="at least 2 images per class"):
        compute_num_query(np.array([5, 1, 7]), 10, None)
    tiny = parse_md_spec({"__class__": "DatasetSpecification", "name": "tiny",
                          "classes_per_split": {"TRAIN": 5, "VALID": 0, "TEST": 0},
                          "images_per_class": {str(i): 1 for i in range(5)},
                          "class_names": {str(i): f"c{i}" for i in range(5)}}, "tiny")
    s = EpisodeDescriptionSampler(tiny, "train", EpisodeDescriptionConfig(), np.random.RandomState(0))
    with pytest.raises(ValueError, match="at least 2 images per class"):
        s.sample()


@pytest.mark.parametrize("config, error", [
    (dict(min_ways=None), RuntimeError),
    (dict(max_log_weight=None), RuntimeError),
    (dict(num_support=(5, 2)), ValueError),
    (dict(ignore_hierarchy_probability=1.5), ValueError),
])
def test_config_rejects_missing_or_invalid_parameters(config, error):
    with pytest.raises(error):
        EpisodeDescriptionConfig(**config)


def test_sampler_requires_a_legacy_random_state():
    with pytest.raises(TypeError):
        EpisodeDescriptionSampler(spec("dtd"), "train", EpisodeDescriptionConfig(),
                                  np.random.default_rng(0))


def test_sampler_seeds_are_successive_draws_of_the_master_seed():
    master = np.random.RandomState(42)
    expected = [master.randint(0, 2**32, dtype=np.uint32) for _ in range(3)]
    rngs = sampler_rngs(42, 3)
    for rng, seed in zip(rngs, expected):
        assert rng.randint(0, 10**9) == np.random.RandomState(seed).randint(0, 10**9)
    assert sampler_seed(42) == expected[0]


def test_same_seed_gives_same_descriptions_and_other_seed_differs():
    a = list(describe(spec("omniglot"), "test", 3, 20, ignore_hierarchy=False))
    b = list(describe(spec("omniglot"), "test", 3, 20, ignore_hierarchy=False))
    c = list(describe(spec("omniglot"), "test", 4, 20, ignore_hierarchy=False))
    assert a == b and a != c
    assert json.loads(json.dumps(a)) == a


@functools.lru_cache(maxsize=None)
def golden(seed: int) -> dict:
    return json.loads((GOLDEN / f"seed{seed}.json").read_text())


def golden_ids() -> list[str]:
    keys = sorted(set(golden(0)) | set(golden(1)))
    return [f"{key}/seed{seed}" for key in keys for seed in GOLDEN_SEEDS]


def test_golden_covers_every_dataset_split_with_five_classes_for_both_seeds():
    expected = {f"{path.name.removesuffix('_dataset_spec.json')}/{split.upper()}"
                for path in SPECS_DIR.glob("*_dataset_spec.json") if not path.name.startswith("lite_v2")
                for split, n in load_md_spec(path).classes_per_split.items() if n >= 5}
    assert set(golden(0)) == set(golden(1)) == expected
    assert all(len(v) == 60 for seed in GOLDEN_SEEDS for v in golden(seed).values())


@pytest.mark.parametrize("case", golden_ids())
def test_descriptions_equal_md_sampling_py_golden(case):
    name, split, seed = case.split("/")
    expected = golden(int(seed.removeprefix("seed")))[f"{name}/{split}"]
    got = list(describe(spec(name), split.lower(), int(seed.removeprefix("seed")), len(expected),
                        ignore_hierarchy=False))
    assert got == expected


def test_describe_cli_on_a_shipped_spec_prints_md_golden_descriptions():
    from typer.testing import CliRunner

    from lite_train.cli import app

    result = CliRunner().invoke(app, ["describe", "--dataset", "omniglot", "--split", "test", "--seed", "1",
                                      "--count", "5"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == golden(1)["omniglot/TEST"][:5]
    result = CliRunner().invoke(app, ["describe", "--dataset", "no_such_dataset"])
    assert result.exit_code == 1 and "no shipped dataset spec named 'no_such_dataset'" in result.output
