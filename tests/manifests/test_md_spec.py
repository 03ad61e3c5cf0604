"""Tests for manifests.md_spec on every real Meta-Dataset spec and on malformed specs."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest

from manifests.md_spec import SPLITS, MDSpec, load_md_spec, md_v2_view, parse_md_spec

from manifests.md_spec import SHIPPED_SPECS_DIR as SPECS_DIR  # MD's specs, shipped in manifests/md_specs/
SPEC_FILES = sorted(SPECS_DIR.glob("*_dataset_spec.json"))

# (name in file, kind, classes train/valid/test, total images) -- from MD's shipped specs (§2).
EXPECTED = {
    "aircraft_dataset_spec.json": ("flat", (70, 15, 15), 10000),
    "cu_birds_dataset_spec.json": ("flat", (140, 30, 30), 11788),
    "dtd_dataset_spec.json": ("flat", (33, 7, 7), 5640),
    "fungi_dataset_spec.json": ("flat", (994, 200, 200), 89760),
    "ilsvrc_2012_dataset_spec.json": ("hierarchical", (712, 158, 130), 1280764),
    "ilsvrc_2012_v2_dataset_spec.json": ("hierarchical", (1000, 0, 0), 1280764),
    "lite_v2_ilsvrc_2012_dataset_spec.json": ("flat", (1000, 0, 0), 1280764),
    "lite_v2_mnist_dataset_spec.json": ("flat", (10, 0, 0), 10000),
    "mscoco_dataset_spec.json": ("flat", (0, 40, 40), 860001),
    "omniglot_dataset_spec.json": ("bilevel", (883, 81, 659), 32460),
    "quickdraw_dataset_spec.json": ("flat", (241, 52, 52), 50426266),
    "traffic_sign_dataset_spec.json": ("flat", (0, 0, 43), 39209),
    "vgg_flower_dataset_spec.json": ("flat", (71, 15, 16), 8189),
}


def _raw(name: str) -> dict:
    return json.loads((SPECS_DIR / name).read_text())


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_every_real_spec_parses_with_known_counts(path):
    spec = load_md_spec(path)
    kind, per_split, total = EXPECTED[path.name]
    assert spec.kind == kind
    assert tuple(spec.classes_per_split[s] for s in SPLITS) == per_split
    assert spec.num_classes == sum(per_split) == len(spec.class_names)
    assert sum(spec.images_per_class) == total
    assert all(isinstance(c, int) and c >= 0 for c in spec.images_per_class)


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_split_ranges_partition_the_class_ids(path):
    spec = load_md_spec(path)
    ids = [c for s in SPLITS for c in spec.split_class_ids(s)]
    assert ids == list(range(spec.num_classes))
    for s in SPLITS:
        for c in spec.split_class_ids(s)[:3]:
            assert spec.class_split(c) == s


def test_omniglot_superclasses_are_contiguous_per_split():
    spec = load_md_spec(SPECS_DIR / "omniglot_dataset_spec.json")
    assert spec.superclasses_per_split == {"train": 25, "valid": 5, "test": 20}
    assert list(spec.split_superclass_ids("valid")) == [25, 26, 27, 28, 29]
    for split in SPLITS:
        scs = {spec.superclass_of(c) for c in spec.split_class_ids(split)}
        assert scs == set(spec.split_superclass_ids(split))
    # Class names carry their alphabet: "<alphabet>-characterNN".
    for c in range(spec.num_classes):
        assert spec.class_names[c].startswith(spec.superclass_names[spec.superclass_of(c)] + "-")


def test_imagenet_v1_leaves_sorted_by_wnid_are_the_split_id_blocks():
    spec = load_md_spec(SPECS_DIR / "ilsvrc_2012_dataset_spec.json")
    for split, md_split in zip(SPLITS, ("TRAIN", "VALID", "TEST")):
        nodes = spec.raw["split_subgraphs"][md_split]
        leaves = sorted(n["wn_id"] for n in nodes if not n["children_ids"])
        assert [spec.class_names[c] for c in spec.split_class_ids(split)] == leaves
    assert spec.superclass_of(0) is None


def test_md_v2_view_of_imagenet_equals_lite_spec_except_path():
    view = md_v2_view(load_md_spec(SPECS_DIR / "ilsvrc_2012_dataset_spec.json"))
    lite = _raw("lite_v2_ilsvrc_2012_dataset_spec.json")
    view.pop("path")
    lite.pop("path")
    assert view == lite
    assert parse_md_spec(view, "view").classes_per_split == {"train": 1000, "valid": 0, "test": 0}


def test_md_v2_view_of_mnist_moves_all_classes_to_train():
    lite = _raw("lite_v2_mnist_dataset_spec.json")
    cnaps = copy.deepcopy(lite)  # CNAPs' converter puts all MNIST classes in TEST
    cnaps["classes_per_split"] = {"TRAIN": 0, "VALID": 0, "TEST": 10}
    view = md_v2_view(parse_md_spec(cnaps, "cnaps-mnist"))
    assert view == lite


@pytest.mark.parametrize("name", ["omniglot", "aircraft", "ilsvrc_2012_v2", "mscoco", "quickdraw"])
def test_md_v2_view_is_none_for_unchanged_sources(name):
    assert md_v2_view(load_md_spec(SPECS_DIR / f"{name}_dataset_spec.json")) is None


def test_spec_is_frozen():
    spec = load_md_spec(SPECS_DIR / "dtd_dataset_spec.json")
    assert isinstance(spec, MDSpec)
    with pytest.raises(AttributeError):
        spec.name = "x"


def _mutations():
    """(base file, mutate(raw), expected message fragment)."""

    def setter(*keys, value):
        def mutate(raw):
            d = raw
            for k in keys[:-1]:
                d = d[k]
            d[keys[-1]] = value
        return mutate

    def deleter(*keys):
        def mutate(raw):
            d = raw
            for k in keys[:-1]:
                d = d[k]
            del d[keys[-1]]
        return mutate

    def first_train_node(raw):
        return raw["split_subgraphs"]["TRAIN"]

    def break_link(raw):
        first_train_node(raw)[0]["children_ids"].append("n99999999")

    def swap_names(raw):
        raw["class_names"]["0"], raw["class_names"]["1"] = raw["class_names"]["1"], raw["class_names"]["0"]

    def drop_node_count(raw):
        del raw["images_per_class"]["VALID"][next(iter(raw["images_per_class"]["VALID"]))]

    return [
        ("dtd", setter("__class__", value="Nope"), "__class__"),
        ("dtd", deleter("name"), "name"),
        ("dtd", deleter("class_names"), "missing key"),
        ("dtd", setter("classes_per_split", "TRAIN", value=34), "images_per_class must have ids 0..47"),
        ("dtd", setter("classes_per_split", "TRAIN", value=-1), "non-negative"),
        ("dtd", setter("classes_per_split", value={"TRAIN": 33, "VALID": 7}), "exactly the keys"),
        ("dtd", setter("images_per_class", "3", value=-5), "images_per_class[3]"),
        ("dtd", setter("images_per_class", "3", value=2.5), "images_per_class[3]"),
        ("dtd", setter("images_per_class", "3", value=True), "images_per_class[3]"),
        ("dtd", setter("images_per_class", "3", value={"train": 1}), "images_per_class[3]"),
        ("dtd", deleter("images_per_class", "46"), "ids 0..46"),
        ("dtd", setter("images_per_class", "x", value=1), "non-integer key"),
        ("dtd", setter("class_names", "0", value=7), "class_names[0]"),
        ("omniglot", setter("classes_per_superclass", "0", value=30), "sum of classes_per_superclass"),
        ("omniglot", deleter("superclass_names", "49"), "superclass_names"),
        ("omniglot", setter("superclasses_per_split", "TEST", value=19), "classes_per_superclass"),
        ("ilsvrc_2012", break_link, "symmetric link"),
        ("ilsvrc_2012", swap_names, "leaves in wn_id order"),
        ("ilsvrc_2012", drop_node_count, "images_per_class[VALID]"),
        ("ilsvrc_2012", setter("split_subgraphs", value={"TRAIN": []}), "split_subgraphs"),
    ]


@pytest.mark.parametrize("base, mutate, fragment", _mutations(),
                         ids=[f"{m[0]}-{m[2][:24]}" for m in _mutations()])
def test_malformed_spec_raises_one_line_error_naming_origin(base, mutate, fragment):
    raw = _raw(f"{base}_dataset_spec.json")
    mutate(raw)
    with pytest.raises(ValueError) as info:
        parse_md_spec(raw, "bad.json")
    message = str(info.value)
    assert message.startswith("bad.json: ") and "\n" not in message
    assert fragment in message


def test_non_object_json_is_rejected():
    with pytest.raises(ValueError, match="^x: a dataset spec must be a JSON object"):
        parse_md_spec([1, 2], "x")


def test_unreadable_or_bad_json_file_names_the_file(tmp_path):
    bad = tmp_path / "dataset_spec.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        load_md_spec(bad)
    with pytest.raises(ValueError, match="missing.json"):
        load_md_spec(tmp_path / "missing.json")


def test_unknown_split_name_is_rejected():
    spec = load_md_spec(SPECS_DIR / "dtd_dataset_spec.json")
    with pytest.raises(ValueError, match="split must be one of"):
        spec.split_offset("TRAIN")


def test_the_real_specs_are_present():
    # Guards every parametrised test above against silently running over an empty list.
    assert len(SPEC_FILES) >= 13, f"expected MD's shipped specs under {SPECS_DIR}"
