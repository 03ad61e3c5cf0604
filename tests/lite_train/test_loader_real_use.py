"""The loader under real use: damaged shards, several live iterators, memory release, private-API fallbacks,
the spawn start method, classes too small for an episode, and the `episodes` CLI's bad arguments."""

from __future__ import annotations

import gc
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lite_train.cli import app
from lite_train.data import buffers as buffers_module
from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.episodes import EpisodePlanner, open_readers
from lite_train.data.loader import EpisodeLoader, EpisodeLoaderConfig
from manifests import SourceReader, schema
from manifests.reader import ChecksumError
from tests.lite_train.tiny_sources import flat_spec, write_converted

KEYS = ("support_images", "query_images")


def _cfg(root: Path, workers: int, n: int = 4, **kw) -> EpisodeLoaderConfig:
    return EpisodeLoaderConfig(data=str(root), sources=("toyglyphs",), split="train", seed=3, image_size=12,
                               num_episodes=n, num_workers=workers, images_per_task=8, **kw)


def _pixels(episodes) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    return [(ep["index"], ep["support_images"].clone(), ep["query_images"].clone()) for ep in episodes]


def _assert_same(got, expected) -> None:
    assert [i for i, _, _ in got] == [i for i, _, _ in expected]
    for (i, s, q), (_, s_ref, q_ref) in zip(got, expected):
        assert torch.equal(s, s_ref) and torch.equal(q, q_ref), i


def _episode_maps() -> int:
    """Mappings of loader episode buffers (memfd "lite-train-episode") in this process."""
    with open("/proc/self/maps") as f:
        return sum("lite-train-episode" in line for line in f)


@pytest.fixture(autouse=True)
def _no_earlier_episode_garbage():
    """Start every test here with no episode buffer left in unreachable reference cycles by an earlier test
    of this process (e.g. the traceback of a training step that raised, whose frames hold its episode): the
    tests below count this process's episode mappings, and release must not wait for the garbage collector."""
    gc.collect()


# -- integrity ---------------------------------------------------------------------------------------------

def _damage_first_drawn_image(root: Path) -> int:
    """Flip one byte inside the scan data of the first JPEG episode 0 reads (a flip there still decodes,
    to other pixels); return its sample index."""
    plan = next(iter(EpisodePlanner(open_readers(root, ["toyglyphs"]), "train", 3, num_episodes=1)))
    source = root / "md" / "toyglyphs"
    reader = SourceReader(source)
    formats = reader.samples()["format"].to_pylist()
    index = next(int(i) for i in plan.support if formats[i] == "jpg")
    entry = reader.index[index]
    with open(source / schema.shard_name("toyglyphs", int(entry["shard"])), "r+b") as f:
        f.seek(int(entry["offset"]) + int(entry["size"]) - 8)  # before the end marker
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x08]))
    return index


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_image_stops_the_loader_naming_where(tmp_path, workers):
    from tests.lite_train.tiny_sources import bilevel_spec

    write_converted(tmp_path, bilevel_spec("toyglyphs", [6, 7, 5, 6], (2, 1, 1), 6))
    index = _damage_first_drawn_image(tmp_path)
    with pytest.raises(ChecksumError) as e:
        list(EpisodeLoader(_cfg(tmp_path, workers, n=1)))
    assert "source toyglyphs" in str(e.value) and f"(row {index})" in str(e.value)
    # The option a benchmark turns off: the damaged bytes are decoded as they are.
    assert len(list(EpisodeLoader(_cfg(tmp_path, 0, n=1, verify_checksums=False)))) == 1


# -- several iterators -------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_two_live_iterators_do_not_corrupt_each_other(converted, workers):
    reference = _pixels(EpisodeLoader(_cfg(converted, 0, n=5)))
    loader = EpisodeLoader(_cfg(converted, workers, n=5))
    # Interleaved, as zip does (both started before either ends).
    a, b = [], []
    for ep_a, ep_b in zip(loader, loader):
        a.append(_pixels([ep_a])[0])
        b.append(_pixels([ep_b])[0])
    _assert_same(a, reference)
    _assert_same(b, reference)
    # A second iteration started while the first is live and finished first, then the first resumed
    # (a trainer's train_iter paused while validation runs).
    first = iter(loader)
    head = _pixels([next(first), next(first)])
    _assert_same(_pixels(loader), reference)
    _assert_same(head + _pixels(first), reference)


# -- memory ------------------------------------------------------------------------------------------------

def test_episode_memory_is_released_when_iterations_end_and_on_close(converted):
    loader = EpisodeLoader(_cfg(converted, 2, n=6))
    for _ in loader:
        pass
    del _
    assert _episode_maps() == 0
    assert not multiprocessing.active_children()
    it = iter(loader)
    ep = next(it)
    assert _episode_maps() > 0
    loader.close()  # mid-iteration
    assert list(it) == []  # the iteration has ended
    assert torch.isfinite(ep["support_images"]).all()  # a yielded episode stays valid
    del ep
    assert _episode_maps() == 0
    assert not multiprocessing.active_children()
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)


def test_context_manager_exit_releases_memory_and_workers(converted):
    with EpisodeLoader(_cfg(converted, 2, n=6)) as loader:
        it = iter(loader)
        next(it)
    assert _episode_maps() == 0
    assert not multiprocessing.active_children()


def test_a_break_releases_memory(converted):
    loader = EpisodeLoader(_cfg(converted, 1, n=6))
    for ep in loader:
        break
    del ep
    assert _episode_maps() == 0


# -- private torch API fallbacks ---------------------------------------------------------------------------

# torch.UntypedStorage._new_shared_fd_cpu lives on an immutable C type and cannot be removed here; a missing
# os.memfd_create takes the same fallback branch (share_memory_).
@pytest.mark.parametrize("where, name", [(torch._C, "_storage_Use_Count"), (os, "memfd_create")])
def test_a_missing_private_torch_api_warns_once_and_the_loader_still_works(converted, monkeypatch, where, name):
    reference = _pixels(EpisodeLoader(_cfg(converted, 0, n=4)))
    monkeypatch.setattr(buffers_module, "_warned", set())
    monkeypatch.delattr(where, name)
    with pytest.warns(RuntimeWarning, match=name) as caught:
        got = _pixels(EpisodeLoader(_cfg(converted, 2, n=4)))
    assert sum(name in str(w.message) for w in caught) == 1
    _assert_same(got, reference)


# -- spawn -------------------------------------------------------------------------------------------------

def test_spawned_workers_give_the_same_episodes(converted):
    reference = _pixels(EpisodeLoader(_cfg(converted, 0, n=3)))
    with EpisodeLoader(_cfg(converted, 1, n=3, multiprocessing_context="spawn")) as loader:
        assert loader.engine.data_loader(None).multiprocessing_context.get_start_method() == "spawn"
        _assert_same(_pixels(loader), reference)


# -- fail early --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_class(tmp_path_factory) -> Path:
    """A flat source: train = classes 0-4 (class 3: 5 images), valid = 5-10 (class 7: 1 image), test = 11-15;
    the other classes have 6 images."""
    root = tmp_path_factory.mktemp("small")
    write_converted(root, flat_spec("toysmall", [6, 6, 6, 5, 6, 6, 6, 1, 6, 6, 6, 6, 6, 6, 6, 6], (5, 6, 5)))
    return root


def _planner(root: Path, split: str, **description):
    return EpisodePlanner(open_readers(root, ["toysmall"]), split, 0, EpisodeDescriptionConfig(**description),
                          num_episodes=2)


def test_a_class_too_small_for_any_episode_fails_when_the_planner_is_built(small_class):
    with pytest.raises(ValueError) as e:
        _planner(small_class, "valid")
    message = str(e.value)
    for part in ("source toysmall", "split valid", "class 7 (toysmall_class7)", "1 image", "need 2",
                 "min_examples_in_class"):
        assert part in message
    _planner(small_class, "train")  # every train class has >= 2 images
    _planner(small_class, "valid", min_examples_in_class=2)  # MD's own way to leave it out


def test_fixed_shots_need_shots_plus_query_images(small_class):
    with pytest.raises(ValueError, match=r"split train: class 3 \(toysmall_class3\) has 5 images.*need 6"):
        _planner(small_class, "train", num_ways=5, num_support=3, num_query=3)
    _planner(small_class, "train", num_ways=5, num_support=3, num_query=2)
    with pytest.raises(ValueError, match="need 6"):  # a shot range needs its largest value
        _planner(small_class, "train", num_ways=5, num_support=(1, 5))


# -- `lite-train episodes` arguments -----------------------------------------------------------------------

def _episodes_cli(converted, out, *extra):
    result = CliRunner().invoke(app, ["episodes", "--data", str(converted), "--source", "toyglyphs", "--n", "1",
                                      "--image-size", "16", "--out", str(out), *extra])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback: a handled, one-line error
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_episodes_out_on_a_folder_is_a_one_line_error(converted, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert "is a folder" in _episodes_cli(converted, folder)
    assert list(folder.iterdir()) == []


def test_episodes_out_under_a_file_is_a_one_line_error_leaving_nothing(converted, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    assert "is not a folder" in _episodes_cli(converted, blocker / "sub" / "grid.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_episodes_unwritable_at_write_time_leaves_nothing(converted, tmp_path, monkeypatch):
    # Root can write anywhere, so simulate a folder that refuses the write (read-only mount, quota).
    import builtins

    real_open = builtins.open

    def refusing_open(path, mode="r", *args, **kw):
        if "w" in mode and str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert "Permission denied" in _episodes_cli(converted, tmp_path / "new" / "deeper" / "grid.png")
    assert list(tmp_path.iterdir()) == []


def test_episodes_image_size_beyond_sense_is_a_one_line_error(converted, tmp_path):
    assert "--image-size 4096" in _episodes_cli(converted, tmp_path / "g.png", "--image-size", "4096")
    assert list(tmp_path.iterdir()) == []
