"""VTAB-1k label rules as pure NumPy: a rule id and a dict of flat TFDS feature values in, a label out.

Each rule restates the `base_preprocess_fn` of google-research/task_adaptation @ d7630d3
(`task_adaptation/data/{clevr,kitti,dsprites,smallnorb,dmlab,diabetic_retinopathy,...}.py`), with the
same float32 arithmetic:

- binned rules compute `label = max{i : t[i] - d < 0}` with `t` and `d` in float32 (TF converts the
  float64 NumPy threshold array to the float32 dtype of `d`), so a value exactly on a threshold falls in
  the lower bin;
- dsprites computes `floor(float32(value) / float32(n_values / 16))`, which gives orientation's unequal
  bins (40 values -> groups of 3, 2, 3, 2, ...).

Where VTAB's TF code would produce a label outside `[0, num_classes)` (a scene without objects, a depth
below every threshold, ...) `derive_label` raises ValueError naming the task and the value instead of
returning it. Each rule keeps the raw value it reads apart from the label it gives, so `rederive_labels`
(run by `lite-convert verify`) re-derives every label of a converted task from its stored raw values.
TensorFlow is never imported here; `convert/vtab/registry.py` says which rule each task uses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

Features = Mapping[str, Any]  # flat TFDS feature path ("objects/pixel_coords", "label", ...) -> numpy value

# CLEVR closest_object_distance: bins of the smallest object depth `pixel_coords[:, 2]` [TA clevr.py].
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
# KITTI closest_vehicle_distance: bins of the smallest vehicle z (metres) [TA kitti.py].
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_NO_VEHICLE = 1000.0  # sentinel appended to the vehicle depths: "no vehicle" -> last bin
KITTI_VEHICLE_TYPES = 3  # TFDS kitti object types 0, 1, 2 = Car, Van, Truck
CLEVR_MIN_OBJECTS = 3  # count_all label = number of objects - 3
DSPRITES_NUM_CLASSES = 16  # VTAB groups dsprites' factor values into 16 classes
DSPRITES_VALUES = {"label_x_position": 32, "label_orientation": 40}  # TFDS ClassLabel sizes


@dataclasses.dataclass(frozen=True)
class Derived:
    """A label and the raw value it was derived from (stored per sample, so any label can be re-derived)."""

    label: int | None  # None: VTAB's rule selects no bin at all (TF would return int64's minimum)
    raw: float  # the object count, the min depth, the factor value or the TFDS label


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """One VTAB label rule, split in two: the raw value it reads from the TFDS features, and the label of
    that raw value. The raw value is stored per sample, so `label_of(raw)` re-derives every label."""

    rule_id: str
    features: tuple[str, ...]  # flat TFDS feature paths the rule reads
    raw: Callable[[Features], float]  # features -> the object count, min depth, factor value or TFDS label
    label_of: Callable[[float], int | None]  # raw value -> label (None: no bin at all)
    describe: str  # the rule in words, for source.json and error messages

    def derive(self, features: Features) -> Derived:
        raw = self.raw(features)
        return Derived(self.label_of(raw), raw)


def _binned(thresholds: tuple[float, ...]) -> Callable[[float], int | None]:
    """`max{i : float32(t[i]) - float32(d) < 0}` as TF computes it; None when no threshold lies below d."""
    t = np.asarray(thresholds, dtype=np.float32)

    def label_of(value: float) -> int | None:
        with np.errstate(invalid="ignore"):
            below = np.flatnonzero((t - np.float32(value)) < 0)
        return int(below[-1]) if below.size else None

    return label_of


def _column(features: Features, name: str, ndim: int) -> np.ndarray:
    if name not in features:
        raise KeyError(f"feature {name!r} is missing")
    value = np.asarray(features[name])
    if value.ndim != ndim:
        raise ValueError(f"feature {name!r} has shape {value.shape}, expected {ndim} dimensions")
    return value


def _scalar(name: str) -> Callable[[Features], float]:
    def raw(features: Features) -> float:
        return float(int(_column(features, name, 0)))

    return raw


def _identity(value: float) -> int:
    return int(value)


def _clevr_count(features: Features) -> float:
    return float(_column(features, "objects/size", 1).shape[0])  # tf.size(objects/size)


def _clevr_min_depth(features: Features) -> float:
    coords = _column(features, "objects/pixel_coords", 2).astype(np.float32)  # (objects, 3): x, y, depth
    if coords.shape[1] != 3:
        raise ValueError(f"feature 'objects/pixel_coords' has shape {coords.shape}, expected (objects, 3)")
    # tf.reduce_min over no objects is +inf, which lands past the last threshold (an invalid label).
    return float(coords[:, 2].min()) if coords.shape[0] else float("inf")


def _kitti_min_vehicle_z(features: Features) -> float:
    types = _column(features, "objects/type", 1)
    location = _column(features, "objects/location", 2).astype(np.float32)  # (objects, 3): x, y, z metres
    if location.shape != (types.shape[0], 3):
        raise ValueError(f"'objects/location' has shape {location.shape}, expected ({types.shape[0]}, 3) "
                         f"to match 'objects/type'")
    z = location[types < KITTI_VEHICLE_TYPES, 2]
    return float(np.concatenate([z, np.float32([KITTI_NO_VEHICLE])]).min())


def _dsprites_bin(name: str) -> Callable[[float], int]:
    factor = np.float32(float(DSPRITES_VALUES[name]) / DSPRITES_NUM_CLASSES)  # 2.0 and 2.5: exact in float32

    def label_of(value: float) -> int:
        # tf.math.floordiv(tf.cast(value, tf.float32), factor), then cast to the feature's int64
        return int(np.floor(np.float32(value) / factor))

    return label_of


LABEL_RULES: dict[str, LabelRule] = {
    r.rule_id: r
    for r in (
        LabelRule("label", ("label",), _scalar("label"), _identity, "TFDS label as is"),
        LabelRule("clevr_count_all", ("objects/size",), _clevr_count, lambda n: int(n) - CLEVR_MIN_OBJECTS,
                  "number of objects - 3"),
        LabelRule("clevr_closest_object_distance", ("objects/pixel_coords",), _clevr_min_depth,
                  _binned(CLEVR_DISTANCE_THRESHOLDS),
                  f"max i with t[i] < min depth (float32), t = {list(CLEVR_DISTANCE_THRESHOLDS)}"),
        LabelRule("kitti_closest_vehicle_distance", ("objects/type", "objects/location"), _kitti_min_vehicle_z,
                  _binned(KITTI_DISTANCE_THRESHOLDS),
                  f"max i with t[i] < min(z of Car/Van/Truck, {KITTI_NO_VEHICLE}) (float32), "
                  f"t = {list(KITTI_DISTANCE_THRESHOLDS)}"),
        LabelRule("dsprites_label_x_position", ("label_x_position",), _scalar("label_x_position"),
                  _dsprites_bin("label_x_position"), "floor(float32(label_x_position) / 2.0)"),
        LabelRule("dsprites_label_orientation", ("label_orientation",), _scalar("label_orientation"),
                  _dsprites_bin("label_orientation"), "floor(float32(label_orientation) / 2.5)"),
        LabelRule("smallnorb_label_azimuth", ("label_azimuth",), _scalar("label_azimuth"), _identity,
                  "label_azimuth as is"),
        LabelRule("smallnorb_label_elevation", ("label_elevation",), _scalar("label_elevation"), _identity,
                  "label_elevation as is"),
    )
}


def derive_label(task_id: str, rule_id: str, num_classes: int, features: Features) -> Derived:
    """Apply `rule_id` to `features`; raise ValueError unless the label lies in `[0, num_classes)`."""
    rule = LABEL_RULES[rule_id]
    try:
        derived = rule.derive(features)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{task_id}: cannot derive the label ({rule.describe}): {e}") from None
    if derived.label is None or not 0 <= derived.label < num_classes:
        got = "no bin" if derived.label is None else f"label {derived.label}"
        raise ValueError(f"{task_id}: raw value {derived.raw!r} gives {got}, outside [0, {num_classes}) "
                         f"({rule.describe})")
    return derived


def _range_names(values_per_label: dict[int, list[int]], what: str) -> tuple[str, ...]:
    names = []
    for label in sorted(values_per_label):
        v = values_per_label[label]
        names.append(f"{what} {v[0]}" if len(v) == 1 else f"{what} {v[0]}-{v[-1]}")
    return tuple(names)


def _interval_names(thresholds: tuple[float, ...], unit: str) -> tuple[str, ...]:
    return tuple(f"({lo:g}, {hi:g}]{unit}" for lo, hi in zip(thresholds[:-1], thresholds[1:]))


def derived_class_names(rule_id: str) -> tuple[str, ...] | None:
    """Class names of a derived task (index = label); None for rules that keep the TFDS label names.

    Bin names are the value intervals of the rule; dsprites names list the factor values of each class,
    computed through the rule itself so they cannot drift from it.
    """
    if rule_id == "clevr_count_all":
        return tuple(f"{n} objects" for n in range(CLEVR_MIN_OBJECTS, CLEVR_MIN_OBJECTS + 8))
    if rule_id == "clevr_closest_object_distance":
        return _interval_names(CLEVR_DISTANCE_THRESHOLDS, "")
    if rule_id == "kitti_closest_vehicle_distance":
        # the last bin (depth > 999 m) is in practice the 1000 m "no vehicle" sentinel
        return _interval_names(KITTI_DISTANCE_THRESHOLDS, " m") + ("no vehicle",)
    if rule_id.startswith("dsprites_"):
        name = rule_id.removeprefix("dsprites_")
        groups: dict[int, list[int]] = {}
        for v in range(DSPRITES_VALUES[name]):
            groups.setdefault(LABEL_RULES[rule_id].label_of(float(v)), []).append(v)
        return _range_names(groups, name.removeprefix("label_").replace("_", " "))
    if rule_id == "smallnorb_label_azimuth":
        return tuple(f"azimuth {20 * i} deg" for i in range(18))  # smallNORB: 0, 20, ..., 340 degrees
    if rule_id == "smallnorb_label_elevation":
        return tuple(f"elevation {30 + 5 * i} deg" for i in range(9))  # 30, 35, ..., 70 degrees
    return None


def rederive_labels(path: str | Path) -> int | None:
    """Re-derive every label of a TFDS-read source from its stored raw value with the rule named in
    source.json (`tfds.label_rule`); the number of labels checked, or None for a source not read from TFDS.

    Raises:
        ValueError: the first sample whose stored label differs, naming its key and raw value.
    """
    from manifests import schema  # here: converting never reads a source back
    from manifests.provenance import read_provenance
    from manifests.reader import SourceReader

    with SourceReader(path) as reader:
        origin = reader.info.tfds
        if origin is None:
            return None
        if origin.label_rule not in LABEL_RULES:
            raise ValueError(f"{path}: unknown label rule {origin.label_rule!r} in {schema.SOURCE_FILE}")
        rule = LABEL_RULES[origin.label_rule]
        samples = reader.samples()
        labels, keys = samples["class_id"].to_numpy(), samples["key"].to_pylist()
        raw = read_provenance(reader)["raw_value"].to_numpy()
    for row, (label, value) in enumerate(zip(labels, raw)):
        derived = rule.label_of(float(value))
        if derived != label:
            raise ValueError(f"{path}: sample {keys[row]} (row {row}) has label {label}, but rule "
                             f"{rule.rule_id} gives {derived} for its raw value {value!r}")
    return len(labels)
