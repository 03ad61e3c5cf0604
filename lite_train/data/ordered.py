"""The loader's ordered front-end, for "ordered" sources (VTAB tasks): a converted task folder in, its support
block (one tensor) and its query set as ordered fixed-size batches out.

    open_ordered_task(path)            -> OrderedTask: reader, support/query rows in source order, labels
    read_support(task, cfg)            -> (images (N, 3, S, S) float32 in [-1, 1], labels (N,) int64)
    query_batches(task, cfg[, count])  -> iterator of OrderedBatch {"images" (B, 3, S, S), "labels" (B,),
                                          "rows" (B,)}, in source order, the last batch possibly shorter

Both run the decode engine (`lite_train.data.engine`) with one job per batch of rows, so the order is the
source order for any number of workers and at most `num_workers * prefetch_factor` batches are ever in
flight, decoded in place into recycled shared buffers: memory is bounded by the batch size, not by the
query set (dsprites' `lite` query set is ~736k images). A batch's images stay valid as long as the caller
holds them (a held batch's buffer is simply not reused). The support block is read by the same batches
and copied into one tensor (the model needs the whole set for the task embedding).

Preprocessing (`OrderedLoaderConfig.preprocess`): "md", the episode loader's TF-equal decode and TF1 bilinear
resize; "lite", the reference LITE VTAB reader (`lite_train.data.engine.lite_resize_into`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, TypedDict

import numpy as np
import pyarrow.parquet as pq
import torch

from lite_train.data.engine import PREPROCESSING, DecodeEngine, EngineConfig, ImageJob
from manifests import schema
from manifests.provenance import role_rows
from manifests.reader import ManifestError, SourceReader


@dataclasses.dataclass(frozen=True)
class OrderedLoaderConfig:
    """How an ordered source is read."""

    image_size: int = 224  # output side S
    batch_size: int = 40  # images per batch (eval-vtab: the chunk size)
    preprocess: str = "md"  # one of PREPROCESSING (module docstring)
    num_workers: int = 2  # decode worker processes; 0 = decode in the calling process
    prefetch_factor: int = 2  # batches in flight per worker

    def __post_init__(self):
        if self.preprocess not in PREPROCESSING:
            raise ValueError(f"preprocess {self.preprocess!r} is not one of {PREPROCESSING}")
        if self.image_size < 1 or self.batch_size < 1 or self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"invalid OrderedLoaderConfig {self}")


class OrderedBatch(TypedDict):
    images: torch.Tensor  # (B, 3, S, S) float32 in [-1, 1]
    labels: torch.Tensor  # (B,) int64 labels (class ids)
    rows: torch.Tensor  # (B,) int64 global sample indices in the source


@dataclasses.dataclass(frozen=True)
class OrderedTask:
    """An ordered source opened for evaluation."""

    reader: SourceReader
    support_rows: np.ndarray  # (N,) int64 global sample indices of the support set, source order
    query_rows: np.ndarray  # (M,) int64 ... of the query set, source order
    labels: np.ndarray  # (num_samples,) int64 label of every sample (samples.parquet class_id)

    @property
    def name(self) -> str:
        return self.reader.name


def open_ordered_task(path: str | Path) -> OrderedTask:
    """Open `<root>/<group>/<task>/`; ManifestError (naming the folder) unless it is an ordered source with a
    non-empty support and query set."""
    reader = SourceReader(path)
    if reader.info.layout != "ordered":
        raise ManifestError(f"{reader.path}: layout {reader.info.layout!r}, not an ordered (VTAB) source")
    labels = pq.read_table(reader.path / schema.SAMPLES_FILE, columns=["class_id"]).column(0).to_numpy()
    support, query = role_rows(reader, "support"), role_rows(reader, "query")
    if support.size == 0 or query.size == 0:
        raise ManifestError(f"{reader.path}: {support.size} support and {query.size} query samples; both must "
                            "be non-empty")
    return OrderedTask(reader, support.astype(np.int64), query.astype(np.int64), labels.astype(np.int64))


def _batches(task: OrderedTask, rows: np.ndarray, cfg: OrderedLoaderConfig) -> Iterator[OrderedBatch]:
    """Batches of `rows` in order, one engine job (and one worker task) per batch."""
    size = cfg.batch_size
    workers = min(cfg.num_workers, -(-len(rows) // size))  # no more processes than batches
    engine = DecodeEngine([task.reader], EngineConfig(
        image_size=cfg.image_size, num_workers=workers, images_per_task=cfg.batch_size,
        tasks_in_flight=max(1, cfg.num_workers * cfg.prefetch_factor), preprocess=cfg.preprocess,
        min_rows=cfg.batch_size, buffer_name="lite-train-vtab-batches"))
    jobs = (ImageJob(i, np.zeros(len(rows[a:a + size]), np.int64), rows[a:a + size])
            for i, a in enumerate(range(0, len(rows), size)))
    for expected, (job, images) in enumerate(engine.run(jobs)):
        if job.index != expected:
            raise RuntimeError(f"{task.reader.path}: batch {job.index} arrived where batch {expected} was due")
        yield {"images": images, "labels": torch.from_numpy(task.labels[job.samples]),
               "rows": torch.from_numpy(job.samples.copy())}


def read_support(task: OrderedTask, cfg: OrderedLoaderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole support set, read once: images (N, 3, S, S) float32 in [-1, 1] and labels (N,) int64."""
    n, size = len(task.support_rows), cfg.image_size
    images = torch.empty((n, 3, size, size), dtype=torch.float32)
    start = 0
    for batch in _batches(task, task.support_rows, cfg):
        b = batch["images"].shape[0]
        images[start:start + b] = batch["images"]
        start += b
    if start != n:
        raise RuntimeError(f"{task.reader.path}: read {start} of {n} support images")
    return images, torch.from_numpy(task.labels[task.support_rows])


def query_batches(task: OrderedTask, cfg: OrderedLoaderConfig, count: int | None = None
                  ) -> Iterator[OrderedBatch]:
    """The first `count` query samples (default: all), in source order, in batches of `cfg.batch_size`."""
    rows = task.query_rows if count is None else task.query_rows[:count]
    return _batches(task, rows, cfg)
