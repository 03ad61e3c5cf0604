"""Fixtures for lite_train tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.lite_train.tiny_runs import tiny_config
from tests.lite_train.tiny_sources import bilevel_spec, flat_spec, write_converted


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A data root with a flat source `toyflat` (some classes > 1000 images) and a bilevel `toyglyphs`."""
    root = tmp_path_factory.mktemp("converted")
    counts = [int(x) for x in np.random.RandomState(0).randint(20, 60, size=24)]
    counts[3] = 1300  # larger than MD's shuffle buffer: exercises the "md" pass order
    write_converted(root, flat_spec("toyflat", counts, (12, 6, 6)), max_shard_samples=200)
    write_converted(root, bilevel_spec("toyglyphs", [6, 7, 5, 6, 8, 5], (2, 2, 2), 20))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Two tiny converted sources with train, valid and test classes (4 images per class: MD gives 2 query
    images per class and at most 2 support images, so 5-way episodes have <= 10 support and 10 query images)."""
    root = tmp_path_factory.mktemp("train_data")
    write_converted(root, flat_spec("toya", [4] * 16, (6, 5, 5)))
    write_converted(root, flat_spec("toyb", [4] * 15, (5, 5, 5)))
    return root


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """A finished 4-task run folder (checkpoint.pt, fully_trained.pt) on `tiny_data`."""
    from lite_train.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(tiny_data, run, iterations=4, tasks_per_step=2), progress=False)
    return run
