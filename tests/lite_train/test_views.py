"""The benchmark view (md-v1 / md-v2) is chosen when reading: one converted copy, both views."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lite_train.cli import app
from lite_train.data.episodes import EpisodePlanner, open_readers, sampling_spec
from lite_train.data.loader import EpisodeLoaderConfig, make_episode_loader

from tests.lite_train.tiny_sources import flat_spec, write_converted

runner = CliRunner()


@pytest.fixture
def data(tmp_path):
    # MNIST as CNAPs' spec stores it: all 10 classes in test (MD-v2 makes it a training source).
    write_converted(tmp_path, flat_spec("mnist", [6] * 10, (0, 0, 10)))
    write_converted(tmp_path, flat_spec("aircraft", [6] * 8, (4, 2, 2)))
    return tmp_path


def test_md_v2_view_makes_mnist_a_training_source_without_converting_again(data):
    [mnist, aircraft] = open_readers(data, ["mnist", "aircraft"])
    assert sampling_spec(mnist).classes_per_split == {"train": 0, "valid": 0, "test": 10}
    assert sampling_spec(mnist, "md-v2").classes_per_split == {"train": 10, "valid": 0, "test": 0}
    assert sampling_spec(aircraft, "md-v2") == sampling_spec(aircraft)  # unchanged elsewhere
    assert set(mnist.classes["split"].to_pylist()) == {"test"}  # the stored table keeps the source's split
    with pytest.raises(ValueError, match="view must be one of"):
        sampling_spec(mnist, "md-v3")
    plans = list(EpisodePlanner([mnist], "train", seed=0, num_episodes=3, view="md-v2"))
    assert all(set(p.class_ids.tolist()) <= set(range(10)) for p in plans)
    with pytest.raises(ValueError):  # md-v1: mnist has no training class
        EpisodePlanner([mnist], "train", seed=0, num_episodes=1)


def test_loader_config_and_describe_choose_the_view(data):
    cfg = EpisodeLoaderConfig(data=str(data), sources=("mnist",), split="train", num_episodes=2, num_workers=0,
                              image_size=16, view="md-v2")
    episodes = list(make_episode_loader(cfg))
    assert len(episodes) == 2 and all(np.isin(e["support_class_ids"].numpy(), range(10)).all() for e in episodes)
    v2 = runner.invoke(app, ["describe", "--data", str(data), "--source", "mnist", "--split", "train",
                             "--view", "md-v2", "--count", "2"])
    assert v2.exit_code == 0, v2.output
    assert len([json.loads(line) for line in v2.stdout.splitlines()]) == 2
    v1 = runner.invoke(app, ["describe", "--data", str(data), "--source", "mnist", "--split", "train", "--count", "2"])
    assert v1.exit_code == 1
