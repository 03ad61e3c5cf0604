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


def paired_difference(a: Sequence[float], b: Sequence[float]) -> SourceResult:
    """b - a over the same episodes, in points: mean and 1.96·std/√n of the per-episode differences (the
    interval of the gain itself, narrower than the two models' intervals when their episodes co-vary)."""
    return summarise(np.asarray(b, np.float64) - np.asarray(a, np.float64))


def episode_accuracy(model, episode, device: torch.device, chunk_size: int,
                     autocast_bf16: bool = False) -> float:
    """Query accuracy of `model.predict` on one episode (labels 0..ways-1 = predict's column order)."""
    support = episode["support_images"].to(device, non_blocking=True)  # (N, 3, S, S)
    query = episode["query_images"].to(device, non_blocking=True)  # (M, 3, S, S)
    support_labels = episode["support_labels"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        logits = model.predict(support, support_labels, query, chunk_size=chunk_size)  # (M, ways)
    return float((logits.argmax(dim=1).cpu() == episode["query_labels"]).double().mean())


def episode_accuracies(models: dict[str, torch.nn.Module], data: str, sources: Sequence[str], split: str,
                       episodes: int, seed: int, image_size: int, device: torch.device, *, chunk_size: int = 40,
                       num_workers: int = 2, autocast_bf16: bool = False, view: str = "md-v2",
                       description: EpisodeDescriptionConfig = EpisodeDescriptionConfig(),
                       on_episode: Callable[[str, dict[str, float]], None] | None = None
                       ) -> dict[str, dict[str, list[float]]]:
    """{model label: {source: [accuracy in [0, 1] of episode 0, 1, ...]}}: every model on the same seeded
    episodes, each episode decoded once. Episode i of a source depends only on (seed, source, i), so the same
    seed gives the same numbers. `on_episode(source, {label: accuracy})` is called after each episode."""
    out: dict[str, dict[str, list[float]]] = {label: {} for label in models}
    for source in sources:
        cfg = EpisodeLoaderConfig(data=data, sources=(source,), split=split, seed=seed, image_size=image_size,
                                  view=view, num_episodes=episodes, num_workers=num_workers,
                                  pin_memory=device.type == "cuda")
        for label in models:
            out[label][source] = []
        with make_episode_loader(cfg, description) as loader:
            for episode in loader:
                scores = {label: episode_accuracy(model, episode, device, chunk_size, autocast_bf16)
                          for label, model in models.items()}
                for label, accuracy in scores.items():
                    out[label][source].append(accuracy)
                if on_episode is not None:
                    on_episode(source, scores)
    return out


def evaluate(models: dict[str, torch.nn.Module], data: str, sources: Sequence[str], split: str, episodes: int,
             seed: int, image_size: int, device: torch.device, **kwargs) -> dict[str, dict[str, SourceResult]]:
    """{model label: {source: SourceResult}} over `episodes` seeded episodes per source (`episode_accuracies`,
    whose keyword arguments it takes)."""
    accuracies = episode_accuracies(models, data, sources, split, episodes, seed, image_size, device, **kwargs)
    return {label: {source: summarise(values) for source, values in per.items()}
            for label, per in accuracies.items()}


def better_on_half(new: dict[str, SourceResult], best: dict[str, SourceResult]) -> bool:
    """The reference's rule (LITE:src/utils.py `ValidationAccuracies`): `new` is better if its accuracy beats
    the stored best on at least ceil(n/2) of the n sources; a source never validated counts as 0 %."""
    wins = sum(result.accuracy > (best[s].accuracy if s in best else 0.0) for s, result in new.items())
    return wins >= math.ceil(len(new) / 2)
