"""Meta-Dataset `dataset_spec.json` (dict) -> validated, immutable `MDSpec`; plus the MD-v2 spec view.

MD writes one `dataset_spec.json` per converted source. Its `__class__` key selects one of three
variants (MD `meta_dataset/data/dataset_spec.py`):

* `DatasetSpecification` (flat): `classes_per_split` {TRAIN|VALID|TEST: n}; classes of a split are the
  contiguous id range TRAIN = [0, nT), VALID = [nT, nT+nV), TEST = [nT+nV, C).
* `BiLevelDatasetSpecification` (Omniglot): superclasses are contiguous per split, classes contiguous
  per superclass in superclass order, so a split's classes are those of its superclasses.
* `HierarchicalDatasetSpecification` (ImageNet): one WordNet sub-graph per split
  (`split_subgraphs[split]` = list of `{wn_id, words, children_ids, parents_ids}`); the leaves are the
  classes, `images_per_class[split][wn_id]` counts every node of that split's graph, and the
  absolute ids of a split's leaves are contiguous, in increasing wn_id order.

JSON object keys are strings (class ids, superclass ids); `MDSpec` turns them into tuples indexed by
the integer id. Only stdlib is used, so `convert` and `lite_train` can both import this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid", "test")
_MD_SPLITS = ("TRAIN", "VALID", "TEST")  # the spelling of split keys inside dataset_spec.json

# MD's (and LITE's MD-v2) dataset_spec.json files, shipped as package data with their provenance README.
SHIPPED_SPECS_DIR = Path(__file__).resolve().parent / "md_specs"
_SHIPPED_SUFFIX = "_dataset_spec.json"

KINDS = {
    "DatasetSpecification": "flat",
    "BiLevelDatasetSpecification": "bilevel",
    "HierarchicalDatasetSpecification": "hierarchical",
}


@dataclasses.dataclass(frozen=True)
class MDSpec:
    """One Meta-Dataset source's class structure, parsed and checked.

    Absolute class ids are 0..C-1; split `s` owns the contiguous range
    `[split_offset(s), split_offset(s) + classes_per_split[s])`.
    """

    name: str  # MD source name, e.g. "omniglot", "ilsvrc_2012"
    kind: str  # "flat" | "bilevel" | "hierarchical"
    classes_per_split: dict  # {"train": n, "valid": n, "test": n}; lower-case split names
    images_per_class: tuple  # images_per_class[c] = number of images of absolute class c
    class_names: tuple  # class_names[c] = name of absolute class c (a WordNet id for ImageNet)
    superclasses_per_split: dict | None  # bilevel only: {"train": n, ...}
    classes_per_superclass: tuple | None  # bilevel only: classes_per_superclass[sc] = #classes
    superclass_names: tuple | None  # bilevel only: superclass_names[sc] = alphabet name
    raw: dict  # the parsed JSON verbatim; hierarchical graphs live in raw["split_subgraphs"]

    @property
    def num_classes(self) -> int:
        """Total number of classes C over all splits."""
        return len(self.images_per_class)

    def split_offset(self, split: str) -> int:
        """Absolute id of the split's first class: 0, nT or nT + nV."""
        split = _check_split(split)
        return sum(self.classes_per_split[s] for s in SPLITS[: SPLITS.index(split)])

    def split_class_ids(self, split: str) -> range:
        """Absolute class ids of `split` (a contiguous range)."""
        offset = self.split_offset(split)
        return range(offset, offset + self.classes_per_split[_check_split(split)])

    def class_split(self, class_id: int) -> str:
        """The split ("train" | "valid" | "test") that owns absolute class `class_id`."""
        for split in SPLITS:
            if class_id in self.split_class_ids(split):
                return split
        raise ValueError(f"{self.name}: class id {class_id} not in 0..{self.num_classes - 1}")

    def superclass_of(self, class_id: int) -> int | None:
        """Superclass id of absolute class `class_id` (bilevel), else None."""
        if self.classes_per_superclass is None:
            return None
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"{self.name}: class id {class_id} not in 0..{self.num_classes - 1}")
        start = 0
        for sc, n in enumerate(self.classes_per_superclass):
            if class_id < start + n:
                return sc
            start += n
        raise AssertionError("unreachable: superclass counts were validated")

    def split_superclass_ids(self, split: str) -> range:
        """Superclass ids of `split` (contiguous); bilevel specs only."""
        if self.superclasses_per_split is None:
            raise ValueError(f"{self.name}: {self.kind} spec has no superclasses")
        split = _check_split(split)
        offset = sum(self.superclasses_per_split[s] for s in SPLITS[: SPLITS.index(split)])
        return range(offset, offset + self.superclasses_per_split[split])


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _count(value: Any, origin: str, what: str) -> int:
    # bool is an int subclass; a count of True is a malformed spec, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{origin}: {what} must be a non-negative int, got {value!r}")
    return value


def _require(raw: dict, keys: tuple, origin: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"{origin}: missing key(s) {missing}")


def _per_split(table: Any, origin: str, what: str) -> dict:
    """{"TRAIN": n, "VALID": n, "TEST": n} -> {"train": n, "valid": n, "test": n}."""
    if not isinstance(table, dict) or set(table) != set(_MD_SPLITS):
        got = sorted(table) if isinstance(table, dict) else type(table).__name__
        raise ValueError(f"{origin}: {what} must have exactly the keys {list(_MD_SPLITS)}, got {got}")
    return {s.lower(): _count(table[s], origin, f"{what}[{s}]") for s in _MD_SPLITS}


def _dense(table: Any, n: int, origin: str, what: str) -> tuple:
    """{"0": v0, ..., "n-1": v_{n-1}} -> (v0, ..., v_{n-1}); every id 0..n-1 exactly once."""
    if not isinstance(table, dict):
        raise ValueError(f"{origin}: {what} must be an object keyed by id, got {type(table).__name__}")
    try:
        by_id = {int(k): v for k, v in table.items()}
    except ValueError:
        raise ValueError(f"{origin}: {what} has a non-integer key") from None
    if len(by_id) != len(table) or set(by_id) != set(range(n)):
        raise ValueError(f"{origin}: {what} must have ids 0..{n - 1} exactly, got {len(table)} keys")
    return tuple(by_id[i] for i in range(n))


def _names(values: tuple, origin: str, what: str) -> tuple:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{origin}: {what}[{i}] must be a string, got {v!r}")
    return values


def _parse_flat(raw: dict, origin: str) -> dict:
    _require(raw, ("classes_per_split", "images_per_class", "class_names"), origin)
    per_split = _per_split(raw["classes_per_split"], origin, "classes_per_split")
    n = sum(per_split.values())
    counts = _dense(raw["images_per_class"], n, origin, "images_per_class")
    counts = tuple(_count(c, origin, f"images_per_class[{i}]") for i, c in enumerate(counts))
    names = _names(_dense(raw["class_names"], n, origin, "class_names"), origin, "class_names")
    return dict(classes_per_split=per_split, images_per_class=counts, class_names=names)


def _parse_bilevel(raw: dict, origin: str) -> dict:
    keys = ("superclasses_per_split", "classes_per_superclass", "images_per_class",
            "superclass_names", "class_names")
    _require(raw, keys, origin)
    sc_per_split = _per_split(raw["superclasses_per_split"], origin, "superclasses_per_split")
    n_sc = sum(sc_per_split.values())
    per_sc = _dense(raw["classes_per_superclass"], n_sc, origin, "classes_per_superclass")
    per_sc = tuple(_count(c, origin, f"classes_per_superclass[{i}]") for i, c in enumerate(per_sc))
    sc_names = _names(_dense(raw["superclass_names"], n_sc, origin, "superclass_names"),
                      origin, "superclass_names")
    # A split's classes are the classes of its (contiguous) superclasses.
    per_split, start = {}, 0
    for split in SPLITS:
        per_split[split] = sum(per_sc[start:start + sc_per_split[split]])
        start += sc_per_split[split]
    n = sum(per_sc)
    counts = _dense(raw["images_per_class"], n, origin,
                    f"images_per_class (sum of classes_per_superclass = {n})")
    counts = tuple(_count(c, origin, f"images_per_class[{i}]") for i, c in enumerate(counts))
    names = _names(_dense(raw["class_names"], n, origin, "class_names"), origin, "class_names")
    return dict(classes_per_split=per_split, images_per_class=counts, class_names=names,
                superclasses_per_split=sc_per_split, classes_per_superclass=per_sc,
                superclass_names=sc_names)


def _parse_hierarchical(raw: dict, origin: str) -> dict:
    _require(raw, ("split_subgraphs", "images_per_class", "class_names"), origin)
    graphs, ipc = raw["split_subgraphs"], raw["images_per_class"]
    for what, table in (("split_subgraphs", graphs), ("images_per_class", ipc)):
        if not isinstance(table, dict) or set(table) != set(_MD_SPLITS):
            raise ValueError(f"{origin}: {what} must have exactly the keys {list(_MD_SPLITS)}")
    split_leaves = {}
    for md_split in _MD_SPLITS:
        split_leaves[md_split.lower()] = _check_graph(graphs[md_split], ipc[md_split],
                                                      origin, md_split)
    per_split = {s: len(split_leaves[s]) for s in SPLITS}
    n = sum(per_split.values())
    names = _names(_dense(raw["class_names"], n, origin, "class_names"), origin, "class_names")
    # MD assigns each split's leaves the contiguous id block in increasing wn_id order.
    counts, offset = [], 0
    for split, md_split in zip(SPLITS, _MD_SPLITS):
        block = list(names[offset:offset + per_split[split]])
        if block != split_leaves[split]:
            raise ValueError(f"{origin}: class_names {offset}..{offset + per_split[split] - 1} "
                             f"are not the {split} leaves in wn_id order")
        counts.extend(ipc[md_split][wn] for wn in block)
        offset += per_split[split]
    return dict(classes_per_split=per_split, images_per_class=tuple(counts), class_names=names)


def _check_graph(nodes: Any, counts: Any, origin: str, split: str) -> list:
    """Checks one split's DAG and returns its leaf wn_ids, sorted.

    Rules: unique wn_ids; every child/parent id is a node of the same split's graph and the links are
    symmetric; `counts` holds a non-negative int for exactly the graph's nodes.
    """
    where = f"split_subgraphs[{split}]"
    if not isinstance(nodes, list):
        raise ValueError(f"{origin}: {where} must be a list of nodes")
    by_id = {}
    for node in nodes:
        if not isinstance(node, dict) or not {"wn_id", "children_ids", "parents_ids"} <= set(node):
            raise ValueError(f"{origin}: {where} has a node without wn_id/children_ids/parents_ids")
        if node["wn_id"] in by_id:
            raise ValueError(f"{origin}: {where} repeats node {node['wn_id']}")
        by_id[node["wn_id"]] = node
    for wn, node in by_id.items():
        for link, back in (("children_ids", "parents_ids"), ("parents_ids", "children_ids")):
            for other in node[link]:
                if other not in by_id or wn not in by_id[other][back]:
                    raise ValueError(f"{origin}: {where} node {wn} {link} -> {other} is not a "
                                     f"symmetric link inside the split")
    if not isinstance(counts, dict) or set(counts) != set(by_id):
        raise ValueError(f"{origin}: images_per_class[{split}] must cover exactly the {len(by_id)} "
                         f"nodes of {where}")
    for wn, c in counts.items():
        _count(c, origin, f"images_per_class[{split}][{wn}]")
    return sorted(wn for wn, node in by_id.items() if not node["children_ids"])


def parse_md_spec(raw: dict, origin: str) -> MDSpec:
    """Validates a parsed `dataset_spec.json` and returns its `MDSpec`.

    Checks: split counts sum to the number of classes; class ids 0..C-1 each present once in
    `images_per_class` and `class_names`; counts are non-negative ints; bilevel: superclass ids
    0..S-1 present and Σ classes_per_superclass = C; hierarchical: each split graph is closed with
    symmetric links, `images_per_class[split]` covers its nodes, and `class_names` lists each split's
    leaves in wn_id order in the split's id block.

    Args:
      raw: the JSON object.
      origin: what to name in error messages (usually the file path).

    Raises:
      ValueError: one line, `f"{origin}: <what is wrong>"`.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}: a dataset spec must be a JSON object, got {type(raw).__name__}")
    cls = raw.get("__class__")
    if cls not in KINDS:
        raise ValueError(f"{origin}: __class__ must be one of {sorted(KINDS)}, got {cls!r}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ValueError(f"{origin}: name must be a non-empty string")
    kind = KINDS[cls]
    fields = {"flat": _parse_flat, "bilevel": _parse_bilevel,
              "hierarchical": _parse_hierarchical}[kind](raw, origin)
    fields.setdefault("superclasses_per_split", None)
    fields.setdefault("classes_per_superclass", None)
    fields.setdefault("superclass_names", None)
    return MDSpec(name=raw["name"], kind=kind, raw=raw, **fields)


def load_md_spec(path: str | os.PathLike) -> MDSpec:
    """Reads and validates one `dataset_spec.json`.

    Raises:
      ValueError: naming `path` when the file is unreadable, not JSON, or an invalid spec.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{os.fspath(path)}: cannot read dataset spec: {e}") from None
    return parse_md_spec(raw, os.fspath(path))


VIEWS = ("md-v1", "md-v2")  # class-split views of MD sources, chosen when reading (see spec_view)


def spec_view(spec: MDSpec, view: str) -> MDSpec:
    """The spec the episode sampler uses for a source in a benchmark view.

    A converted source keeps its own spec (MD-v1's); the view is applied when reading, so one converted
    copy serves both: "md-v1" returns `spec` itself, "md-v2" returns the parsed `md_v2_view(spec)` where
    MD-v2 re-splits the source (ilsvrc_2012, mnist) and `spec` itself elsewhere. Class ids, counts and
    names are the same in both views; only which split owns a class (and ImageNet's graph) changes.

    Raises:
      ValueError: an unknown view.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    raw = md_v2_view(spec) if view == "md-v2" else None
    return spec if raw is None else parse_md_spec(raw, f"md-v2 view of {spec.name}")


def md_v2_view(spec: MDSpec) -> dict | None:
    """The `dataset_spec.json` dict MD-v2 (LITE's VTAB+MD setup) uses for this source, or None.

    MD-v2 re-splits two sources without touching their record files:

    * `ilsvrc_2012` (the hierarchical v1 spec): a FLAT spec, all 1000 classes in TRAIN, keeping the v1
      absolute ids (train leaves 0..711, then valid, then test), their counts and wn_ids -- exactly
      LITE's `lite_v2_ilsvrc_2012_dataset_spec.json` apart from its `path`.
    * `mnist`: every class moved to TRAIN (LITE's `lite_v2_mnist_dataset_spec.json`).

    Every other source is unchanged in MD-v2: returns None.
    """
    if spec.name not in ("ilsvrc_2012", "mnist") or spec.kind == "bilevel":
        return None
    n = spec.num_classes
    return {
        "name": spec.name,
        "classes_per_split": {"TRAIN": n, "VALID": 0, "TEST": 0},
        "images_per_class": {str(i): c for i, c in enumerate(spec.images_per_class)},
        "class_names": {str(i): name for i, name in enumerate(spec.class_names)},
        "path": spec.raw.get("path", ""),
        "file_pattern": spec.raw.get("file_pattern", "{}.tfrecords"),
        "__class__": "DatasetSpecification",
    }


def shipped_spec_names() -> tuple[str, ...]:
    """Names of the specs shipped in `md_specs/` (e.g. "omniglot", "lite_v2_mnist"), sorted."""
    return tuple(sorted(p.name[: -len(_SHIPPED_SUFFIX)] for p in SHIPPED_SPECS_DIR.glob("*" + _SHIPPED_SUFFIX)))


def shipped_spec_path(name: str) -> Path:
    """Path of the shipped `<name>_dataset_spec.json`.

    Raises:
      ValueError: `name` is not a shipped spec (the message lists those that are).
    """
    path = SHIPPED_SPECS_DIR / f"{name}{_SHIPPED_SUFFIX}"
    if "/" in name or os.sep in name or not path.is_file():
        raise ValueError(f"no shipped dataset spec named {name!r}; shipped: {', '.join(shipped_spec_names())}")
    return path


def load_shipped_spec(name: str) -> MDSpec:
    """`load_md_spec` of the shipped spec `name` (see `shipped_spec_path`)."""
    return load_md_spec(shipped_spec_path(name))
