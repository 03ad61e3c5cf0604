"""A model + converted sources in, per-source episode accuracy out: mean and 95 % interval over seeded
episodes (validation during training and `lite-train test`), and the reference's model-selection rule."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch

from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.loader import EpisodeLoaderConfig, make_episode_loader


@dataclasses.dataclass(frozen=True)
class SourceResult:
    """Accuracy over one source's episodes, in percent."""

    accuracy: float  # mean episode accuracy x 100
    confidence: float  # 1.96 * std * 100 / sqrt(n): half-width of the 95 % interval (reference §3)
    n: int  # episodes


def summarise(accuracies: Sequence[float]) -> SourceResult:
    """The reference's statistic: `np.std` with ddof 0, as LITE:src/run.py computes it."""
    acc = np.asarray(accuracies, dtype=np.float64)  # (n,) in [0, 1]
    return SourceResult(float(acc.mean() * 100), float(1.96 * acc.std() * 100 / math.sqrt(len(acc))), len(acc))


def episode_accuracy(model, episode, device: torch.device, chunk_size: int,
                     autocast_bf16: bool = False) -> float:
    """Query accuracy of `model.predict` on one episode (labels 0..ways-1 = predict's column order)."""
    support = episode["support_images"].to(device, non_blocking=True)  # (N, 3, S, S)
    query = episode["query_images"].to(device, non_blocking=True)  # (M, 3, S, S)
    support_labels = episode["support_labels"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        logits = model.predict(support, support_labels, query, chunk_size=chunk_size)  # (M, ways)
    return float((logits.argmax(dim=1).cpu() == episode["query_labels"]).double().mean())


def evaluate(model, data: str, sources: Sequence[str], split: str, episodes: int, seed: int, image_size: int,
             device: torch.device, *, chunk_size: int = 40, num_workers: int = 2, autocast_bf16: bool = False,
             view: str = "md-v2",
             description: EpisodeDescriptionConfig = EpisodeDescriptionConfig(),
             on_episode: Callable[[str], None] | None = None) -> dict[str, SourceResult]:
    """Accuracy of `model` on `episodes` seeded episodes of each source's `split`.

    Episode i of a source depends only on (seed, source, i), so the same seed gives the same numbers.
    `on_episode(source)` is called after each episode (progress display).
    """
    results = {}
    for source in sources:
        cfg = EpisodeLoaderConfig(data=data, sources=(source,), split=split, seed=seed, image_size=image_size,
                                  view=view, num_episodes=episodes, num_workers=num_workers,
                                  pin_memory=device.type == "cuda")
        accuracies = []
        with make_episode_loader(cfg, description) as loader:
            for episode in loader:
                accuracies.append(episode_accuracy(model, episode, device, chunk_size, autocast_bf16))
                if on_episode is not None:
                    on_episode(source)
        results[source] = summarise(accuracies)
    return results


def better_on_half(new: dict[str, SourceResult], best: dict[str, SourceResult]) -> bool:
    """The reference's rule (LITE:src/utils.py `ValidationAccuracies`): `new` is better if its accuracy beats
    the stored best on at least ceil(n/2) of the n sources; a source never validated counts as 0 %."""
    wins = sum(result.accuracy > (best[s].accuracy if s in best else 0.0) for s, result in new.items())
    return wins >= math.ceil(len(new) / 2)
