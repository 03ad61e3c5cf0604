"""Fixtures for the trainer tests: two tiny converted sources with train, valid and test classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lite_train.train import TrainConfig
from tests.lite_train.tiny_sources import flat_spec, write_converted


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    # 4 images per class: MD gives 2 query images per class and at most 2 support images, so 5-way
    # episodes have <= 10 support and 10 query images
    write_converted(root, flat_spec("toya", [4] * 16, (6, 5, 5)))
    write_converted(root, flat_spec("toyb", [4] * 15, (5, 5, 5)))
    return root


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A fast configuration: 32-px images (the smallest the set encoder takes), 5-way episodes, one query
    chunk, the ProtoNets head (Simple CNAPs inverts a 1280 x 1280 matrix per class: slow on CPU, and the
    loop does not depend on the head), the random backbone's BN calibrated on 20 images."""
    base = dict(data=str(data), out=str(out), sources=("toya", "toyb"), val_sources=(), train_method="lite",
                classifier="protonets", h=3, chunk_size=40, tasks_per_step=4, iterations=6, image_size=32,
                max_way_train=5, max_support_train=12, val_freq=1000, val_episodes=2, num_workers=0,
                checkpoint_every=1000, calibration_images=20)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """A finished 4-task run folder (checkpoint.pt, fully_trained.pt) on `tiny_data`."""
    from lite_train.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(tiny_data, run, iterations=4, tasks_per_step=2), progress=False)
    return run
