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
import hashlib
import math
import os
import signal
import warnings
import weakref
from typing import Iterator, Sequence, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from lite_train.data.decode import compile_resize, decode_resize_into
from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.episodes import EpisodePlan, EpisodePlanner, open_readers
from manifests import SourceReader
from manifests.reader import DEFAULT_MAX_OPEN_FILES, ChecksumError
from manifests.schema import SOURCE_FILE


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
    # Class-split view: "md-v1" = each source's own spec (MD's); "md-v2" = LITE's training view (ImageNet flat,
    # all 1000 classes train; MNIST train). Not "md-v2" by default: it changes ImageNet's classes silently.
    view: str = "md-v1"
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
    # Check every image's bytes against the manifest's crc32 before decoding (ChecksumError names source,
    # shard, key and row). Off only to measure its cost (BENCHMARKS.md).
    verify_checksums: bool = True
    # Worker start method: None = the platform default (fork on Linux); "spawn" / "forkserver" where forking
    # is unavailable or unsafe (macOS, some clusters). Workers then re-open the sources themselves.
    multiprocessing_context: str | None = None
    # Data-parallel training: this process yields the global episodes i with i % world_size == rank, so the
    # stream of episodes (and what each optimizer step sees) is the same for any number of processes.
    rank: int = 0
    world_size: int = 1


# The fields that decide the content of the episode stream: a resumed loader must agree on all of them.
_STREAM_FIELDS = ("sources", "split", "seed", "image_size", "order", "use_hierarchy", "view", "num_episodes",
                  "dct_scale")


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    """Decode `samples` of source `source_index` into `images[start : start + len(samples)]`."""

    episode: int
    source_index: int
    samples: np.ndarray  # (k,) global sample indices
    images: torch.Tensor  # (capacity, 3, H, W): the episode's buffer, support rows then query rows
    start: int


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Warn about a fallback once per process (it would otherwise repeat for every episode)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _shared_empty(shape: tuple[int, ...], name: str = "lite-train-episode") -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory whose pages are committed only when first written
    (`name`: the memfd's name, what /proc/<pid>/maps shows; the ordered front-end names its batch buffers).

    torch's own shared allocation (`share_memory_()`, `UntypedStorage._new_shared`) reserves the whole size
    up front (fallocate): a 1000-row 224-px episode buffer would cost 600 MB before any image is written to
    it. An anonymous memfd is sparse; workers receive it like any torch shared storage (by descriptor).
    """
    nbytes = math.prod(shape) * 4
    if nbytes == 0:
        return torch.empty(shape).share_memory_()
    if not hasattr(os, "memfd_create") or not hasattr(torch.UntypedStorage, "_new_shared_fd_cpu"):
        _warn_once("memfd", "lite-train loader: no os.memfd_create or torch.UntypedStorage._new_shared_fd_cpu "
                            "here; episode buffers commit their whole size up front (share_memory_)")
        return torch.empty(shape).share_memory_()
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # maps a duplicate of fd
    finally:
        os.close(fd)
    return torch.empty(0).set_(storage, 0, shape)


def _storage_users(tensor: torch.Tensor) -> int | None:
    """How many tensors (views included) share `tensor`'s storage, or None where torch cannot tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        _warn_once("use_count", "lite-train loader: this torch has no torch._C._storage_Use_Count; episode "
                                "buffers cannot be recycled, every episode gets fresh memory")
        return None
    return use_count(tensor.untyped_storage()._cdata)


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

    def clear(self) -> None:
        """Drop every buffer (one still referenced by an episode lives on as long as that episode)."""
        self.buffers.clear()


class _TaskSampler(Sampler):
    """Main process, one per iteration: turns each plan into image views + decode tasks; remembers that
    iteration's pending episodes (so two live iterations over one loader never share them)."""

    def __init__(self, planner: EpisodePlanner, pool: _BufferPool, images_per_task: int, rank: int = 0,
                 world_size: int = 1):
        self.planner, self.pool, self.images_per_task = planner, pool, images_per_task
        self.rank, self.world_size = rank, world_size
        # episode index -> [plan, support images, query images, tasks not yet done]
        self.pending: dict[int, list] = {}

    def __iter__(self) -> Iterator[DecodeTask]:
        self.pending.clear()
        step = self.images_per_task
        for plan in self.planner:
            if plan.index % self.world_size != self.rank:  # another process's episode (planning is cheap)
                continue
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
            except ChecksumError:
                raise  # already names source, shard, key and row
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
    # A signal to the whole process group (Ctrl-C in a terminal, `timeout`, a cluster's SIGTERM before
    # preemption) is the main process's to handle: the trainer finishes its task, checkpoints, then shuts the
    # workers down. torch's worker start-up makes SIGTERM fatal, so without this the workers die first and
    # the main process fails on a dead worker instead of checkpointing. Workers still end with the main
    # process (the loader's shutdown, or torch's watchdog when the main process is gone).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    Every iteration has its own workers and pending episodes, so several may be live at once (a trainer's
    training iterator while validation iterates). Shared episode memory is held only while an iteration is
    live: when the last one ends (exhausted, `break`, garbage-collected) or on `close()` / `with` exit, the
    loader drops its buffers; episodes the consumer still holds stay valid.

    Args:
        cfg: the loader config.
        description: the episode description law (MD's defaults: variable way and shot).
    """

    def __init__(self, cfg: EpisodeLoaderConfig,
                 description: EpisodeDescriptionConfig = EpisodeDescriptionConfig()):
        if cfg.images_per_task < 1 or cfg.tasks_in_flight < 1:
            raise ValueError("images_per_task and tasks_in_flight must be positive")
        if not 0 <= cfg.rank < cfg.world_size:
            raise ValueError(f"rank {cfg.rank} is not in [0, world_size={cfg.world_size})")
        self.cfg, self.description = cfg, description
        self._next = cfg.start  # global index the stream continues at (see state_dict)
        self.readers = open_readers(cfg.data, cfg.sources, cfg.max_open_files,
                                    verify_checksums=cfg.verify_checksums)
        if cfg.verify_checksums:  # load the crc32 columns here: forked workers share them copy-on-write
            for reader in self.readers:
                reader.checksums
        self.planner = EpisodePlanner(self.readers, cfg.split, cfg.seed, description, order=cfg.order,
                                      num_episodes=cfg.num_episodes, start=cfg.start,
                                      use_hierarchy=cfg.use_hierarchy, view=cfg.view)
        workers = cfg.num_workers
        compile_resize()  # here, so that forked workers inherit the compiled kernel
        # Buffers in use at once: one per episode with tasks in flight, the one being assembled, the one
        # the consumer holds.
        buffers = cfg.tasks_in_flight + 2
        self._pool = _BufferPool((3, cfg.image_size, cfg.image_size), workers > 0, buffers)
        self._dataset = _DecodeDataset(self.readers, cfg.image_size, cfg.dct_scale, keep_mapped=buffers)
        self._pin = cfg.pin_memory and torch.cuda.is_available()
        self._live: weakref.WeakSet = weakref.WeakSet()  # iterations started and not yet ended
        self._closed = False

    def _data_loader(self, sampler: _TaskSampler) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            self._dataset, sampler=sampler, batch_size=None, num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            multiprocessing_context=self.cfg.multiprocessing_context if workers else None,
            prefetch_factor=max(1, math.ceil(self.cfg.tasks_in_flight / workers)) if workers else None)

    def __len__(self) -> int:
        total = len(self.planner)  # episodes from start on, over all ranks
        first = self.planner.start + (self.cfg.rank - self.planner.start) % self.cfg.world_size
        return max(0, -(-(self.planner.start + total - first) // self.cfg.world_size))

    def state_dict(self) -> dict:
        """Where the stream stands, for a bit-exact resume: the stream-deciding config (the fields in
        `_STREAM_FIELDS` and the description law), the next global episode index after the episodes
        yielded so far (rounded up to the next round of `world_size` episodes), and each source's
        fingerprint. Plain Python values only."""
        return {"config": {k: _plain(getattr(self.cfg, k)) for k in _STREAM_FIELDS},
                "description": _plain(dataclasses.asdict(self.description)),
                "next_episode": self._next,
                "fingerprints": {r.name: source_fingerprint(r) for r in self.readers}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream at `state["next_episode"]` (the next iteration starts there).

        Raises:
            ValueError: the saved stream config, description law or a source's fingerprint differs from
                this loader's (names what differs): the resumed run would see other episodes.
        """
        mine = self.state_dict()
        for key in ("config", "description", "fingerprints"):
            if state.get(key) != mine[key]:
                diff = sorted(k for k in set(mine[key]) | set(state.get(key) or {})
                              if (state.get(key) or {}).get(k) != mine[key].get(k))
                raise ValueError(f"saved loader state differs from this loader in {key}: {', '.join(diff)}")
        self._next = self.planner.start = int(state["next_episode"])

    def __iter__(self) -> Iterator[Episode]:
        if self._closed:
            raise RuntimeError("this EpisodeLoader is closed")
        iteration = self._iterate()
        self._live.add(iteration)
        return iteration

    def _iterate(self) -> Iterator[Episode]:
        sampler = _TaskSampler(self.planner, self._pool, self.cfg.images_per_task, self.cfg.rank,
                               self.cfg.world_size)
        pending = sampler.pending
        acks = iter(self._data_loader(sampler))
        try:
            for episode_index in acks:  # acknowledgements, in task order
                entry = pending[int(episode_index)]
                entry[3] -= 1
                if entry[3] == 0:
                    plan, support, query, _ = pending.pop(int(episode_index))
                    self._next = (plan.index // self.cfg.world_size + 1) * self.cfg.world_size
                    yield _episode(plan, support, query, self._pin)
        finally:
            # Stop this iteration's workers now rather than when the iterator is collected, then give the
            # shared memory back once no other iteration is live.
            shutdown = getattr(acks, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            pending.clear()
            del acks, sampler, pending
            if not any(it.gi_suspended for it in list(self._live)):  # started, not ended (not this one)
                self._pool.clear()

    def close(self) -> None:
        """End every live iteration (their workers stop), drop the shared episode memory and close the
        shard descriptors. Episodes already yielded stay valid; iterating again raises RuntimeError."""
        self._closed = True
        for iteration in list(self._live):
            iteration.close()
        self._pool.clear()
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> "EpisodeLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(value):
    """JSON-like form of a config value (tuples as lists), so saved and live states compare equal."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def source_fingerprint(reader: SourceReader) -> str:
    """sha256 of a source's `source.json` (shard names, sizes, counts, spec): changes if the data does."""
    return hashlib.sha256((reader.path / SOURCE_FILE).read_bytes()).hexdigest()


def make_episode_loader(cfg: EpisodeLoaderConfig,
                        description: EpisodeDescriptionConfig = EpisodeDescriptionConfig()) -> EpisodeLoader:
    """The episode loader for a config (one call: what the CLIs and the trainer use)."""
    return EpisodeLoader(cfg, description)
