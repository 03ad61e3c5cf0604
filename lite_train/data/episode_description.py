"""MDSpec + split + EpisodeDescriptionConfig + RandomState -> episode descriptions, bit-exact with MD.

A description is a tuple of `(split-relative class id, support shots, query shots)`, one per class of
the episode, in label order. This is a NumPy port of Meta-Dataset's `meta_dataset/data/sampling.py`
(`EpisodeDescriptionSampler`): it issues the same `RandomState` calls in the same order (reference
§4.8), so a sampler seeded like MD's reproduces MD's descriptions exactly. The one change: MD's
ImageNet node pick, `rng.choice(list_of_lists)`, fails on NumPy >= 1.24 (ragged array); here it is
`rng.randint(0, n_nodes)`, which is what `choice` draws internally, so the stream is unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lite_train.data._dag import MAX_SPANNING_LEAVES_ELIGIBLE, eligible_node_leaves
from manifests.md_spec import MDSpec

__all__ = [
    "EpisodeDescriptionConfig",
    "EpisodeDescriptionSampler",
    "sampler_seed",
    "sampler_rngs",
    "compute_num_query",
    "sample_support_set_size",
    "sample_num_support_per_class",
    "MAX_SPANNING_LEAVES_ELIGIBLE",
]


def sampler_seed(seed: int) -> int:
    """The seed MD gives a sampler built right after `sampling.RNG.seed(seed)`.

    MD: `RandomState(seed=RNG.randint(0, 2**32, dtype='uint32'))` with `RNG` the module RandomState.
    """
    return int(np.random.RandomState(seed).randint(0, 2**32, dtype=np.uint32))


def sampler_rngs(seed: int, n: int) -> list:
    """RandomStates for `n` samplers built in order after `sampling.RNG.seed(seed)`.

    Sampler i is seeded with the i-th draw of the master stream `RandomState(seed)`, as MD does when a
    multi-source pipeline builds one sampler per source. `sampler_rngs(s, 1)[0]` is seeded with
    `sampler_seed(s)`.
    """
    master = np.random.RandomState(seed)
    return [np.random.RandomState(master.randint(0, 2**32, dtype=np.uint32)) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class EpisodeDescriptionConfig:
    """MD's `EpisodeDescriptionConfig` (defaults of `data_config_common.gin`, variable way and shot).

    `num_ways`, `num_support`, `num_query` = None means "sample it"; a fixed value overrides.
    """

    num_ways: int | None = None  # fixed number of classes, else U{min_ways..min(max_ways_upper_bound, C)}
    num_support: int | tuple | None = None  # fixed shots k, or (lo, hi): one k ~ U{lo..hi} per episode
    num_query: int | None = None  # fixed query shots per class, else computed (§4.4)
    min_ways: int = 5  # fewest classes per episode; also least classes a split must have
    max_ways_upper_bound: int = 50  # most classes per episode
    max_num_query: int = 10  # cap on the computed query shots per class
    max_support_set_size: int | None = 500  # cap on the support-set size S
    max_support_size_contrib_per_class: int | None = 100  # cap on one class's term in S, not its shots
    min_log_weight: float | None = math.log(0.5)  # class weights are n_c * exp(U[min, max))
    max_log_weight: float | None = math.log(2.0)
    min_examples_in_class: int = 0  # classes with fewer images are never sampled
    use_all_classes: bool = False  # every class of the split, in id order (no class sampling)
    ignore_dag_ontology: bool = False  # ImageNet: sample classes uniformly instead of by DAG node
    ignore_bilevel_ontology: bool = False  # Omniglot: sample classes uniformly instead of by alphabet
    ignore_hierarchy_probability: float = 0.0  # fraction of episodes that ignore the hierarchy

    def __post_init__(self):
        if isinstance(self.num_support, list):
            object.__setattr__(self, "num_support", tuple(self.num_support))
        if isinstance(self.num_support, tuple):
            if len(self.num_support) != 2 or not all(isinstance(v, int) for v in self.num_support) \
                    or self.num_support[0] > self.num_support[1]:
                raise ValueError(f"num_support range must be (lo, hi) ints with lo <= hi, "
                                 f"got {self.num_support}")
        # MD config.py: a sampled quantity needs all the parameters of its distribution.
        groups = {
            "num_ways": (self.num_ways, ("min_ways", "max_ways_upper_bound")),
            "num_query": (self.num_query, ("max_num_query",)),
            "num_support": (self.num_support, ("max_support_set_size",
                                               "max_support_size_contrib_per_class",
                                               "min_log_weight", "max_log_weight")),
        }
        for first, (value, required) in groups.items():
            missing = [name for name in required if getattr(self, name) is None]
            if value is None and missing:
                raise RuntimeError(f"The following arguments: {missing} can not be None, "
                                   f"since {first} is None.")
        if not 0.0 <= self.ignore_hierarchy_probability <= 1.0:
            raise ValueError(f"ignore_hierarchy_probability must be in [0, 1], "
                             f"got {self.ignore_hierarchy_probability}")

    def without_hierarchy(self) -> "EpisodeDescriptionConfig":
        """The same law with classes sampled uniformly: ImageNet DAG and Omniglot alphabets ignored."""
        return dataclasses.replace(self, ignore_dag_ontology=True, ignore_bilevel_ontology=True)


def compute_num_query(images_per_class: np.ndarray, max_num_query: int, num_support) -> int:
    """Query shots per class q, the same for every class of the episode (MD §4.4).

    Variable support: `q = min(max_num_query, min_c floor(n_c / 2))`.
    Fixed support k (or range (lo, hi), using k = hi): `q = min(max_num_query, min_c n_c - k)`.

    Raises:
      ValueError: a class has fewer than 2 images (variable) or at most k images (fixed).
    """
    if num_support is None:
        if images_per_class.min() < 2:
            raise ValueError("Expected at least 2 images per class.")
        return np.minimum(max_num_query, (images_per_class // 2).min())
    max_support = num_support if isinstance(num_support, int) else num_support[1]
    if (images_per_class - max_support).min() < 1:
        raise ValueError(f"Expected at least {max_support + 1} images per class")
    return np.minimum(max_num_query, images_per_class.min() - max_support)


def sample_support_set_size(num_remaining_per_class: np.ndarray, max_contrib_per_class: int,
                            max_support_set_size: int, rng: np.random.RandomState) -> float:
    """Support-set size S (MD §4.5); one `rng.uniform()` draw.

    With r_c = n_c - q and beta ~ U[0, 1):
    `S = min(sum_c floor(beta * min(max_contrib_per_class, r_c) + 1), max_support_set_size)`.
    Each term is >= 1, so S >= ways. Returned as a float, as in MD.

    Raises:
      ValueError: `max_support_set_size` is smaller than the number of ways.
    """
    if max_support_set_size < len(num_remaining_per_class):
        raise ValueError("max_support_set_size is too small to have at least one support example "
                         "per class.")
    beta = rng.uniform()
    contributions = np.minimum(max_contrib_per_class, num_remaining_per_class)
    return np.minimum(np.floor(beta * contributions + 1).sum(), max_support_set_size)


def sample_num_support_per_class(images_per_class: np.ndarray, num_remaining_per_class: np.ndarray,
                                 support_set_size: float, min_log_weight: float,
                                 max_log_weight: float, rng: np.random.RandomState) -> np.ndarray:
    """Support shots per class k_c (MD §4.6); one `rng.uniform(lo, hi, size=ways)` draw.

    u_c ~ U[min_log_weight, max_log_weight), w_c = n_c * exp(u_c) (total images n_c, not r_c),
    p_c = w_c / sum(w), `k_c = min(floor(p_c * (S - ways)) + 1, r_c)`. Nothing is redistributed, so
    sum(k_c) <= S.

    Raises:
      ValueError: S < ways, or some class has no image left after the query.
    """
    if support_set_size < len(num_remaining_per_class):
        raise ValueError("Requesting smaller support set than the number of ways.")
    if np.min(num_remaining_per_class) < 1:
        raise ValueError("Some classes have no remaining examples.")
    remaining_support_set_size = support_set_size - len(num_remaining_per_class)
    unnormalized = images_per_class * np.exp(
        rng.uniform(min_log_weight, max_log_weight, size=images_per_class.shape))
    proportions = unnormalized / unnormalized.sum()
    desired = np.floor(proportions * remaining_support_set_size).astype("int32") + 1
    return np.minimum(desired, num_remaining_per_class)


class EpisodeDescriptionSampler:
    """Samples episode descriptions for one split of one MD source (MD `EpisodeDescriptionSampler`).

    Class choice per episode (MD §4.3), in this order of precedence:

    * DAG (hierarchical spec, unless `ignore_dag_ontology`): with probability
      1 - ignore_hierarchy_probability, pick one eligible internal node uniformly; its leaves (wn_id
      order) are the classes, sub-sampled to `max_ways_upper_bound` without replacement if larger.
    * Bilevel (bilevel spec, unless `ignore_bilevel_ontology`): with the same probability, pick a
      superclass uniformly, ways ~ U{min_ways..min(max_ways_upper_bound, #its classes)}, then that many
      of its classes without replacement.
    * `use_all_classes`: every class of the split, in order.
    * Uniform: ways fixed or ~ U{min_ways..min(max_ways_upper_bound, #classes)}, classes without
      replacement among those with at least `min_examples_in_class` images.

    Then q (`compute_num_query`), and shots: fixed k, one k ~ U{lo..hi}, or S and k_c
    (`sample_support_set_size`, `sample_num_support_per_class`).

    Args:
      spec: the source's MDSpec.
      split: "train" | "valid" | "test".
      config: the EpisodeDescriptionConfig.
      rng: this sampler's own RandomState (see `sampler_seed`, `sampler_rngs`); it is advanced in place.

    Raises:
      ValueError: the split has fewer than `min_ways` usable classes, or the config and the spec's
        hierarchy are incompatible (as MD).
    """

    def __init__(self, spec: MDSpec, split: str, config: EpisodeDescriptionConfig,
                 rng: np.random.RandomState):
        if not isinstance(rng, np.random.RandomState):
            raise TypeError("rng must be a numpy.random.RandomState (MD's exact stream)")
        self.spec, self.split, self.config, self._rng = spec, split, config, rng
        class_ids = spec.split_class_ids(split)
        self._counts = np.array([spec.images_per_class[c] for c in class_ids], dtype=np.int64)
        self.num_classes = len(class_ids)
        keep = self._counts >= config.min_examples_in_class
        self._filtered_rel = np.flatnonzero(keep).astype(np.int64)
        n_filtered = len(self._filtered_rel)
        if config.min_ways and n_filtered < config.min_ways:
            raise ValueError(
                f'"min_ways" is set to {config.min_ways}, but split {split} of dataset {spec.name} '
                f"only has {n_filtered} classes with at least {config.min_examples_in_class} "
                f"examples ({self.num_classes} total), so it is not possible to create an episode "
                f"for it.")
        self.num_ways = config.num_ways
        if config.use_all_classes:
            if n_filtered != self.num_classes:
                raise ValueError(f'"use_all_classes" is not compatible with a value of '
                                 f'"min_examples_in_class" ({config.min_examples_in_class}) that '
                                 f"results in some classes being excluded.")
            self.num_ways = self.num_classes
        # MD's trainer turns on the hierarchy the spec has; the config's ignore_* switch it off.
        self.use_dag = spec.kind == "hierarchical" and not config.ignore_dag_ontology
        self.use_bilevel = spec.kind == "bilevel" and not config.ignore_bilevel_ontology
        p_ignore = config.ignore_hierarchy_probability
        self._hierarchy_p = [1.0 - p_ignore, p_ignore] if p_ignore else [1.0, 0.0]
        if self.use_bilevel:
            self._init_bilevel()
        elif self.use_dag:
            self._init_dag(keep)
        elif self.num_ways is not None and self.num_ways > n_filtered:
            raise ValueError(f"num_ways={self.num_ways} exceeds the {n_filtered} classes of split "
                             f"{split} of dataset {spec.name}.")

    def _init_bilevel(self) -> None:
        if self.num_ways is not None:
            raise ValueError('"use_bilevel_hierarchy" is incompatible with "num_ways".')
        if self.config.min_examples_in_class > 0:
            raise ValueError('"use_bilevel_hierarchy" is incompatible with "min_examples_in_class".')
        spec = self.spec
        self._superclass_ids = np.array(spec.split_superclass_ids(self.split), dtype=np.int64)
        for sc in self._superclass_ids:
            if spec.classes_per_superclass[sc] < self.config.min_ways:
                raise ValueError(f"Superclass: {sc} has num_classes="
                                 f"{spec.classes_per_superclass[sc]} < min_ways="
                                 f"{self.config.min_ways}.")
        # Split-relative id of each superclass's first class: classes are contiguous per superclass.
        starts = np.concatenate([[0], np.cumsum(spec.classes_per_superclass)])
        self._superclass_rel_start = {int(sc): int(starts[sc]) - spec.split_offset(self.split)
                                      for sc in self._superclass_ids}

    def _init_dag(self, keep: np.ndarray) -> None:
        if self.num_ways is not None:
            raise ValueError('"use_dag_hierarchy" is incompatible with "num_ways".')
        nodes = self.spec.raw["split_subgraphs"][self.split.upper()]
        self._node_leaves = eligible_node_leaves(nodes, keep, self.config.min_ways)
        if not self._node_leaves:
            raise ValueError("There are no classes eligible for participating in episodes. "
                             "Consider changing the value of `min_ways` or "
                             "MAX_SPANNING_LEAVES_ELIGIBLE.")

    def _use_hierarchy(self) -> bool:
        """One `random_sample()` draw: True with probability 1 - ignore_hierarchy_probability."""
        return bool(self._rng.choice([True, False], p=self._hierarchy_p))

    def sample_class_ids(self) -> np.ndarray:
        """Split-relative class ids of one episode, in label order (MD §4.3, RNG order §4.8)."""
        rng, cfg = self._rng, self.config
        if self.use_dag and self._use_hierarchy():
            # MD: rng.choice(list_of_leaf_lists); the same single randint, without a ragged array.
            leaves = self._node_leaves[rng.randint(0, len(self._node_leaves))]
            if len(leaves) > cfg.max_ways_upper_bound:
                leaves = rng.choice(leaves, size=[cfg.max_ways_upper_bound], replace=False)
            return leaves
        if self.use_bilevel and self._use_hierarchy():
            superclass = rng.choice(self._superclass_ids, 1)[0]
            n_sub = self.spec.classes_per_superclass[superclass]
            ways = rng.randint(low=cfg.min_ways, high=min(cfg.max_ways_upper_bound, n_sub) + 1)
            sub = rng.choice(n_sub, ways, replace=False)
            return self._superclass_rel_start[int(superclass)] + sub
        if cfg.use_all_classes:
            return np.arange(self.num_classes)
        ways = self.num_ways
        if ways is None:
            hi = min(cfg.max_ways_upper_bound, len(self._filtered_rel))
            ways = rng.randint(low=cfg.min_ways, high=hi + 1)
        return rng.choice(self._filtered_rel, ways, replace=False)

    def sample(self) -> tuple:
        """One episode description: `((rel_class_id, support_shots, query_shots), ...)` as ints.

        Raises:
          ValueError: as MD, when the sampled classes cannot hold the requested shots.
        """
        cfg, rng = self.config, self._rng
        class_ids = self.sample_class_ids()
        images = self._counts[class_ids]
        if cfg.num_query is not None:
            num_query = cfg.num_query
        else:
            num_query = compute_num_query(images, cfg.max_num_query, cfg.num_support)
        if cfg.num_support is not None:
            if isinstance(cfg.num_support, int):
                if any(cfg.num_support + num_query > images):
                    raise ValueError("Some classes do not have enough examples.")
                shots = [cfg.num_support] * len(class_ids)
            else:
                lo, hi = cfg.num_support
                if any(hi + num_query > images):
                    raise ValueError("The range provided for uniform sampling of the number of "
                                     "support examples per class is not valid: some classes do "
                                     "not have enough examples.")
                shots = [rng.randint(low=lo, high=hi + 1)] * len(class_ids)
        else:
            remaining = images - num_query
            size = sample_support_set_size(remaining, cfg.max_support_size_contrib_per_class,
                                           cfg.max_support_set_size, rng)
            shots = sample_num_support_per_class(images, remaining, size, cfg.min_log_weight,
                                                 cfg.max_log_weight, rng)
        q = int(num_query)
        return tuple((int(c), int(k), q) for c, k in zip(class_ids, shots))
