"""EpisodePlans in, Episodes out: the episode front-end of the decode engine (`lite_train.data.engine`).

    EpisodePlanner   seed, sources  -> EpisodePlan  (main process: which samples, in episode order)
    EpisodeLoader    EpisodePlan    -> ImageJob     (this process's episodes: support rows, then query rows)
    DecodeEngine     ImageJob       -> images       (workers decode into recycled shared buffers)
    EpisodeLoader    plan + images  -> Episode      (support / query views, labels from the plan)

Planning stays sequential in the main process, so the content of episode i is the same for any number of
workers; an episode's buffer is reused only once nothing references it (`lite_train.data.buffers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from typing import Iterator, TypedDict

import numpy as np
import torch

from lite_train.data.engine import DecodeEngine, EngineConfig, ImageJob
from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.episodes import EpisodePlan, EpisodePlanner, open_readers
from manifests import SourceReader
from manifests.reader import DEFAULT_MAX_OPEN_FILES
from manifests.schema import SOURCE_FILE

# MD's largest variable-shot episode: <= 500 support + <= 10 query x <= 50 ways
MAX_EPISODE_IMAGES = 1000


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
    images_per_task: int = 64  # images one worker decodes per DataLoader item (lite_train.data.engine)
    # DataLoader items queued ahead (8 x 64 images ~ one MD episode; more gave no more images/s and more shared
    # episode memory, docs/architecture.md "Workers")
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
        self.engine = DecodeEngine(self.readers, EngineConfig(
            image_size=cfg.image_size, num_workers=cfg.num_workers, images_per_task=cfg.images_per_task,
            tasks_in_flight=cfg.tasks_in_flight, dct_scale=cfg.dct_scale,
            multiprocessing_context=cfg.multiprocessing_context, min_rows=MAX_EPISODE_IMAGES,
            buffer_name="lite-train-episode"))
        self._pin = cfg.pin_memory and torch.cuda.is_available()
        self._live: weakref.WeakSet = weakref.WeakSet()  # iterations started and not yet ended
        self._closed = False

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

    def _jobs(self, plans: dict[int, EpisodePlan]) -> Iterator[ImageJob]:
        """This process's plans as jobs (support rows, then query rows); `plans` keeps each until yielded."""
        for plan in self.planner:
            if plan.index % self.cfg.world_size != self.cfg.rank:  # another process's (planning is cheap)
                continue
            plans[plan.index] = plan
            samples = np.concatenate([plan.support, plan.query])  # (N + M,)
            yield ImageJob(plan.index, np.full(len(samples), plan.source_index), samples)

    def _iterate(self) -> Iterator[Episode]:
        plans: dict[int, EpisodePlan] = {}
        for job, images in self.engine.run(self._jobs(plans)):
            plan = plans.pop(job.index)
            n = len(plan.support)
            self._next = (plan.index // self.cfg.world_size + 1) * self.cfg.world_size
            yield _episode(plan, images[:n], images[n:], self._pin)

    def close(self) -> None:
        """End every live iteration (their workers stop), drop the shared episode memory and close the
        shard descriptors. Episodes already yielded stay valid; iterating again raises RuntimeError."""
        self._closed = True
        for iteration in list(self._live):
            iteration.close()
        self.engine.close()

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
