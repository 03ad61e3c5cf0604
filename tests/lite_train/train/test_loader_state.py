"""The episode loader's resume state and its data-parallel striding (what the trainer relies on)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lite_train.data.loader import EpisodeLoaderConfig, make_episode_loader
from tests.lite_train.tiny_sources import flat_spec, write_converted


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    write_converted(root, flat_spec("toya", [12] * 10, (6, 2, 2)))
    write_converted(root, flat_spec("toyb", [14] * 9, (5, 2, 2)))
    return root


def _cfg(data, **kw):
    base = dict(data=str(data), sources=("toya", "toyb"), split="train", seed=3, image_size=16,
                num_workers=0, num_episodes=8)
    return EpisodeLoaderConfig(**{**base, **kw})


def _key(ep):
    return (ep["index"], ep["source"], tuple(ep["support_class_ids"].tolist()), ep["support_images"].sum().item())


def test_resumed_loader_continues_the_stream_exactly(data):
    straight = [_key(ep) for ep in make_episode_loader(_cfg(data))]
    first = make_episode_loader(_cfg(data))
    head = []
    for ep in first:
        head.append(_key(ep))
        if len(head) == 3:
            break
    state = first.state_dict()
    assert state["next_episode"] == 3
    resumed = make_episode_loader(_cfg(data))
    resumed.load_state_dict(state)
    assert head + [_key(ep) for ep in resumed] == straight


def test_load_state_rejects_another_seed_or_changed_data(data, tmp_path):
    state = make_episode_loader(_cfg(data)).state_dict()
    with pytest.raises(ValueError, match="config: seed"):
        make_episode_loader(_cfg(data, seed=4)).load_state_dict(state)
    other = tmp_path / "other"  # same source names, different content
    write_converted(other, flat_spec("toya", [13] * 10, (6, 2, 2)))
    write_converted(other, flat_spec("toyb", [14] * 9, (5, 2, 2)))
    with pytest.raises(ValueError, match="fingerprints: toya"):
        make_episode_loader(_cfg(other)).load_state_dict(state)


def test_ranks_split_the_one_stream_by_index_mod_world(data):
    straight = [_key(ep) for ep in make_episode_loader(_cfg(data))]
    ranks = [[_key(ep) for ep in make_episode_loader(_cfg(data, rank=r, world_size=2))] for r in range(2)]
    assert [k[0] for k in ranks[0]] == [0, 2, 4, 6] and [k[0] for k in ranks[1]] == [1, 3, 5, 7]
    assert sorted(ranks[0] + ranks[1]) == sorted(straight)
    loader = make_episode_loader(_cfg(data, rank=1, world_size=2))
    assert len(loader) == 4
    next(iter(loader))
    assert loader.state_dict()["next_episode"] == 2  # the round of episodes 0 and 1 is done
