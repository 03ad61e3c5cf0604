"""Fixtures for lite_train tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
