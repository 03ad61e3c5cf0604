"""EpisodePlans in, Episodes out: worker processes decode equal-size tasks into shared episode tensors.

Assembly (`EpisodeLoader.__iter__`), and the record that flows out of each step:

    EpisodePlanner   seed, sources     -> EpisodePlan  (main process: which samples, in episode order)
    _TaskSampler     EpisodePlan       -> DecodeTask   (main process: allocates the episode's image tensors
                                                        in shared memory, cuts the plan into tasks of
                                                        `images_per_task` images)
    DataLoader       DecodeTask        -> ack          (a worker reads + decodes + resizes its images straight
                                                        into rows of the shared tensors)
    EpisodeLoader    acks              -> Episode      (main process: yields each episode once all its tasks
                                                        are done; labels come from the plan)

Why tasks and not whole episodes: MD episodes vary from ~50 to ~1000 images, and torch's DataLoader hands
items to workers round-robin and returns them in order, so with one episode per item a worker that drew a
small episode waits for the one that drew a big one (measured: 2 workers ran at ~65 % of the decode bound
at 224 px). Equal-size tasks keep every worker busy, the tensors are written in place (no copy between
processes), and since planning stays sequential the content of episode i is the same for any worker count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lite_train.data.decode import decode_resize_into
from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.episodes import EpisodePlan, EpisodePlanner, open_readers
from manifests import SourceReader


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
    tasks_in_flight: int = 24  # DataLoader items queued ahead (~2-3 episodes of images)
    max_open_files: int = 64  # shard descriptors per process, over all sources
    dct_scale: bool = False  # fast, not TF-identical decoding (docs/fidelity.md)


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    """Decode `samples` of source `source_index` into `images[start : start + len(samples)]`."""

    episode: int
    source_index: int
    samples: np.ndarray  # (k,) global sample indices
    images: torch.Tensor  # (n, 3, H, W): the episode's whole support or query tensor (shared memory)
    start: int


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor allocated directly in shared memory.

    `torch.empty(...).share_memory_()` would allocate, then copy into shared memory (~0.1 s at 224 px).
    """
    numel = math.prod(shape)
    try:
        storage = torch.UntypedStorage._new_shared(numel * 4)
    except AttributeError:  # a torch without the private constructor: allocate, then move (one copy)
        return torch.empty(shape).share_memory_()
    return torch.empty(0).set_(storage, 0, shape)


class _TaskSampler(Sampler):
    """Main process: turns each plan into image tensors + decode tasks; remembers the pending episodes."""

    def __init__(self, planner: EpisodePlanner, image_size: int, images_per_task: int, shared: bool):
        self.planner, self.image_size, self.images_per_task = planner, image_size, images_per_task
        # Fresh tensors for every episode: recycling buffers measured faster in-process but slower with
        # workers (whose per-task mapping of a recycled shared buffer costs more than fresh pages).
        self.allocate = _shared_empty if shared else torch.empty
        # episode index -> [plan, support images, query images, tasks not yet done]
        self.pending: dict[int, list] = {}

    def __iter__(self) -> Iterator[DecodeTask]:
        self.pending.clear()
        step, shape = self.images_per_task, (3, self.image_size, self.image_size)
        for plan in self.planner:
            parts = [(plan.support, self.allocate((len(plan.support),) + shape)),  # (N, 3, H, W)
                     (plan.query, self.allocate((len(plan.query),) + shape))]  # (M, 3, H, W)
            tasks = [DecodeTask(plan.index, plan.source_index, samples[i:i + step], images, i)
                     for samples, images in parts for i in range(0, len(samples), step)]
            self.pending[plan.index] = [plan, parts[0][1], parts[1][1], len(tasks)]
            yield from tasks


class _DecodeDataset(Dataset):
    """Worker side: a DecodeTask is read and decoded in place; only an acknowledgement travels back."""

    def __init__(self, readers: Sequence[SourceReader], image_size: int, dct_scale: bool):
        self.readers, self.image_size, self.dct_scale = list(readers), image_size, dct_scale

    def __getitem__(self, task: DecodeTask) -> int:
        reader = self.readers[task.source_index]
        out = task.images.numpy()
        for row, sample in enumerate(task.samples.tolist(), start=task.start):
            try:
                decode_resize_into(reader.read(sample), out[row], self.image_size, dct_scale=self.dct_scale)
            except ValueError as e:
                raise ValueError(f"{reader.locate(sample)}: {e}") from None
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
        self._sampler = _TaskSampler(self.planner, cfg.image_size, cfg.images_per_task, shared=workers > 0)
        self._loader = DataLoader(
            _DecodeDataset(self.readers, cfg.image_size, cfg.dct_scale), sampler=self._sampler,
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
