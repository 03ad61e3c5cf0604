"""EpisodePlans in, Episodes out: worker processes decode equal-size tasks into shared episode tensors.

Assembly (`EpisodeLoader.__iter__`), and the record that flows out of each step:

    EpisodePlanner   seed, sources     -> EpisodePlan  (main process: which samples, in episode order)
    _TaskSampler     EpisodePlan       -> DecodeTask   (main process: takes an image buffer for the episode
                                                        from `_BufferPool`, cuts the plan into tasks of
                                                        `images_per_task` images)
    DataLoader       DecodeTask        -> ack          (a worker reads + decodes + resizes its images straight
                                                        into rows of the shared buffer)
    EpisodeLoader    acks              -> Episode      (main process: yields each episode once all its tasks
                                                        are done; labels come from the plan)

Why tasks and not whole episodes: MD episodes vary from ~50 to ~1000 images, and torch's DataLoader hands
items to workers round-robin and returns them in order, so with one episode per item a worker that drew a
small episode waits for the one that drew a big one (measured: 2 workers ran at ~65 % of the decode bound
at 224 px). Equal-size tasks keep every worker busy, the tensors are written in place (no copy between
processes), and since planning stays sequential the content of episode i is the same for any worker count.

Why recycled buffers: a fresh 224-px episode is ~300 MB of new shared memory, and the first write to each
of its ~75,000 pages is a page fault in the worker (allocate + zero + map): in one process, 617 images/s
into fresh shared memory vs 740 into a recycled buffer. `_BufferPool` hands an episode's buffer out again
only once no tensor outside the pool references its storage (the consumer dropped the episode, or copied
it to pinned/GPU memory), and workers keep their mapping of the buffers they have written to, so after
warm-up no page is faulted again (BENCHMARKS.md: 224 px, 2 workers, warm-up 856 vs steady 1,277 images/s).
Holding on to an episode is always safe: its buffer is simply not reused.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Iterator, Sequence, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from lite_train.data.decode import compile_resize, decode_resize_into
from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.episodes import EpisodePlan, EpisodePlanner, open_readers
from manifests import SourceReader
from manifests.reader import DEFAULT_MAX_OPEN_FILES


class Episode(TypedDict):
    """One episode as the loader yields it. Images are float32 in [-1, 1], NCHW."""

    index: int
    source: str
    support_images: torch.Tensor  # (N, 3, H, W)
    support_labels: torch.Tensor  # (N,) int64, 0..ways-1 = description position
    support_class_ids: torch.Tensor  # (N,) int64 absolute class ids
    query_images: torch.Tensor  # (M, 3, H, W)
    query_labels: torch.Tensor  # (M,)
    query_class_ids: torch.Tensor  # (M,)


@dataclasses.dataclass(frozen=True)
class EpisodeLoaderConfig:
    """Everything that decides which episodes a loader yields and how they look."""

    data: str  # root of converted sources (holds <group>/<source>/)
    sources: tuple[str, ...]  # source names, e.g. ("omniglot",) or the MD-v2 training sources
    split: str = "train"
    seed: int = 0
    image_size: int = 84
    order: str = "md"  # per-pass image order: "md" | "uniform" (docs/fidelity.md)
    use_hierarchy: bool = True  # ImageNet DAG / Omniglot alphabets where the spec has them
    num_episodes: int | None = None  # None = infinite
    start: int = 0  # first episode index (resume)
    num_workers: int = 2
    pin_memory: bool = False  # page-locked copies of the images, when CUDA is available
    images_per_task: int = 64  # images one worker decodes per DataLoader item
    # DataLoader items queued ahead (8 x 64 images ~ one MD episode). Measured at 224 px, 2 workers: the same
    # images/s for 4, 8, 12, 24; shared episode memory 1.9 GB at 8 vs 2.6 GB at 24.
    tasks_in_flight: int = 8
    max_open_files: int = DEFAULT_MAX_OPEN_FILES  # shard descriptors per process, over all sources
    dct_scale: bool = False  # fast, not TF-identical decoding (docs/fidelity.md)


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    """Decode `samples` of source `source_index` into `images[start : start + len(samples)]`."""

    episode: int
    source_index: int
    samples: np.ndarray  # (k,) global sample indices
    images: torch.Tensor  # (capacity, 3, H, W): the episode's buffer, support rows then query rows
    start: int


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory whose pages are committed only when first written.

    torch's own shared allocation (`share_memory_()`, `UntypedStorage._new_shared`) reserves the whole size
    up front (fallocate): a 1000-row 224-px episode buffer would cost 600 MB before any image is written to
    it. An anonymous memfd is sparse; workers receive it like any torch shared storage (by descriptor).
    """
    nbytes = math.prod(shape) * 4
    if nbytes == 0 or not hasattr(os, "memfd_create") or not hasattr(torch.UntypedStorage, "_new_shared_fd_cpu"):
        return torch.empty(shape).share_memory_()
    fd = os.memfd_create("lite-train-episode", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # maps a duplicate of fd
    finally:
        os.close(fd)
    return torch.empty(0).set_(storage, 0, shape)


def _storage_users(tensor: torch.Tensor) -> int | None:
    """How many tensors (views included) share `tensor`'s storage, or None where torch cannot tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(tensor.untyped_storage()._cdata)


class _BufferPool:
    """Main process: image buffers for episodes, each reused once nothing outside the pool holds it.

    A buffer is a (capacity, 3, H, W) float32 tensor; an episode gets views of its first rows. A buffer is
    free when its storage has no users besides the pool's own tensor, i.e. every view handed out (to the
    pending episode, to the consumer, to in-flight tasks) is gone. Where torch cannot count storage users,
    every episode gets a fresh buffer.

    Every new buffer gets the largest capacity asked for so far (at least `MIN_CAPACITY` rows), so any free
    buffer fits the next episode and the pool stops growing at the number of episodes alive at once.
    Untouched rows cost address space only: memory is committed page by page as rows are first written.
    """

    MIN_CAPACITY = 1000  # MD's largest variable-shot episode: <= 500 support + <= 10 query x <= 50 ways

    def __init__(self, image_shape: tuple[int, int, int], shared: bool, max_buffers: int):
        self.image_shape, self.max_buffers = image_shape, max_buffers
        self.allocate = _shared_empty if shared else torch.empty
        self.capacity = self.MIN_CAPACITY
        self.buffers: list[tuple[torch.Tensor, int | None]] = []  # (buffer, its storage users when free)

    def take(self, rows: int) -> torch.Tensor:
        """A buffer with at least `rows` rows, not referenced by anything outside the pool."""
        self.capacity = max(self.capacity, rows)
        free = [i for i, (buf, idle) in enumerate(self.buffers) if idle is not None and _storage_users(buf) == idle]
        fitting = [i for i in free if len(self.buffers[i][0]) >= rows]
        if fitting:
            return self.buffers[fitting[0]][0]
        # Make room: drop free buffers that are too small, then the oldest ones if the pool is full (a
        # dropped buffer still referenced by an episode lives on as long as that episode does).
        self.buffers = [b for i, b in enumerate(self.buffers) if i not in free]
        del self.buffers[:max(0, len(self.buffers) + 1 - self.max_buffers)]
        buf = self.allocate((self.capacity,) + self.image_shape)
        self.buffers.append((buf, _storage_users(buf)))
        return buf


class _TaskSampler(Sampler):
    """Main process: turns each plan into image views + decode tasks; remembers the pending episodes."""

    def __init__(self, planner: EpisodePlanner, image_size: int, images_per_task: int, shared: bool,
                 max_buffers: int):
        self.planner, self.images_per_task = planner, images_per_task
        self.pool = _BufferPool((3, image_size, image_size), shared, max_buffers)
        # episode index -> [plan, support images, query images, tasks not yet done]
        self.pending: dict[int, list] = {}

    def __iter__(self) -> Iterator[DecodeTask]:
        self.pending.clear()
        step = self.images_per_task
        for plan in self.planner:
            n, m = len(plan.support), len(plan.query)
            buf = self.pool.take(n + m)  # (capacity, 3, H, W)
            tasks = [DecodeTask(plan.index, plan.source_index, samples[i:i + step], buf, first + i)
                     for samples, first in ((plan.support, 0), (plan.query, n))
                     for i in range(0, len(samples), step)]
            self.pending[plan.index] = [plan, buf[:n], buf[n:n + m], len(tasks)]
            del buf  # the pool's reference is the only one besides the views
            yield from tasks


class _DecodeDataset(Dataset):
    """Worker side: a DecodeTask is read and decoded in place; only an acknowledgement travels back."""

    def __init__(self, readers: Sequence[SourceReader], image_size: int, dct_scale: bool, keep_mapped: int):
        self.readers, self.image_size, self.dct_scale = list(readers), image_size, dct_scale
        # Worker processes keep the buffers they have written to: torch maps a received shared storage
        # anew unless the process still holds it, and a fresh mapping faults on every page again.
        self.keep_mapped = keep_mapped
        self.mapped: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()

    def __getitem__(self, task: DecodeTask) -> int:
        reader = self.readers[task.source_index]
        out = task.images.numpy()
        for row, sample in enumerate(task.samples.tolist(), start=task.start):
            try:
                decode_resize_into(reader.read(sample), out[row], self.image_size, dct_scale=self.dct_scale)
            except ValueError as e:
                raise ValueError(f"{reader.locate(sample)}: {e}") from None
        if self.keep_mapped and get_worker_info() is not None:  # in-process, holding would block reuse
            self.mapped[task.images.data_ptr()] = task.images
            self.mapped.move_to_end(task.images.data_ptr())
            while len(self.mapped) > self.keep_mapped:
                self.mapped.popitem(last=False)
        return task.episode


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode per process: intra-op threads would only contend


def _episode(plan: EpisodePlan, support: torch.Tensor, query: torch.Tensor, pin: bool) -> Episode:
    class_ids = torch.from_numpy(plan.class_ids)  # (ways,)
    support_labels = torch.from_numpy(plan.support_labels)  # (N,)
    query_labels = torch.from_numpy(plan.query_labels)  # (M,)
    if pin:
        support, query = support.pin_memory(), query.pin_memory()
    return Episode(index=plan.index, source=plan.source,
                   support_images=support, support_labels=support_labels,
                   support_class_ids=class_ids[support_labels],
                   query_images=query, query_labels=query_labels, query_class_ids=class_ids[query_labels])


class EpisodeLoader:
    """Iterable of Episodes (see `Episode`), identical for any `num_workers`; each iteration restarts at
    `cfg.start`.

    Args:
        cfg: the loader config.
        description: the episode description law (MD's defaults: variable way and shot).
    """

    def __init__(self, cfg: EpisodeLoaderConfig,
                 description: EpisodeDescriptionConfig = EpisodeDescriptionConfig()):
        if cfg.images_per_task < 1 or cfg.tasks_in_flight < 1:
            raise ValueError("images_per_task and tasks_in_flight must be positive")
        self.cfg = cfg
        self.readers = open_readers(cfg.data, cfg.sources, cfg.max_open_files)
        self.planner = EpisodePlanner(self.readers, cfg.split, cfg.seed, description, order=cfg.order,
                                      num_episodes=cfg.num_episodes, start=cfg.start,
                                      use_hierarchy=cfg.use_hierarchy)
        workers = cfg.num_workers
        compile_resize()  # here, so that forked workers inherit the compiled kernel
        # Buffers in use at once: one per episode with tasks in flight, the one being assembled, the one
        # the consumer holds.
        buffers = cfg.tasks_in_flight + 2
        self._sampler = _TaskSampler(self.planner, cfg.image_size, cfg.images_per_task, shared=workers > 0,
                                     max_buffers=buffers)
        self._loader = DataLoader(
            _DecodeDataset(self.readers, cfg.image_size, cfg.dct_scale, keep_mapped=buffers), sampler=self._sampler,
            batch_size=None, num_workers=workers, worker_init_fn=_worker_init if workers else None,
            prefetch_factor=max(1, math.ceil(cfg.tasks_in_flight / workers)) if workers else None)
        self._pin = cfg.pin_memory and torch.cuda.is_available()

    def __len__(self) -> int:
        return len(self.planner)

    def __iter__(self) -> Iterator[Episode]:
        pending = self._sampler.pending
        for episode_index in self._loader:  # acknowledgements, in task order
            entry = pending[int(episode_index)]
            entry[3] -= 1
            if entry[3] == 0:
                plan, support, query, _ = pending.pop(int(episode_index))
                yield _episode(plan, support, query, self._pin)


def make_episode_loader(cfg: EpisodeLoaderConfig,
                        description: EpisodeDescriptionConfig = EpisodeDescriptionConfig()) -> EpisodeLoader:
    """The episode loader for a config (one call: what the CLIs and the trainer use)."""
    return EpisodeLoader(cfg, description)
