"""The registry contract: every entry against the reference table and against its pinned TFDS builder.

Reference values are copied from `shared/reference/vtab_webdataset.md` §1.2 (slices, VTAB test sizes,
class counts) and `shared/reference/lite.md` §5 (LITE's query splits); builders come from the installed,
pinned TFDS (code only: no data, no network).
"""

from __future__ import annotations

import pytest

from convert.vtab.convert import _tfds
from convert.vtab.labels import DSPRITES_VALUES, LABEL_RULES
from convert.vtab.registry import TASKS, VTAB1K_QUERY_SIZES, Slice
from manifests.sources import VTAB_GROUPS, VTAB_TASKS

from tests.convert.vtab.conftest import SPLIT_SIZES

# task id -> (TFDS spec, val200 slice, test slice, test size, classes)   [vtab_webdataset.md §1.2]
REFERENCE = {
    "caltech101": ("caltech101:3.0.2", "train[2754:2954]", "test", 6084, 102),
    "cifar100": ("cifar100:3.0.2", "train[45000:45200]", "test", 10000, 100),
    "dtd": ("dtd:3.0.1", "validation[:200]", "test", 1880, 47),
    "oxford_flowers102": ("oxford_flowers102:2.1.1", "validation[:200]", "test", 6149, 102),
    "oxford_iiit_pet": ("oxford_iiit_pet:3.2.0", "train[2944:3144]", "test", 3669, 37),
    "sun397": ("sun397/tfds:4.0.0", "validation[:200]", "test", 21750, 397),
    "svhn": ("svhn_cropped:3.0.0", "train[65931:66131]", "test", 26032, 10),  # 3.*.* -> 3.0.0 in TFDS 4.9.6
    "patch_camelyon": ("patch_camelyon:2.0.0", "validation[:200]", "test", 32768, 2),
    "eurosat": ("eurosat/rgb:2.0.0", "train[16200:16400]", "train[21600:]", 5400, 10),
    "resisc45": ("resisc45:3.0.0", "train[18900:19100]", "train[25200:]", 6300, 45),
    "diabetic_retinopathy": ("diabetic_retinopathy_detection/btgraham-300:3.0.0", "validation[:200]", "test",
                             42670, 5),
    "clevr_count_all": ("clevr:3.1.0", "train[63000:63200]", "validation", 15000, 8),
    "clevr_closest_object_distance": ("clevr:3.1.0", "train[63000:63200]", "validation", 15000, 6),
    "dmlab": ("dmlab:2.0.1", "validation[:200]", "test", 22735, 6),
    "kitti_closest_vehicle_distance": ("kitti:3.1.0", "validation[:200]", "test", 711, 4),
    "dsprites_label_x_position": ("dsprites:2.0.0", "train[589824:590024]", "train[663552:]", 73728, 16),
    "dsprites_label_orientation": ("dsprites:2.0.0", "train[589824:590024]", "train[663552:]", 73728, 16),
    "smallnorb_label_azimuth": ("smallnorb:2.0.0", "test[:200]", "test[12150:]", 12150, 18),
    "smallnorb_label_elevation": ("smallnorb:2.0.0", "test[:200]", "test[12150:]", 12150, 9),
}
# LITE's query split (lite.md §5): test, clevr validation, remainder of train where there is no test split.
LITE_QUERY = {"eurosat": "train[1000:]", "resisc45": "train[1000:]", "dsprites_label_x_position": "train[1000:]",
              "dsprites_label_orientation": "train[1000:]", "clevr_count_all": "validation",
              "clevr_closest_object_distance": "validation"}


def _spec(s: Slice) -> str:
    """The slice in the reference's spelling (`validation[:200]`, `test`)."""
    if s.start == 0 and s.stop is None:
        return s.split
    return f"{s.split}[{s.start or ''}:{'' if s.stop is None else s.stop}]"


def _length(s: Slice, sizes: dict[str, int]) -> int:
    return (sizes[s.split] if s.stop is None else s.stop) - s.start


def test_registry_holds_exactly_the_19_reference_tasks():
    assert list(TASKS) == list(REFERENCE)


def test_registry_groups_are_the_shared_source_registrys():
    # manifests.sources (read by lite_train's evaluation too) lists the same tasks in the same order, and
    # each task's group is the group that lists it: natural 7, specialized 4, structured 8 tasks.
    assert VTAB_GROUPS == ("natural", "specialized", "structured")
    assert [len(VTAB_TASKS[g]) for g in VTAB_GROUPS] == [7, 4, 8]
    assert [t for g in VTAB_GROUPS for t in VTAB_TASKS[g]] == list(TASKS)
    assert {t: TASKS[t].group for t in TASKS} == {t: g for g in VTAB_GROUPS for t in VTAB_TASKS[g]}


@pytest.mark.parametrize("task_id", list(TASKS))
def test_registry_entry(task_id, tmp_path):
    task = TASKS[task_id]
    spec, val200, test, test_size, classes = REFERENCE[task_id]
    assert task.tfds_spec == spec and task.num_classes == classes
    # vtab1k: support = train[:800] + val200, query = VTAB's test slice of the reference's size
    assert [_spec(s) for s in task.support] == ["train[:800]", val200] and _spec(task.query) == test
    sizes = SPLIT_SIZES[task.tfds_name]
    assert [_length(s, sizes) for s in task.support] == [800, 200]
    assert _length(task.query, sizes) == test_size == VTAB1K_QUERY_SIZES[task_id]
    for s in task.support:  # disjoint from the query slice
        if s.split == task.query.split:
            assert s.stop <= task.query.start or (task.query.stop or sizes[s.split]) <= s.start
    # lite: first 1000 of TFDS train, LITE's query split
    assert [_spec(s) for s in task.lite_support] == ["train[:1000]"]
    assert _spec(task.lite_query) == LITE_QUERY.get(task_id, "test")
    # the pinned builder exists in the installed TFDS, resolves to that version and has the rule's features
    tfds = _tfds()
    builder = tfds.builder(spec, data_dir=str(tmp_path))
    assert str(builder.version) == task.tfds_version
    features = builder.info.features
    rule = LABEL_RULES[task.label_rule]
    for path in rule.features:
        head, _, rest = path.partition("/")
        assert head in features and (not rest or rest in features[head].feature), path
    if task.label_rule == "label" or task.label_rule.startswith("smallnorb_"):
        assert features[rule.features[0]].num_classes == classes
    if task.label_rule.startswith("dsprites_"):
        name = rule.features[0]
        assert features[name].num_classes == DSPRITES_VALUES[name]
    assert set(SPLIT_SIZES[task.tfds_name]) >= {s.split for s in task.support + (task.query,)}
