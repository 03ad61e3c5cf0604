"""Recycled episode buffers: reused once released, never while the consumer holds an episode."""

from __future__ import annotations

import os

import pytest
import torch

from lite_train.data.buffers import shared_empty, storage_users
from lite_train.data.loader import EpisodeLoader, EpisodeLoaderConfig

KEYS = ("support_images", "query_images")


def _loader(converted, workers, n, **kw) -> EpisodeLoader:
    cfg = EpisodeLoaderConfig(data=str(converted), sources=("toyflat",), split="train", seed=5, image_size=16,
                              num_episodes=n, num_workers=workers, **kw)
    return EpisodeLoader(cfg)


def _count_allocations(loader: EpisodeLoader) -> list[int]:
    pool, calls = loader.engine.pool, []
    allocate = pool.allocate

    def counting(shape):
        calls.append(shape[0])
        return allocate(shape)

    pool.allocate = counting
    return calls


@pytest.mark.parametrize("workers", [0, 2])
def test_released_episodes_give_their_buffers_back(converted, workers):
    loader = _loader(converted, workers, 24, tasks_in_flight=2)
    allocations = _count_allocations(loader)
    seen = 0
    for ep in loader:  # each episode is dropped when the next one arrives
        seen += 1
    assert seen == 24
    # Buffers alive at once: one per episode with tasks in flight (2 here), the one being filled, the
    # consumer's; in-process, tasks are fetched one at a time. Without reuse: one per episode.
    assert len(allocations) <= (2 if workers == 0 else 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_held_episodes_are_never_overwritten(converted, workers):
    # A small pool (tasks_in_flight=2 -> at most 4 buffers) so that holding every episode forces the pool to
    # give up buffers that the consumer still references.
    held, copies = [], []
    for ep in _loader(converted, workers, 14, tasks_in_flight=2, images_per_task=16):
        held.append(ep)
        copies.append({k: ep[k].clone() for k in KEYS})
    fresh = list(_loader(converted, 0, 14, tasks_in_flight=2, images_per_task=16))
    for ep, copy, ref in zip(held, copies, fresh):
        for k in KEYS:
            assert torch.equal(ep[k], copy[k]), (ep["index"], k)
            assert torch.equal(ep[k], ref[k]), (ep["index"], k)


def test_a_view_kept_by_the_consumer_keeps_its_buffer_busy(converted):
    loader = _loader(converted, 0, 6)
    allocations = _count_allocations(loader)
    kept = []
    for ep in loader:
        kept.append(ep["support_images"][:1])  # a slice only; the episode dict itself is dropped
    assert len(allocations) == 6  # no buffer could be reused
    # Every kept slice still holds its own episode's pixels: compare with a fresh loader's episodes, copied as
    # they arrive (the copies keep no buffer busy, so this run recycles its buffers).
    fresh = [ep["support_images"][:1].clone() for ep in _loader(converted, 0, 6)]
    for i, (view, ref) in enumerate(zip(kept, fresh, strict=True)):
        assert torch.equal(view, ref), i


def test_storage_users_count_views():
    t = torch.empty(4, 3)
    base = storage_users(t)
    # Buffer reuse relies on this private torch API: its loss must fail here, not skip (the loader would
    # silently fall back to fresh memory for every episode).
    assert base is not None, "torch._C._storage_Use_Count is missing: episode buffers are never reused"
    v = t[1:]
    assert storage_users(t) == base + 1
    del v
    assert storage_users(t) == base


def test_shared_buffers_commit_memory_only_where_written():
    rows, row_bytes = 2000, 3 * 224 * 224 * 4  # 1.2 GB of address space
    buf = shared_empty((rows, 3, 224, 224))
    assert buf.is_shared()
    fd, _ = buf.untyped_storage()._share_fd_cpu_()
    assert os.fstat(fd).st_blocks * 512 < 4 * row_bytes
    buf[:10] = 0.5
    assert 10 * row_bytes <= os.fstat(fd).st_blocks * 512 < 14 * row_bytes
