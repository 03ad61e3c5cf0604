"""Every converter repairs a damaged published source: a rerun converts it again instead of calling it up to date.

One staging protocol serves md, mnist and vtab, so each is held to the same promise (README, docs/architecture.md
"Staging"): a source is up to date only when its fingerprint matches and every published file is present
with the size its source.json recorded. Each case damages one published file of a copy of a converted
source (a deleted shard, a truncated one, an edited samples.parquet; mnist has one shard, so both shard
cases damage it), reruns the same conversion and expects the very bytes of the first conversion back, a
source that verifies, and a further run that finds it up to date.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

from convert.demo_data import write_idx
from convert.md import ConvertConfig, convert_planned, plan_datasets
from convert.mnist import MnistConfig, convert_mnist
from convert.vtab.convert import VtabConfig, convert_vtab
from convert.vtab.registry import TASKS
from manifests import schema, verify_source

from tests.convert.vtab.conftest import SPLIT_SIZES, mocked_tfds, write_dataset_info

SHARD = 2  # samples per shard: md's `tiny` (3 classes x 3) has 6 shards, the vtab task 5; mnist has one
VTAB_TASK, VTAB_N = "clevr_count_all", 3  # 3 slices x 3 examples


@pytest.fixture(scope="module")
def clevr_tfds(tmp_path_factory) -> Path:
    """A TFDS data_dir in which the VTAB task's builder looks prepared (metadata only; examples are mocked)."""
    root = tmp_path_factory.mktemp("tfds")
    spec = TASKS[VTAB_TASK].tfds_spec
    write_dataset_info(root, spec, SPLIT_SIZES[spec.split(":")[0]])
    return root


# Each converter: (its input, the TFDS data_dir, the output root) -> a function that runs it and returns the status.
def _md(records: Path, _tfds_dir: Path, out: Path) -> Callable[[], str]:
    config = ConvertConfig(records=str(records), out=str(out), max_shard_samples=SHARD, workers=1)
    return lambda: convert_planned(plan_datasets(config), config)[0].status


def _mnist(idx: Path, _tfds_dir: Path, out: Path) -> Callable[[], str]:
    config = MnistConfig(idx_dir=str(idx), out=str(out))
    return lambda: convert_mnist(config).status


def _vtab(_records: Path, tfds_dir: Path, out: Path) -> Callable[[], str]:
    config = VtabConfig(tfds_data_dir=str(tfds_dir), out=str(out), tasks=(VTAB_TASK,), limit=VTAB_N,
                        max_shard_samples=SHARD)

    def run() -> str:
        with mocked_tfds(tfds_dir, VTAB_N):
            return convert_vtab(config)[0].status

    return run


CONVERTERS = {"md": (_md, "md/tiny"), "mnist": (_mnist, "md/mnist"), "vtab": (_vtab, f"vtab/{VTAB_TASK}")}


@pytest.fixture(scope="module")
def converted(tiny_template, clevr_tfds, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each converter's input and a first conversion of it: {converter: (input, output root)}. The inputs are
    only read; each test damages a copy of the output."""
    idx = tmp_path_factory.mktemp("idx")
    rng = np.random.RandomState(3)
    write_idx(idx, rng.randint(0, 256, (20, 28, 28)).astype(np.uint8), np.arange(20, dtype=np.uint8) % 10)
    done = {}
    for name, (converter, _) in CONVERTERS.items():
        source = idx if name == "mnist" else tiny_template
        out = tmp_path_factory.mktemp(f"{name}_out")
        assert converter(source, clevr_tfds, out)() == "converted"
        done[name] = source, out
    return done


def _damage(src: Path, damage: str) -> None:
    shards = sorted(src.glob("*.tar"))
    if damage == "delete a shard":
        shards[min(1, len(shards) - 1)].unlink()
    elif damage == "truncate a shard":
        os.truncate(shards[min(2, len(shards) - 1)], 1024)
    else:  # a samples.parquet rewritten without its last row: still Parquet, no longer what was converted
        table = pq.ParquetFile(src / schema.SAMPLES_FILE).read()
        pq.write_table(table.slice(0, table.num_rows - 1), src / schema.SAMPLES_FILE)


def _contents(src: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in src.iterdir() if p.name != schema.SOURCE_FILE}


@pytest.mark.parametrize("damage", ["delete a shard", "truncate a shard", "edit samples.parquet"])
@pytest.mark.parametrize("name", list(CONVERTERS))
def test_a_damaged_published_source_is_converted_again(converted, clevr_tfds, tmp_path, name, damage):
    converter, folder = CONVERTERS[name]
    source, first = converted[name]
    shutil.copytree(first, tmp_path / "out")
    convert = converter(source, clevr_tfds, tmp_path / "out")
    src = tmp_path / "out" / folder
    assert convert() == "up to date"  # the copy is the converted source (nothing in source.json names --out)
    _damage(src, damage)
    assert convert() == "converted"
    verify_source(src)
    assert _contents(src) == _contents(first / folder)
    assert convert() == "up to date"
