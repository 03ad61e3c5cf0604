"""The on-disk format contract: file names, key and shard rules, Parquet schemas, source metadata.

Everything that both the writer (`convert`) and the readers (`lite_train`, other projects) must agree on
is declared here once. `docs/format.md` describes the same contract in prose.

A converted source lives in `<root>/<group>/<source>/`:

    <source>-000000.tar ...   WebDataset shards; samples class-contiguous, record order within a class
    classes.parquet           one row per class            (CLASS_SCHEMA)
    samples.parquet           one row per sample           (SAMPLE_SCHEMA)
    index.npy                 the (shard, offset, size) columns of samples.parquet as one memory-mappable
                              structured array (INDEX_DTYPE), so readers need no per-process copy
    source.json               SourceInfo; written last, so its presence marks a complete source
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np
import pyarrow as pa

from manifests.sources import IMAGE_MAGIC

FORMAT_VERSION = 2
# Version 2 = version 1 + the "ordered" layout (VTAB tasks) with provenance.parquet and typed TFDS origins;
# a version-1 source reads as a version-2 source with layout "class-contiguous" and no TFDS origin.
READABLE_FORMAT_VERSIONS = (1, 2)

CLASSES_FILE = "classes.parquet"
SAMPLES_FILE = "samples.parquet"
INDEX_FILE = "index.npy"
SOURCE_FILE = "source.json"

SPLITS = ("train", "valid", "test")
# Meta-Dataset's dataset_spec.json spells splits in upper case.
MD_SPLIT_NAMES = {"TRAIN": "train", "VALID": "valid", "TEST": "test"}

IMAGE_FORMATS = tuple(IMAGE_MAGIC)  # ("jpg", "png"): member extensions, told apart by their magic bytes
LABEL_EXTENSION = "cls"

# Every tar member is written with these header fields, so that converting the same input twice gives
# byte-identical shards.
TAR_MTIME = 0
TAR_MODE = 0o444
TAR_UNAME = "lite"
TAR_GNAME = "lite"

# WebDataset splits a member name at the first dot of its basename; USTAR keeps 100 bytes of name.
MAX_MEMBER_NAME_BYTES = 100
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME_RE = re.compile(r"^[a-z0-9_]+$")

DEFAULT_MAX_SHARD_SAMPLES = 100_000
DEFAULT_MAX_SHARD_BYTES = 1 << 30


def shard_name(source: str, index: int) -> str:
    """File name of shard `index` of `source`: `<source>-%06d.tar`."""
    return f"{source}-{index:06d}.tar"


def sample_key(class_id: int, index_in_class: int) -> str:
    """Tar key of the `index_in_class`-th record of class `class_id`: `c<class:05d>_<index:07d>`.

    Keys hold no dots (WebDataset would split them) and sort in sample order.
    """
    return f"c{class_id:05d}_{index_in_class:07d}"


def check_key(key: str) -> None:
    """Raise ValueError unless `key` is a valid sample key for every extension we write."""
    if not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots, no slashes)")
    longest = max(len(e) for e in IMAGE_FORMATS + (LABEL_EXTENSION,))
    if len(key.encode()) + 1 + longest > MAX_MEMBER_NAME_BYTES:
        raise ValueError(f"sample key {key!r} is too long for a {MAX_MEMBER_NAME_BYTES}-byte tar name")


def check_name(kind: str, name: str) -> None:
    """Raise ValueError unless a group or source name is lower-case letters, digits and '_'."""
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME_RE.pattern}")


# One row per class, in class-id order (= sample order).
CLASS_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int32(), nullable=False),  # absolute id in the source (MD record file id)
        pa.field("name", pa.string(), nullable=False),  # e.g. a WordNet id or "Latin-character01"
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS, in the converted benchmark view
        pa.field("superclass", pa.int32(), nullable=True),  # Omniglot alphabet id; null elsewhere
        pa.field("num_images", pa.int64(), nullable=False),
        pa.field("first_sample", pa.int64(), nullable=False),  # row of its first sample in samples.parquet
    ]
)

# One row per sample, in shard order: classes ascending, record order within a class.
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # tar key, see sample_key()
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("index_in_class", pa.int32(), nullable=False),  # position in the source's record order
        pa.field("shard", pa.int32(), nullable=False),  # shard number, file name = shard_name(source, shard)
        pa.field("offset", pa.int64(), nullable=False),  # byte offset of the image member's data in the tar
        pa.field("size", pa.int64(), nullable=False),  # byte size of the image member's data
        pa.field("format", pa.string(), nullable=False),  # one of IMAGE_FORMATS (= the member's extension)
        pa.field("crc32", pa.uint32(), nullable=False),  # zlib.crc32 of the image bytes
    ]
)

# index.npy: the random-access columns of samples.parquet, row for row.
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u4"), ("shard", "<u4")])


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a source."""

    name: str  # file name inside the source folder
    num_samples: int
    num_bytes: int  # size of the tar file


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Source-level metadata, stored as `source.json`."""

    format_version: int  # FORMAT_VERSION of the writer
    group: str  # "md", "vtab", ...
    source: str  # folder name, e.g. "omniglot"
    origin: str  # what was converted, e.g. "meta-dataset tfrecords" or "mnist idx (t10k)"
    converter_version: str  # lite-train version that wrote it
    benchmark: str  # "md-v1", "md-v2", ... : the view the class splits follow
    num_classes: int
    num_samples: int
    classes_per_split: dict[str, int]  # {"train": n, "valid": n, "test": n}
    shards: tuple[ShardInfo, ...]
    dataset_spec: dict[str, Any] | None  # the original dataset_spec.json, verbatim (None if there was none)
    sampling_spec: dict[str, Any] | None  # the spec the episode sampler must use in this view
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # converter-specific provenance
    layout: str = "class-contiguous"  # one of LAYOUTS (format version 2; version 1 is always class-contiguous)
    tfds: "TfdsOrigin | None" = None  # the TFDS builder the source was read from (format version 2)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, origin: str = "source.json") -> "SourceInfo":
        raw = json.loads(text)
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{origin}: format version {version!r}, this reader understands "
                             f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{origin}: unknown fields {sorted(unknown)}")
        raw["shards"] = tuple(ShardInfo(**s) for s in raw["shards"])
        if raw.get("layout", LAYOUTS[0]) not in LAYOUTS:
            raise ValueError(f"{origin}: layout {raw['layout']!r} is not one of {LAYOUTS}")
        if raw.get("tfds") is not None:
            raw["tfds"] = TfdsOrigin(**raw["tfds"])
        return cls(**raw)


# -- format version 2: sources that are not class-contiguous (VTAB tasks) -----------------------------------
# "class-contiguous" (Meta-Dataset): samples sorted by class, each class one block (classes.first_sample,
# num_images give the block). "ordered" (VTAB): samples in the order the source defines (support rows, then
# query rows, each in TFDS canonical order); a class's rows are spread out, classes.first_sample is the row
# of its first sample (-1 for a class without samples), index_in_class its rank among the class's rows, and
# provenance.parquet says where every row came from. Keys follow sample_key() in both layouts.
LAYOUTS = ("class-contiguous", "ordered")
ROLES = ("support", "query")
PROVENANCE_FILE = "provenance.parquet"

# One row per sample of an "ordered" source, aligned with samples.parquet row for row.
PROVENANCE_SCHEMA = pa.schema(
    [
        pa.field("role", pa.string(), nullable=False),  # one of ROLES
        pa.field("tfds_split", pa.string(), nullable=False),  # TFDS split read: "train", "validation", "test"
        pa.field("tfds_slice", pa.string(), nullable=False),  # the split string it came from, e.g. "train[:800]"
        pa.field("tfds_index", pa.int64(), nullable=False),  # position in the TFDS split's canonical order
        pa.field("raw_value", pa.float64(), nullable=False),  # what the label was derived from (count, depth, ...)
        pa.field("tfds_id", pa.string(), nullable=True),  # TFDS's own record id (file + index), when it gave one
    ]
)


@dataclasses.dataclass(frozen=True)
class TfdsOrigin:
    """The TFDS builder a source was read from (source.json `tfds`)."""

    name: str  # builder name, e.g. "clevr"
    config: str | None  # builder config, e.g. "btgraham-300"; None for builders without configs
    version: str  # dataset version read, e.g. "3.1.0"
    package_version: str  # tensorflow-datasets version that read it
    protocol: str  # how support and query were chosen, e.g. "vtab1k"
    label_rule: str  # how labels were derived from the TFDS features, e.g. "clevr_count_all"
