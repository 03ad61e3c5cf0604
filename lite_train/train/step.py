"""One training task in, gradients accumulated in the model's `.grad` out (no optimizer step): the three
training methods of LITE's `--train_method` (reference lite.md §2; LITE:src/run.py `train_lite`,
`train_task`). Each returns {"loss", "accuracy", "cross_entropy", "chunks"} for logging.

- `lite_task_backward` ("lite"): memory independent of the support size N. For each query chunk of
  `chunk_size` (reference chunking: no chunk of size 1), a fresh subset of h = min(H, N) support images is
  back-propagated; the other N - h enter the forward pass from per-task caches computed once, without
  gradients (set-encoder embeddings and backbone features; the feature cache keeps the first chunk's FiLM
  parameters, as in the reference). Per chunk: loss = CE(mean over chunk) / tasks_per_step + 0.001·R,
  backward at once.
- `small_task_backward` ("small_task"): the plain model on the whole support set with gradients, once per
  query chunk (support pass recomputed per chunk), same per-chunk loss.
- `no_lite_backward` ("no_lite"): the plain model on whole support and query sets, one backward.

With h = N and one query chunk, `lite` and `no_lite` give the same gradients (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lite_train.model.efficientnet import FEATURE_DIM
from lite_train.model.lite import REFERENCE_CHUNK_SIZE, LiteModel, query_chunks

REGULARIZER_SCALE = 0.001  # weight of the FiLM regulariser R in every chunk loss (LITE:src/run.py)


def _column_targets(stats_classes: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """Query labels -> logit column indices (columns = sorted support labels); every query label must occur
    in the support set. For episodes labelled 0..K-1 this is the identity, as the reference assumes."""
    columns = torch.searchsorted(stats_classes, query_labels)
    columns = columns.clamp(max=stats_classes.numel() - 1)
    if not torch.equal(stats_classes[columns], query_labels):
        missing = sorted(set(query_labels.tolist()) - set(stats_classes.tolist()))
        raise ValueError(f"query labels {missing[:5]} do not occur in the support set")
    return columns


def _check_labels(support_images, support_labels, query_images, query_labels, tasks_per_step: int):
    if query_labels.shape != query_images.shape[:1] or query_labels.dtype != torch.int64:
        raise ValueError(f"query labels must be int64 of shape ({query_images.shape[0]},), got "
                         f"{query_labels.dtype} {tuple(query_labels.shape)}")
    if support_labels.shape != support_images.shape[:1] or support_labels.dtype != torch.int64:
        raise ValueError(f"support labels must be int64 of shape ({support_images.shape[0]},), got "
                         f"{support_labels.dtype} {tuple(support_labels.shape)}")
    if tasks_per_step < 1:
        raise ValueError(f"tasks_per_step must be positive, got {tasks_per_step}")


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass, scale·(incoming gradient) in the backward pass."""
    if scale == 1.0:
        return x
    return x * scale - x.detach() * (scale - 1.0)


def _chunk_loss(model: LiteModel, logits: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                tasks_per_step: int, totals: dict) -> None:
    """Adds CE/T + 0.001·R of one chunk, back-propagates it, and updates the running totals."""
    targets = _column_targets(classes, labels)
    cross_entropy = F.cross_entropy(logits, targets)
    loss = cross_entropy / tasks_per_step + REGULARIZER_SCALE * model.regularization_term()
    loss.backward()
    totals["loss"] += loss.item()
    totals["cross_entropy"] += cross_entropy.item() * labels.numel()
    totals["correct"] += (logits.argmax(dim=1) == targets).sum().item()
    totals["queries"] += labels.numel()
    totals["chunks"] += 1


def _summary(totals: dict) -> dict:
    """loss: sum of the chunk losses (the objective whose gradient was accumulated); accuracy and
    cross_entropy: means over all query images of the task."""
    return {"loss": totals["loss"], "accuracy": totals["correct"] / totals["queries"],
            "cross_entropy": totals["cross_entropy"] / totals["queries"], "chunks": totals["chunks"]}


def _new_totals() -> dict:
    return {"loss": 0.0, "cross_entropy": 0.0, "correct": 0, "queries": 0, "chunks": 0}


def _subset_order(subset: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """A pinned gradient subset (h,) -> the full order (n,): the subset, then the other rows ascending."""
    subset = torch.as_tensor(subset, dtype=torch.int64).cpu().reshape(-1)
    if subset.numel() != h or subset.unique().numel() != h or (h and (subset.min() < 0 or subset.max() >= n)):
        raise ValueError(f"a subset must hold {h} distinct support indices in [0, {n}), got {subset.tolist()}")
    rest = torch.ones(n, dtype=torch.bool)
    rest[subset] = False
    return torch.cat([subset, torch.arange(n)[rest]])


class _FeatureCache:
    """The no-grad support features of one task, computed with the first query chunk's FiLM parameters (as the
    reference's cache is), but only for the rows a chunk reads from the cache, each row once: with a single
    query chunk the h gradient rows are never computed twice. The backbone runs in eval mode, so a row's
    features do not depend on which other rows share its batch: the values are the reference's."""

    def __init__(self, model: LiteModel, images: torch.Tensor, chunk_size: int):
        self.model, self.images, self.chunk_size = model, images, chunk_size
        self.film: list | None = None
        self.values: torch.Tensor | None = None  # (N, 1280), rows filled as they are first read
        self.done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)  # (N,)

    def rows(self, rows: torch.Tensor, film: list) -> torch.Tensor:
        if self.film is None:
            self.film = [(g.detach(), b.detach()) for g, b in film]  # the first chunk's
        missing = rows[~self.done[rows]]
        with torch.no_grad():
            for a, b in query_chunks(missing.numel(), self.chunk_size):  # gathered chunk by chunk: memory per chunk
                new = self.model.features(self.images[missing[a:b]], self.film)  # (b - a, 1280)
                if self.values is None:
                    self.values = new.new_empty(self.images.shape[0], new.shape[1])
                self.values[missing[a:b]] = new
        self.done[missing] = True
        if self.values is None:  # every row carries gradients (h = N): nothing was read from the cache
            return self.images.new_empty(0, FEATURE_DIM)
        return self.values[rows]


def lite_task_backward(model: LiteModel, support_images: torch.Tensor, support_labels: torch.Tensor,
                       query_images: torch.Tensor, query_labels: torch.Tensor, h: int = 40,
                       chunk_size: int = REFERENCE_CHUNK_SIZE, tasks_per_step: int = 16,
                       subsets: Sequence[torch.Tensor] | None = None, generator: torch.Generator | None = None,
                       lite_scale: bool = False) -> dict:
    """One LITE training task; gradients accumulate in `.grad` (call optimizer.step()/zero_grad() yourself).

    h: support images back-propagated per query chunk (h = min(h, N); 0 = only the query path).
    subsets: one index tensor of length min(h, N) per query chunk, pinning the gradient rows; otherwise each
      chunk draws `torch.randperm(N, generator=generator)` and takes its first h (a CPU generator).
    lite_scale: multiply the gradient through the h subset rows by N / h (set-encoder embeddings and
      support features), the paper's estimator of the full-support gradient (unbiased for the FiLM
      generator when set-encoder embeddings do not depend on their batch; the set encoder keeps a bias,
      docs/fidelity.md M3); the reference code does not scale (False, default).
    """
    _check_labels(support_images, support_labels, query_images, query_labels, tasks_per_step)
    if h < 0:
        raise ValueError(f"h must be >= 0, got {h}")
    n = support_images.shape[0]
    h = min(h, n)
    chunks = query_chunks(query_images.shape[0], chunk_size)
    if subsets is not None and len(subsets) != len(chunks):
        raise ValueError(f"{len(subsets)} subsets given for {len(chunks)} query chunks")
    if subsets is None and generator is None:
        raise ValueError("lite_task_backward needs `subsets` or a `generator` to draw them (no hidden randomness)")
    scale = n / h if lite_scale and h > 0 else 1.0
    embedding_cache = None  # (N[+1], 64): per task, no graph
    features = _FeatureCache(model, support_images, chunk_size)  # (N, 1280) rows, each computed once
    totals = _new_totals()
    with torch.enable_grad():
        for i, (a, b) in enumerate(chunks):
            order = (_subset_order(subsets[i], n, h) if subsets is not None
                     else torch.randperm(n, generator=generator))  # (N,) on CPU
            order = order.to(support_images.device)
            grad_rows, cached_rows = order[:h], order[h:]
            if embedding_cache is None:
                with torch.no_grad():
                    embedding_cache = model.set_encoder_embeddings(support_images, chunk_size)
            parts = [embedding_cache[cached_rows]]  # (N - h, 64)
            if h > 0:
                # The h rows are encoded as ONE batch: their BN statistics come from this batch.
                parts.insert(0, _scale_grad(model.set_encoder.pre_pool(support_images[grad_rows]), scale))
            z = torch.cat(parts).mean(dim=0, keepdim=True)  # (1, 64), every support image weighted 1/N
            film = model.film_params(z)
            parts = [features.rows(cached_rows, film)]  # (N - h, 1280)
            if h > 0:
                parts.insert(0, _scale_grad(model.features(support_images[grad_rows], film), scale))
            stats = model.fit_classifier(torch.cat(parts), support_labels[order])  # rows aligned with order
            logits = model.classify(stats, model.features(query_images[a:b], film))  # (b - a, K)
            _chunk_loss(model, logits, stats.classes, query_labels[a:b], tasks_per_step, totals)
    return _summary(totals)


def small_task_backward(model: LiteModel, support_images: torch.Tensor, support_labels: torch.Tensor,
                        query_images: torch.Tensor, query_labels: torch.Tensor,
                        chunk_size: int = REFERENCE_CHUNK_SIZE, tasks_per_step: int = 16) -> dict:
    """`--train_method small_task`: per query chunk, `model(support, labels, query chunk)` with gradients
    through the whole support set (recomputed per chunk), loss CE/T + 0.001·R, backward."""
    _check_labels(support_images, support_labels, query_images, query_labels, tasks_per_step)
    totals = _new_totals()
    with torch.enable_grad():
        classes = torch.unique(support_labels)
        for a, b in query_chunks(query_images.shape[0], chunk_size):
            logits = model(support_images, support_labels, query_images[a:b])  # (b - a, K)
            _chunk_loss(model, logits, classes, query_labels[a:b], tasks_per_step, totals)
    return _summary(totals)


def no_lite_backward(model: LiteModel, support_images: torch.Tensor, support_labels: torch.Tensor,
                     query_images: torch.Tensor, query_labels: torch.Tensor, tasks_per_step: int = 16) -> dict:
    """`--train_method no_lite`: one pass of `model(support, labels, query)` over the whole task with
    gradients everywhere, loss CE/T + 0.001·R, backward. Memory grows with N and M."""
    _check_labels(support_images, support_labels, query_images, query_labels, tasks_per_step)
    totals = _new_totals()
    with torch.enable_grad():
        logits = model(support_images, support_labels, query_images)  # (M, K)
        _chunk_loss(model, logits, torch.unique(support_labels), query_labels, tasks_per_step, totals)
    return _summary(totals)


@dataclasses.dataclass(frozen=True)
class TrainingTask:
    """One training task as the steps take it: images on the model's device, in the task's random order."""

    support_images: torch.Tensor  # (N, 3, S, S)
    support_labels: torch.Tensor  # (N,) int64
    query_images: torch.Tensor  # (M, 3, S, S)
    query_labels: torch.Tensor  # (M,) int64
    generator: torch.Generator  # CPU generator of this task (LITE subsets)


def _lite(model, task: TrainingTask, cfg) -> dict:
    return lite_task_backward(model, task.support_images, task.support_labels, task.query_images, task.query_labels,
                              h=cfg.h, chunk_size=cfg.chunk_size, tasks_per_step=cfg.tasks_per_step,
                              generator=task.generator, lite_scale=cfg.lite_scale)


def _small_task(model, task: TrainingTask, cfg) -> dict:
    return small_task_backward(model, task.support_images, task.support_labels, task.query_images,
                               task.query_labels, chunk_size=cfg.chunk_size, tasks_per_step=cfg.tasks_per_step)


def _no_lite(model, task: TrainingTask, cfg) -> dict:
    return no_lite_backward(model, task.support_images, task.support_labels, task.query_images, task.query_labels,
                            tasks_per_step=cfg.tasks_per_step)


# --train-method -> step(model, task, cfg with h, chunk_size, tasks_per_step, lite_scale); filled explicitly.
STEPS: dict[str, Callable[..., dict]] = {"lite": _lite, "small_task": _small_task, "no_lite": _no_lite}
