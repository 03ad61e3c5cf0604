"""MDSpec + split + seed -> a stream of episode descriptions as JSON-ready lists (`lite-train describe`)."""

from __future__ import annotations

from typing import Iterator

from lite_train.data.episode_description import (
    EpisodeDescriptionConfig,
    EpisodeDescriptionSampler,
    sampler_rngs,
)
from manifests.md_spec import MDSpec


def describe(spec: MDSpec, split: str, seed: int, count: int, ignore_hierarchy: bool,
             config: EpisodeDescriptionConfig | None = None) -> Iterator[list]:
    """Yields `count` descriptions, each `[[rel_class_id, support_shots, query_shots], ...]`.

    The sampler is seeded as MD seeds its first sampler after `sampling.RNG.seed(seed)`, so the
    output equals MD's `sample_episode_description()` sequence for the same spec, split and config.

    Args:
      spec: the source's MDSpec.
      split: "train" | "valid" | "test".
      seed: master seed (MD's `sampling.RNG.seed(seed)`).
      count: number of descriptions.
      ignore_hierarchy: sample classes uniformly even if the spec has a DAG or bilevel ontology
        (sets `ignore_dag_ontology` and `ignore_bilevel_ontology`).
      config: episode parameters; MD's variable way/shot defaults when None.
    """
    config = config or EpisodeDescriptionConfig()
    if ignore_hierarchy:
        config = config.without_hierarchy()
    sampler = EpisodeDescriptionSampler(spec, split, config, sampler_rngs(seed, 1)[0])
    for _ in range(count):
        yield [list(entry) for entry in sampler.sample()]
