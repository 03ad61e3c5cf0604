"""VTAB label rules against hand-computed cases (boundaries included), without TensorFlow.

Expected labels come from the rules as `shared/reference/vtab_webdataset.md` §1.3 and
task_adaptation's `clevr.py` / `kitti.py` / `dsprites.py` state them, worked out by hand below each case.
"""

from __future__ import annotations

import numpy as np
import pytest

from convert.vtab.labels import derived_class_names
from convert.vtab.registry import vtab_label

F32_ABOVE_8 = float(np.nextafter(np.float32(8.0), np.float32(9.0)))  # the float32 right after 8.0


def _clevr_depths(*depths: float) -> dict:
    # pixel_coords rows are (x, y, depth); only the depth column matters
    return {"objects/pixel_coords": np.array([[10.0, 20.0, d] for d in depths], np.float32).reshape(-1, 3)}


def _kitti(*objects: tuple[int, float]) -> dict:
    types = np.array([t for t, _ in objects], np.int64)
    location = np.array([[1.0, 2.0, z] for _, z in objects], np.float32).reshape(-1, 3)
    return {"objects/type": types, "objects/location": location}


@pytest.mark.parametrize("count, label", [(3, 0), (4, 1), (10, 7)])
def test_clevr_count_is_objects_minus_three(count, label):
    assert vtab_label("clevr_count_all", {"objects/size": np.zeros(count, np.int64)}) == label


@pytest.mark.parametrize("count", [0, 2, 11])
def test_clevr_count_outside_3_to_10_objects_is_refused(count):
    with pytest.raises(ValueError, match=f"clevr_count_all.*{float(count)}"):
        vtab_label("clevr_count_all", {"objects/size": np.zeros(count, np.int64)})


# thresholds 0, 8, 8.5, 9, 9.5, 10, 100: label = largest i with t[i] < d (strict)
@pytest.mark.parametrize("depth, label", [
    (0.001, 0), (7.9, 0), (8.0, 0),  # exactly on 8 -> lower bin (8 < 8 is false)
    (F32_ABOVE_8, 1), (8.5, 1), (8.6, 2), (9.0, 2), (9.25, 3), (9.5, 3), (10.0, 4), (10.001, 5), (100.0, 5),
])
def test_clevr_closest_object_distance_bins(depth, label):
    assert vtab_label("clevr_closest_object_distance", _clevr_depths(depth)) == label


def test_distances_compare_in_float32_even_for_float64_input():
    # 8 + 1e-9 rounds to 8.0 in float32 -> lower bin, although 8 < 8 + 1e-9 in float64
    coords = np.array([[1.0, 2.0, 8.0 + 1e-9]], np.float64)
    assert vtab_label("clevr_closest_object_distance", {"objects/pixel_coords": coords}) == 0
    kitti = {"objects/type": np.array([0]), "objects/location": np.array([[0.0, 0.0, 20.0 + 1e-9]], np.float64)}
    assert vtab_label("kitti_closest_vehicle_distance", kitti) == 1


def test_clevr_distance_takes_the_closest_object():
    # depths 12 (bin 5), 8.7 (bin 2), 9.9 (bin 4): min 8.7 -> 2
    assert vtab_label("clevr_closest_object_distance", _clevr_depths(12.0, 8.7, 9.9)) == 2


@pytest.mark.parametrize("depths, shown", [((0.0,), "0.0"), ((-1.0,), "-1.0"), ((100.5,), "100.5"), ((), "inf")])
def test_clevr_distance_without_a_bin_is_refused(depths, shown):
    # d <= 0: no threshold below it; d > 100 or no objects (min = +inf): label 6 of 6 classes
    with pytest.raises(ValueError, match=f"clevr_closest_object_distance: raw value {shown}"):
        vtab_label("clevr_closest_object_distance", _clevr_depths(*depths))


# thresholds -100, 8, 20, 999; vehicles = types 0, 1, 2 (Car, Van, Truck); sentinel 1000 -> bin 3
@pytest.mark.parametrize("objects, label", [
    (((0, 5.0),), 0), (((1, 8.0),), 0), (((2, F32_ABOVE_8),), 1), (((0, 20.0),), 1), (((0, 20.5),), 2),
    (((0, 999.0),), 2), (((0, 999.5),), 3),
    (((3, 5.0), (0, 30.0)), 2),  # a pedestrian (type 3) at 5 m does not count: closest vehicle 30 m
    (((3, 5.0), (5, 2.0), (7, 1.0)), 3),  # pedestrian, cyclist, misc only: no vehicle -> sentinel 1000
    ((), 3),  # no objects at all: sentinel
    (((0, 1500.0),), 3),  # min(1500, 1000) = 1000
    (((0, -99.0),), 0),
])
def test_kitti_closest_vehicle_distance_bins(objects, label):
    assert vtab_label("kitti_closest_vehicle_distance", _kitti(*objects)) == label


def test_kitti_vehicle_at_or_below_minus_100_is_refused():
    with pytest.raises(ValueError, match="kitti_closest_vehicle_distance: raw value -100.0 gives no bin"):
        vtab_label("kitti_closest_vehicle_distance", _kitti((0, -100.0)))


# x position: 32 values / 16 classes = pairs
@pytest.mark.parametrize("value, label", [(0, 0), (1, 0), (2, 1), (17, 8), (30, 15), (31, 15)])
def test_dsprites_x_position_pairs(value, label):
    assert vtab_label("dsprites_label_x_position", {"label_x_position": np.int64(value)}) == label


# orientation: 40 values / 16 = 2.5 -> floor(v / 2.5): groups of 3, 2, 3, 2, ...
@pytest.mark.parametrize("value, label", [
    (0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (7, 2), (8, 3), (9, 3), (10, 4), (12, 4), (13, 5),
    (35, 14), (37, 14), (38, 15), (39, 15),
])
def test_dsprites_orientation_unequal_bins(value, label):
    assert vtab_label("dsprites_label_orientation", {"label_orientation": np.int64(value)}) == label


@pytest.mark.parametrize("task, feature, value", [
    ("dsprites_label_x_position", "label_x_position", 32), ("dsprites_label_orientation", "label_orientation", 40),
    ("dsprites_label_orientation", "label_orientation", -1),
])
def test_dsprites_value_outside_the_factor_range_is_refused(task, feature, value):
    with pytest.raises(ValueError, match=f"{task}: raw value {float(value)}"):
        vtab_label(task, {feature: np.int64(value)})


@pytest.mark.parametrize("task, feature, top", [
    ("smallnorb_label_azimuth", "label_azimuth", 17), ("smallnorb_label_elevation", "label_elevation", 8),
    ("dmlab", "label", 5), ("diabetic_retinopathy", "label", 4), ("caltech101", "label", 101),
    ("sun397", "label", 396), ("patch_camelyon", "label", 1),
])
def test_raw_labels_pass_through_up_to_the_last_class(task, feature, top):
    assert vtab_label(task, {feature: np.int64(top)}) == top
    assert vtab_label(task, {feature: np.int64(0)}) == 0
    with pytest.raises(ValueError, match=f"{task}: raw value {float(top + 1)}"):
        vtab_label(task, {feature: np.int64(top + 1)})


def test_retinopathy_unlabelled_sample_is_refused():
    # the TFDS `sample` split carries label -1
    with pytest.raises(ValueError, match="diabetic_retinopathy: raw value -1.0"):
        vtab_label("diabetic_retinopathy", {"label": np.int64(-1)})


def test_missing_feature_and_unknown_task():
    with pytest.raises(ValueError, match="kitti_closest_vehicle_distance.*objects/location"):
        vtab_label("kitti_closest_vehicle_distance", {"objects/type": np.zeros(1, np.int64)})
    with pytest.raises(KeyError, match="unknown VTAB task"):
        vtab_label("clevr", {"label": 0})


def test_derived_class_names():
    orientation = derived_class_names("dsprites_label_orientation")
    assert len(orientation) == 16
    assert orientation[:3] == ("orientation 0-2", "orientation 3-4", "orientation 5-7")
    assert orientation[-1] == "orientation 38-39"
    assert derived_class_names("dsprites_label_x_position")[15] == "x position 30-31"
    assert derived_class_names("kitti_closest_vehicle_distance") == (
        "(-100, 8] m", "(8, 20] m", "(20, 999] m", "no vehicle")
    assert derived_class_names("clevr_closest_object_distance")[0] == "(0, 8]"
    assert len(derived_class_names("clevr_closest_object_distance")) == 6
    assert derived_class_names("clevr_count_all")[-1] == "10 objects"
    assert derived_class_names("label") is None
