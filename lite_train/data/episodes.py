"""Episode plans: converted sources + seed in, EpisodePlans (which stored samples form each episode) out.

Planning is pure NumPy and cheap (thousands of plans per second): MD's description sampler picks classes and
shots, the per-class streams pick the images (cursor + flush). It runs sequentially in the main process, so
episode i is a function of (seed, i) alone; `lite_train.data.loader` turns plans into pixels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from lite_train.data.class_stream import ORDERS, ClassStream
from lite_train.data.episode_description import (EpisodeDescriptionConfig, EpisodeDescriptionSampler,
                                                 sampler_rngs)
from manifests import FilePool, SourceReader, open_source
from manifests.reader import DEFAULT_MAX_OPEN_FILES
from manifests.md_spec import MDSpec, parse_md_spec, spec_view

_SOURCE_CHOICE_STREAM = 0x5C  # SeedSequence spawn keys: independent streams derived from one seed
_IMAGE_ORDER_STREAM = 0x1A


def derived_rng(seed: int, *key: int) -> np.random.RandomState:
    """A RandomState for one purpose, derived from the run seed in this one place."""
    return np.random.RandomState(np.random.SeedSequence([seed, *key]).generate_state(4))


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
    """Which stored samples make up one episode."""

    index: int  # position in the episode stream
    source: str  # source name
    source_index: int  # position in the planner's source list
    description: tuple  # ((split-relative class id, support shots, query shots), ...) as MD returns it
    class_ids: np.ndarray  # (ways,) absolute class ids in description order: label i <-> class_ids[i]
    support: np.ndarray  # (N,) global sample indices, grouped by class in description order
    query: np.ndarray  # (M,) likewise

    @property
    def support_labels(self) -> np.ndarray:  # (N,)
        return np.repeat(np.arange(len(self.description)), [k for _, k, _ in self.description])

    @property
    def query_labels(self) -> np.ndarray:  # (M,)
        return np.repeat(np.arange(len(self.description)), [q for _, _, q in self.description])


def sampling_spec(reader: SourceReader, view: str = "md-v1") -> MDSpec:
    """The MDSpec the episode sampler uses for a converted source in a benchmark view ("md-v1" | "md-v2"),
    checked against its manifest. The view is applied here, to the spec the source was converted with
    (`manifests.md_spec.spec_view`), so one converted copy serves every view."""
    info = reader.info
    if info.benchmark != "md-v1":
        raise ValueError(f"{reader.path}: converted in the {info.benchmark} view by an older lite-convert; "
                         f"convert it again (the view is now chosen when reading)")
    raw = info.sampling_spec or info.dataset_spec
    if raw is None:
        raise ValueError(f"{reader.path}: source.json holds no dataset spec to sample episodes from")
    spec = spec_view(parse_md_spec(raw, origin=f"{reader.path}/source.json"), view)
    counts = reader.classes["num_images"].to_numpy()
    if spec.num_classes != len(counts) or tuple(counts.tolist()) != tuple(spec.images_per_class):
        raise ValueError(f"{reader.path}: the sampling spec's class counts differ from classes.parquet")
    return spec


class EpisodePlanner:
    """The deterministic stream of episode plans over one or several sources.

    Multi-source (MD `make_multisource_episode_pipeline`): each episode's source is drawn uniformly; each
    source keeps its own description sampler and class cursors. Description samplers are seeded as MD
    seeds them after `sampling.RNG.seed(seed)`, in source order, so descriptions match MD's bit for bit.

    Args:
        readers: the converted sources, in a fixed order.
        split: "train" | "valid" | "test".
        seed: the run seed; every random choice derives from it.
        config: the episode description law (MD defaults: variable way and shot).
        order: per-pass image order, "md" (shuffle-buffer emulation) or "uniform".
        num_episodes: stream length (None = infinite).
        start: first episode index; plans before it are replayed (cheap) so a resumed run continues
            exactly where it stopped.
        use_hierarchy: False ignores the DAG / bilevel ontology (MD's ignore_*_ontology).
        view: the benchmark view of the class splits, "md-v1" (each source's own spec) or "md-v2"
            (LITE's: ImageNet flat with 1000 train classes, MNIST a training source).
    """

    def __init__(self, readers: Sequence[SourceReader], split: str, seed: int,
                 config: EpisodeDescriptionConfig = EpisodeDescriptionConfig(), *, order: str = "md",
                 num_episodes: int | None = None, start: int = 0, use_hierarchy: bool = True,
                 view: str = "md-v1"):
        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {ORDERS}")
        if not use_hierarchy:
            config = config.without_hierarchy()
        self.readers = list(readers)
        self.split, self.seed, self.config, self.order = split, seed, config, order
        self.num_episodes, self.start = num_episodes, start
        self.specs = [sampling_spec(r, view) for r in self.readers]
        # Fail now, not in the first episode: building a sampler checks the split against the config.
        for spec, rng in zip(self.specs, sampler_rngs(seed, len(self.specs))):
            EpisodeDescriptionSampler(spec, split, config, rng)
        for reader, spec in zip(self.readers, self.specs):
            check_class_sizes(reader.name, spec, split, config)

    def __len__(self) -> int:
        if self.num_episodes is None:
            raise TypeError("an infinite episode stream has no length")
        return self.num_episodes - self.start

    def __iter__(self) -> Iterator[EpisodePlan]:
        """Each iteration restarts the stream at `start`, with the same plans."""
        samplers = [EpisodeDescriptionSampler(spec, self.split, self.config, rng)
                    for spec, rng in zip(self.specs, sampler_rngs(self.seed, len(self.specs)))]
        source_rng = derived_rng(self.seed, _SOURCE_CHOICE_STREAM)
        image_rngs = [derived_rng(self.seed, _IMAGE_ORDER_STREAM, i) for i in range(len(self.readers))]
        streams: list[dict[int, ClassStream]] = [{} for _ in self.readers]
        index = 0
        while self.num_episodes is None or index < self.num_episodes:
            s = int(source_rng.randint(len(self.readers))) if len(self.readers) > 1 else 0
            description = samplers[s].sample()
            plan = self._select_images(index, s, description, streams[s], image_rngs[s])
            if index >= self.start:
                yield plan
            index += 1

    def _select_images(self, index: int, s: int, description: tuple, streams: dict[int, ClassStream],
                       rng: np.random.RandomState) -> EpisodePlan:
        reader, spec = self.readers[s], self.specs[s]
        offset = spec.split_offset(self.split)
        class_ids = np.array([offset + rel for rel, _, _ in description], dtype=np.int64)
        support, query = [], []
        for class_id, (_, shots, num_query) in zip(class_ids, description):
            first, count = reader.class_range(int(class_id))
            stream = streams.get(int(class_id))
            if stream is None:
                stream = streams[int(class_id)] = ClassStream(count, self.order, rng)
            picked = first + stream.take(shots + num_query)  # (shots + q,) global sample indices
            support.append(picked[:shots])
            query.append(picked[shots:])
        return EpisodePlan(index, reader.name, s, description, class_ids,
                           np.concatenate(support), np.concatenate(query))


def images_needed(config: EpisodeDescriptionConfig) -> int:
    """Fewest images a class must have for every episode that may draw it: support + query shots, each
    at least 1 when sampled (MD: 2 with variable shots; fixed k shots + q query: k + q)."""
    support = config.num_support if isinstance(config.num_support, int) else \
        config.num_support[1] if config.num_support is not None else 1
    return support + (config.num_query if config.num_query is not None else 1)


def check_class_sizes(source: str, spec: MDSpec, split: str, config: EpisodeDescriptionConfig) -> None:
    """Raise ValueError naming the source, split and class when a class that episodes may draw holds fewer
    images than an episode can need: MD raises only when an episode draws it, maybe hours into a run.
    Classes below `min_examples_in_class` are never drawn and pass."""
    need = images_needed(config)
    for class_id in spec.split_class_ids(split):
        count = spec.images_per_class[class_id]
        if config.min_examples_in_class <= count < need:
            raise ValueError(
                f"source {source}, split {split}: class {class_id} ({spec.class_names[class_id]}) has {count} "
                f"image{'s' if count != 1 else ''}, an episode can need {need}: set min_examples_in_class to "
                f"{need} to skip such classes (MD's option), ask for fewer shots, or move the class out of the "
                f"{split} split in the dataset spec and convert again")


def open_readers(data: str | Path, sources: Sequence[str], max_open_files: int = DEFAULT_MAX_OPEN_FILES,
                 verify_checksums: bool = True) -> list[SourceReader]:
    """Open converted sources sharing one bounded file pool (per process, also after pickling)."""
    pool = FilePool(max_open_files)
    return [open_source(data, name, pool=pool, verify_checksums=verify_checksums) for name in sources]
