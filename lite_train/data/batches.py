"""Converted sources + seed in, supervised image batches out: the pretraining front-end of the decode engine.

    BatchPlanner   sources, split, view, seed -> class table (every class of `split`, over the sources in
                                                 order = label 0..C-1) and two pools of samples: training and
                                                 held out (a seeded `holdout` fraction of every class)
                   epoch e                    -> BatchPlans: a seeded permutation of the training pool cut
                                                 into batches of `batch_size` (the last partial one dropped)
    BatchLoader    BatchPlan                  -> ImageJob -> DecodeEngine -> Batch {images, labels, ...}

Only samples of `split`'s classes (in the chosen view) are ever planned, so pretraining on the training
split never reads a validation or test image. Batch b of epoch e depends only on (seed, e, b): the same for
any number of workers, and a resumed run continues at (e, b). With several processes (torchrun), process r
of K gets rows [r·B/K, (r+1)·B/K) of every global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterator, Sequence, TypedDict

import numpy as np
import torch

from lite_train.data.engine import DecodeEngine, EngineConfig, ImageJob
from lite_train.data.episodes import derived_rng, open_readers, sampling_spec
from manifests import SourceReader
from manifests.reader import DEFAULT_MAX_OPEN_FILES
from manifests.schema import SOURCE_FILE

_HOLDOUT_STREAM = 0x40  # SeedSequence keys: independent streams derived from one seed
_EPOCH_STREAM = 0xE9
_CALIBRATION_STREAM = 0xBA


@dataclasses.dataclass(frozen=True)
class BatchLoaderConfig:
    """Everything that decides which batches a BatchLoader yields and how they look."""

    data: str  # root of converted sources
    sources: tuple[str, ...]  # source names; labels number their `split` classes in this order
    split: str = "train"  # whose classes are read: pretraining uses "train" only
    view: str = "md-v2"  # class-split view (see EpisodeLoaderConfig.view)
    seed: int = 0
    image_size: int = 84
    batch_size: int = 64  # global batch size (all processes together)
    holdout: float = 0.1  # fraction of every class's images kept out of training, for validation
    num_workers: int = 2
    pin_memory: bool = False
    images_per_task: int = 64
    tasks_in_flight: int = 8
    max_open_files: int = DEFAULT_MAX_OPEN_FILES
    verify_checksums: bool = True  # every image's bytes against the manifest's crc32 (ChecksumError)
    multiprocessing_context: str | None = None
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (batch statistics), got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of the number of processes "
                             f"{self.world_size}")


# The fields that decide the content of the batch stream: a resumed loader must agree on all of them.
_STREAM_FIELDS = ("sources", "split", "view", "seed", "image_size", "batch_size", "holdout")


class Batch(TypedDict):
    """One batch as the loader yields it. Images are float32 in [-1, 1], NCHW."""

    index: int  # global batch index: epoch * batches_per_epoch + position (holdout / calibration: position)
    epoch: int  # -1 for holdout and calibration batches
    images: torch.Tensor  # (B, 3, S, S)
    labels: torch.Tensor  # (B,) int64 class label 0..C-1 (BatchPlanner.classes order)
    sources: torch.Tensor  # (B,) int64 source index
    samples: torch.Tensor  # (B,) int64 sample index within its source


@dataclasses.dataclass(frozen=True)
class ClassTable:
    """The classes of one split over several sources; label i is row i."""

    source: np.ndarray  # (C,) source index
    class_id: np.ndarray  # (C,) absolute class id within its source
    first: np.ndarray  # (C,) first global sample index of the class
    count: np.ndarray  # (C,) images of the class
    names: tuple[str, ...]  # (C,) "<source>/<class name>"


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Samples as parallel arrays, grouped by label."""

    source: np.ndarray  # (P,) source index
    sample: np.ndarray  # (P,) sample index within the source
    label: np.ndarray  # (P,) label


class BatchPlanner:
    """The deterministic batches of a split's classes (module docstring).

    Raises:
        ValueError: a source has no classes in `split`, or fewer training images than one batch.
    """

    def __init__(self, readers: Sequence[SourceReader], cfg: BatchLoaderConfig):
        self.cfg = cfg
        rows = []
        for s, reader in enumerate(readers):
            spec = sampling_spec(reader, cfg.view)
            ids = spec.split_class_ids(cfg.split)
            if len(ids) == 0:
                raise ValueError(f"source {reader.name} has no {cfg.split} classes in the {cfg.view} view")
            for c in ids:
                first, count = reader.class_range(c)
                rows.append((s, c, first, count, f"{reader.name}/{spec.class_names[c]}"))
        source, class_id, first, count, names = zip(*rows)
        self.classes = ClassTable(np.array(source, np.int64), np.array(class_id, np.int64),
                                  np.array(first, np.int64), np.array(count, np.int64), tuple(names))
        self.train, self.held_out = self._pools(len(readers))
        self.batches_per_epoch = len(self.train.sample) // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.train.sample)} training images in {', '.join(cfg.sources)}: fewer than "
                             f"one batch of {cfg.batch_size}")

    def _pools(self, num_sources: int) -> tuple[_Pool, _Pool]:
        """Per class, a seeded choice of round(holdout · n) images (at least one when holdout > 0, none for a
        class of one image) is held out; the rest train."""
        rngs = [derived_rng(self.cfg.seed, _HOLDOUT_STREAM, s) for s in range(num_sources)]
        train, held = [], []
        for label, (s, first, n) in enumerate(zip(self.classes.source, self.classes.first, self.classes.count)):
            order = rngs[s].permutation(int(n))  # (n,) positions within the class
            k = 0 if self.cfg.holdout == 0 or n < 2 else min(n - 1, max(1, round(self.cfg.holdout * n)))
            for part, positions in ((held, np.sort(order[:k])), (train, np.sort(order[k:]))):
                part.append((np.full(len(positions), s), first + positions, np.full(len(positions), label)))

        def pool(parts) -> _Pool:
            return _Pool(*(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3)))

        return pool(train), pool(held)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """(global index, epoch, pool rows (B,)) of the training batches of `epoch` from position `start`."""
        order = derived_rng(self.cfg.seed, _EPOCH_STREAM, epoch).permutation(len(self.train.sample))  # (P,)
        b = self.cfg.batch_size
        for position in range(start, self.batches_per_epoch):
            yield epoch * self.batches_per_epoch + position, epoch, order[position * b:(position + 1) * b]

    def held_out_batches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """The held-out pool in order, in batches of `batch_size` (the last one may be smaller)."""
        n, b = len(self.held_out.sample), self.cfg.batch_size
        for position, start in enumerate(range(0, n, b)):
            yield position, -1, np.arange(start, min(start + b, n))

    def calibration_batches(self, count: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """`count` full batches of training images in a seeded order of their own (BN statistics)."""
        order = derived_rng(self.cfg.seed, _CALIBRATION_STREAM).permutation(len(self.train.sample))
        b = self.cfg.batch_size
        for position in range(min(count, len(order) // b)):
            yield position, -1, order[position * b:(position + 1) * b]


class BatchLoader:
    """Batches (see `Batch`) over the classes of one split, decoded by worker processes (identical for any
    `num_workers`). `epoch(e)` yields the training batches of epoch e (this process's rows of each),
    `held_out()` the held-out images, `calibration(k)` k shuffled training batches.
    Use as a context manager (or call `close()`) to free the shared image memory and the shard descriptors.
    """

    def __init__(self, cfg: BatchLoaderConfig):
        self.cfg = cfg
        self.readers = open_readers(cfg.data, cfg.sources, cfg.max_open_files,
                                    verify_checksums=cfg.verify_checksums)
        if cfg.verify_checksums:  # load the crc32 columns here: forked workers share them copy-on-write
            for reader in self.readers:
                reader.checksums
        self.planner = BatchPlanner(self.readers, cfg)
        self.engine = DecodeEngine(self.readers, EngineConfig(
            image_size=cfg.image_size, num_workers=cfg.num_workers, images_per_task=cfg.images_per_task,
            tasks_in_flight=cfg.tasks_in_flight, multiprocessing_context=cfg.multiprocessing_context,
            min_rows=math.ceil(cfg.batch_size / cfg.world_size), buffer_name="lite-train-batch"))
        self._pin = cfg.pin_memory and torch.cuda.is_available()

    @property
    def num_classes(self) -> int:
        return len(self.planner.classes.count)

    @property
    def batches_per_epoch(self) -> int:
        return self.planner.batches_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This process's part of the training batches of `epoch`, from position `start`."""
        return self._run(self.planner.epoch(epoch, start), self.planner.train, split_ranks=True)

    def held_out(self) -> Iterator[Batch]:
        """Every held-out image once, in a fixed order (not split between processes)."""
        return self._run(self.planner.held_out_batches(), self.planner.held_out, split_ranks=False)

    def calibration(self, count: int) -> Iterator[Batch]:
        """`count` whole training batches in a seeded order (not split between processes)."""
        return self._run(self.planner.calibration_batches(count), self.planner.train, split_ranks=False)

    def _run(self, plans, pool: _Pool, split_ranks: bool) -> Iterator[Batch]:
        planned: dict[int, tuple[int, np.ndarray]] = {}  # job index -> (epoch, pool rows) until yielded

        def jobs() -> Iterator[ImageJob]:
            k, r = self.cfg.world_size, self.cfg.rank
            for index, epoch, rows in plans:
                if split_ranks and k > 1:
                    rows = rows[r * len(rows) // k:(r + 1) * len(rows) // k]
                planned[index] = epoch, rows
                yield ImageJob(index, pool.source[rows], pool.sample[rows])

        for job, images in self.engine.run(jobs()):
            epoch, rows = planned.pop(job.index)
            if self._pin:
                images = images.pin_memory()
            yield Batch(index=job.index, epoch=epoch, images=images, labels=torch.from_numpy(pool.label[rows]),
                        sources=torch.from_numpy(pool.source[rows]), samples=torch.from_numpy(pool.sample[rows]))

    def state_dict(self) -> dict:
        """The stream-deciding config and each source's fingerprint (a resume must agree on both)."""
        return {"config": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in ((k, getattr(self.cfg, k)) for k in _STREAM_FIELDS)},
                "fingerprints": {r.name: hashlib.sha256((r.path / SOURCE_FILE).read_bytes()).hexdigest()
                                 for r in self.readers}}

    def check_state(self, state: dict, origin: str) -> None:
        """Raises ValueError naming what differs when `state` (from `state_dict`) is not this loader's."""
        mine = self.state_dict()
        for key in ("config", "fingerprints"):
            if state.get(key) != mine[key]:
                diff = sorted(k for k in set(mine[key]) | set(state.get(key) or {})
                              if (state.get(key) or {}).get(k) != mine[key].get(k))
                raise ValueError(f"{origin}: the saved batch stream differs from this one in {key}: "
                                 f"{', '.join(diff)}")

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
