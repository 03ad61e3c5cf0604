"""The 19 VTAB-1k tasks: task id in, TFDS builder, pinned version, split slices, label rule and manual files out.

One entry per task id of `../shared/reference/vtab_webdataset.md` §1.2, filled explicitly (no decorators); the
task ids and their groups are `manifests.sources.VTAB_TASKS`, which the runtime reads too.
Slices are TFDS split strings, always absolute (no percentages), so the TFDS canonical index of every
example is `slice start + position`:

- protocol `vtab1k` (VTAB+MD's, the default): support = VTAB's `train800val200` = the first 800 of VTAB's
  train slice followed by the first 200 of its val slice; query = VTAB's test slice [TA `*.py`, MD
  `read_vtab_as_episode`];
- protocol `lite`: the reference LITE reader's choice (`../shared/reference/lite.md` §5): support = TFDS
  `train[:1000]`, query = TFDS `test` (clevr: `validation`; no test split: `train[1000:]`).

Versions are what VTAB's version specs resolve to under the pinned TFDS 4.9.6 (`constraints.txt`):
`svhn_cropped:3.*.*` -> 3.0.0 there, `oxford_iiit_pet:3.*.*` -> 3.2.0 (gone from TFDS 4.9.7 on);
docs/fidelity.md lists both. Pure data and `vtab_label` (a task's rule applied): importing this module imports
no TensorFlow.
"""

from __future__ import annotations

import dataclasses

from manifests.sources import VTAB_TASKS

from convert.vtab.labels import Features, derive_label

PROTOCOLS = ("vtab1k", "lite")
# Output group (folder under --out) of each protocol; the task id is the source name inside it.
PROTOCOL_GROUP = {"vtab1k": "vtab", "lite": "vtab_lite"}
SUPPORT_SIZE = 1000  # 800 + 200 (vtab1k) or the first 1000 of TFDS train (lite)


@dataclasses.dataclass(frozen=True)
class Slice:
    """One contiguous TFDS split slice `split[start:stop]` (stop None = to the end of the split)."""

    split: str  # TFDS split name: "train", "validation" or "test"
    start: int
    stop: int | None

    @property
    def spec(self) -> str:
        """The TFDS split string, e.g. `train[2754:2954]`; `test` for a whole split."""
        if self.start == 0 and self.stop is None:
            return self.split
        return f"{self.split}[{self.start}:{'' if self.stop is None else self.stop}]"


@dataclasses.dataclass(frozen=True)
class ManualFile:
    """A file or folder that must sit in --manual-dir (the name TFDS's download manager looks for)."""

    name: str  # path relative to the manual dir; a trailing "/" marks a folder
    what: str  # where it comes from


@dataclasses.dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task."""

    task_id: str  # the "task id" column of vtab_webdataset.md §1.2; the source name of the converted task
    group: str  # one of manifests.sources.VTAB_GROUPS
    tfds_name: str  # TFDS builder name
    tfds_config: str | None  # builder config (None: the builder has none)
    tfds_version: str  # pinned, the version VTAB's spec resolves to under TFDS 4.9.6
    num_classes: int
    label_rule: str  # key of convert.vtab.labels.LABEL_RULES
    support: tuple[Slice, ...]  # protocol vtab1k: (train800, val200)
    query: Slice  # protocol vtab1k: VTAB's test slice
    lite_support: tuple[Slice, ...]  # protocol lite: (TFDS train[:1000],)
    lite_query: Slice  # protocol lite
    manual: tuple[ManualFile, ...] = ()  # files --manual-dir must hold to prepare the builder offline
    in_vtab_v2: bool = True  # VTAB-v2 of VTAB+MD = the 18 tasks without DTD (an MD source)
    image_feature: str = "image"
    rescale_255: bool = False  # dsprites: stored 0/1 masks are re-encoded with values x255 (as VTAB does)

    @property
    def tfds_spec(self) -> str:
        """`name[/config]:version`, what `tfds.builder` is called with."""
        config = f"/{self.tfds_config}" if self.tfds_config else ""
        return f"{self.tfds_name}{config}:{self.tfds_version}"

    def slices(self, protocol: str) -> dict[str, tuple[Slice, ...]]:
        """{"support": slices, "query": slices} of a protocol, in reading order."""
        if protocol == "vtab1k":
            return {"support": self.support, "query": (self.query,)}
        if protocol == "lite":
            return {"support": self.lite_support, "query": (self.lite_query,)}
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")


_TRAIN800 = Slice("train", 0, 800)
_LITE_SUPPORT = (Slice("train", 0, SUPPORT_SIZE),)
_TEST = Slice("test", 0, None)
_VALIDATION200 = Slice("validation", 0, 200)


_GROUP_OF = {task_id: group for group, task_ids in VTAB_TASKS.items() for task_id in task_ids}


def _task(task_id: str, name: str, config: str | None, version: str, num_classes: int,
          val200: Slice, query: Slice, *, rule: str = "label", lite_query: Slice = _TEST,
          manual: tuple[ManualFile, ...] = (), in_vtab_v2: bool = True, rescale_255: bool = False) -> VtabTask:
    return VtabTask(task_id, _GROUP_OF[task_id], name, config, version, num_classes, rule, (_TRAIN800, val200),
                    query, _LITE_SUPPORT, lite_query, manual, in_vtab_v2, "image", rescale_255)


_SUN397_FILES = (ManualFile("SUN397.tar.gz", "vision.princeton.edu (39 GB)"),
                 ManualFile("Partitions.zip", "vision.princeton.edu"))
_RESISC45_FILES = (ManualFile("NWPU-RESISC45/", "the RESISC45 .rar (OneDrive link in TFDS's resisc45 "
                                                "instructions), extracted: one folder per class of *.jpg"),)
_DR_FILES = (ManualFile("train/", "Kaggle diabetic-retinopathy-detection: train.zip.00x joined and unzipped"),
             ManualFile("test/", "Kaggle: test.zip.00x joined and unzipped"),
             ManualFile("sample/", "Kaggle: sample.zip unzipped"),
             ManualFile("trainLabels.csv", "Kaggle: trainLabels.csv.zip unzipped"),
             ManualFile("retinopathy_solution.csv", "the Kaggle forum attachment TFDS downloads (test labels)"))
_TRAIN_REST = Slice("train", SUPPORT_SIZE, None)

_ENTRIES = (
    _task("caltech101", "caltech101", None, "3.0.2", 102, Slice("train", 2754, 2954), _TEST),
    _task("cifar100", "cifar100", None, "3.0.2", 100, Slice("train", 45000, 45200), _TEST),
    _task("dtd", "dtd", None, "3.0.1", 47, _VALIDATION200, _TEST, in_vtab_v2=False),
    _task("oxford_flowers102", "oxford_flowers102", None, "2.1.1", 102, _VALIDATION200, _TEST),
    _task("oxford_iiit_pet", "oxford_iiit_pet", None, "3.2.0", 37, Slice("train", 2944, 3144), _TEST),
    _task("sun397", "sun397", "tfds", "4.0.0", 397, _VALIDATION200, _TEST, manual=_SUN397_FILES),
    _task("svhn", "svhn_cropped", None, "3.0.0", 10, Slice("train", 65931, 66131), _TEST),
    _task("patch_camelyon", "patch_camelyon", None, "2.0.0", 2, _VALIDATION200, _TEST),
    _task("eurosat", "eurosat", "rgb", "2.0.0", 10, Slice("train", 16200, 16400),
          Slice("train", 21600, None), lite_query=_TRAIN_REST),
    _task("resisc45", "resisc45", None, "3.0.0", 45, Slice("train", 18900, 19100),
          Slice("train", 25200, None), lite_query=_TRAIN_REST, manual=_RESISC45_FILES),
    _task("diabetic_retinopathy", "diabetic_retinopathy_detection", "btgraham-300", "3.0.0", 5,
          _VALIDATION200, _TEST, manual=_DR_FILES),
    _task("clevr_count_all", "clevr", None, "3.1.0", 8, Slice("train", 63000, 63200),
          Slice("validation", 0, None), rule="clevr_count_all", lite_query=Slice("validation", 0, None)),
    _task("clevr_closest_object_distance", "clevr", None, "3.1.0", 6, Slice("train", 63000, 63200),
          Slice("validation", 0, None), rule="clevr_closest_object_distance",
          lite_query=Slice("validation", 0, None)),
    _task("dmlab", "dmlab", None, "2.0.1", 6, _VALIDATION200, _TEST),
    _task("kitti_closest_vehicle_distance", "kitti", None, "3.1.0", 4, _VALIDATION200, _TEST,
          rule="kitti_closest_vehicle_distance"),
    _task("dsprites_label_x_position", "dsprites", None, "2.0.0", 16, Slice("train", 589824, 590024),
          Slice("train", 663552, None), rule="dsprites_label_x_position", lite_query=_TRAIN_REST, rescale_255=True),
    _task("dsprites_label_orientation", "dsprites", None, "2.0.0", 16,
          Slice("train", 589824, 590024), Slice("train", 663552, None), rule="dsprites_label_orientation",
          lite_query=_TRAIN_REST, rescale_255=True),
    _task("smallnorb_label_azimuth", "smallnorb", None, "2.0.0", 18, Slice("test", 0, 200),
          Slice("test", 12150, None), rule="smallnorb_label_azimuth"),
    _task("smallnorb_label_elevation", "smallnorb", None, "2.0.0", 9, Slice("test", 0, 200),
          Slice("test", 12150, None), rule="smallnorb_label_elevation"),
)

TASKS: dict[str, VtabTask] = {t.task_id: t for t in _ENTRIES}
# VTAB-v2 of VTAB+MD (what LITE evaluates): the 18 tasks without DTD, in the table's order.
VTAB_V2_TASKS: tuple[str, ...] = tuple(t.task_id for t in _ENTRIES if t.in_vtab_v2)

# VTAB's expected sizes of the query slice (vtab1k) [TA *_test.py]; the converter checks them when the
# builder's split metadata is available.
VTAB1K_QUERY_SIZES = {
    "caltech101": 6084, "cifar100": 10000, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "sun397": 21750, "svhn": 26032, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count_all": 15000, "clevr_closest_object_distance": 15000,
    "dmlab": 22735, "kitti_closest_vehicle_distance": 711, "dsprites_label_x_position": 73728,
    "dsprites_label_orientation": 73728, "smallnorb_label_azimuth": 12150, "smallnorb_label_elevation": 12150,
}


def get_task(task_id: str) -> VtabTask:
    """The registry entry of `task_id`; KeyError listing the known ids otherwise."""
    try:
        return TASKS[task_id]
    except KeyError:
        raise KeyError(f"unknown VTAB task {task_id!r}; known: {', '.join(TASKS)}") from None


def parse_tasks(text: str) -> tuple[str, ...]:
    """`--tasks` value: comma-separated ids; empty = VTAB-v2's 18 tasks (DTD only by name). ValueError if unknown."""
    ids = tuple(t.strip() for t in text.split(",") if t.strip()) or VTAB_V2_TASKS
    unknown = [t for t in ids if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown VTAB task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    repeated = sorted({t for t in ids if ids.count(t) > 1})
    if repeated:
        raise ValueError(f"--tasks names {', '.join(repeated)} more than once")
    return ids


def vtab_label(task_id: str, features: Features) -> int:
    """The VTAB label of one example of `task_id` from its flat TFDS features, as VTAB's TF code computes it.

    Example:
        vtab_label("clevr_closest_object_distance", {"objects/pixel_coords": np.float32([[1, 2, 8.5]])}) == 1

    Raises:
        KeyError: unknown task id.
        ValueError: a missing or malformed feature, or a value whose VTAB label would lie outside
            `[0, num_classes)`; the message names the task and the value.
    """
    task = get_task(task_id)
    return derive_label(task_id, task.label_rule, task.num_classes, features).label  # type: ignore[return-value]
