"""The loader's second front-end, for "ordered" sources (VTAB tasks): a converted task folder in, its support
block (one tensor) and its query set as ordered fixed-size batches out.

    open_ordered_task(path)            -> OrderedTask: reader, support/query rows in source order, labels
    read_support(task, cfg)            -> (images (N, 3, S, S) float32 in [-1, 1], labels (N,) int64)
    query_batches(task, cfg[, count])  -> iterator of OrderedBatch {"images" (B, 3, S, S), "labels" (B,),
                                          "rows" (B,)}, in source order, the last batch possibly shorter

Both run a `torch.utils.data.DataLoader` (`batch_size=None`) over one map-style dataset whose item i is the
i-th batch of rows, decoded in a worker, so the order is the source order for any number of workers and at
most `num_workers * prefetch_factor` batches are ever in flight, decoded in place into as many + 2 recycled
shared-memory batch buffers (only the batch index travels back from a worker): memory is bounded by the
batch size, not by the query set (dsprites' `lite` query set is ~736k images). A batch's images stay valid
until the batch after the next one is requested (clone them to keep them longer). The support block is read
by the same batches once and copied into one tensor (the model needs the whole set for the task embedding).

Preprocessing (`OrderedLoaderConfig.preprocess`):
- "md": the episode loader's engine, `decode.decode_resize_into` (TF-equal decode, TF1 bilinear resize with
  corner alignment, `x / 127.5 - 1`).
- "lite": the reference LITE VTAB reader (reference lite.md §5; LITE:src/tf_dataset_reader.py): the decoded
  image through PIL, `resize((S, S), LANCZOS)` (aspect ratio not kept), RGB, ToTensor (`x / 255`) then
  Normalize(0.5, 0.5) (`(t - 0.5) / 0.5`), in float32 as torchvision computes it. Single-channel tasks
  (smallnorb, dsprites) are stored as grey images that decode to three equal channels; LANCZOS on them gives
  per channel what LITE's resize of the one-channel image then `convert("RGB")` gives.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator, TypedDict

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from lite_train.data.decode import compile_resize, decode_resize_into, decode_rgb
from lite_train.data.loader import _shared_empty
from manifests import schema
from manifests.provenance import role_rows
from manifests.reader import ManifestError, SourceReader

PREPROCESSING = ("md", "lite")


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


def lite_resize_into(data: bytes, out: np.ndarray, size: int) -> None:
    """LITE's VTAB preprocessing (module docstring) of one encoded image into `out` (3, size, size) float32."""
    from PIL import Image

    img = Image.fromarray(decode_rgb(data)).resize((size, size), Image.LANCZOS)  # (size, size) RGB
    t = np.asarray(img, dtype=np.float32) / np.float32(255)  # ToTensor, (S, S, 3)
    out[...] = ((t - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)  # Normalize, (3, S, S)


def _preprocess_into(data: bytes, out: np.ndarray, size: int, preprocess: str) -> None:
    if preprocess == "md":
        decode_resize_into(data, out, size)
    else:
        lite_resize_into(data, out, size)


class _RowBatches(Dataset):
    """Item i = rows[i*B : (i+1)*B] decoded into slot i mod R of the shared batch buffers; returns i alone.

    Nothing but that int travels through the worker queue: the main process knows the rows and labels of
    batch i. (Arrays returned here would be turned into tensors by the DataLoader and sent through a new
    shared-memory segment and a file-descriptor handshake each: work for both processes on every batch.)"""

    def __init__(self, reader: SourceReader, rows: np.ndarray, cfg: OrderedLoaderConfig, slots: torch.Tensor):
        self.reader, self.rows, self.cfg, self.slots = reader, rows, cfg, slots

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.cfg.batch_size)

    def __getitem__(self, i: int) -> int:
        rows = self.rows[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        view = self.slots[i % len(self.slots)].numpy()  # (B, 3, S, S), shares memory with the main process
        for j, row in enumerate(rows):
            data = self.reader.read(int(row))
            try:
                _preprocess_into(data, view[j], self.cfg.image_size, self.cfg.preprocess)
            except ValueError as e:
                raise ValueError(f"{self.reader.locate(int(row))}: {e}") from None
        return i


def _batches(task: OrderedTask, rows: np.ndarray, cfg: OrderedLoaderConfig) -> Iterator[OrderedBatch]:
    """Batches of `rows` in order. Recycled buffers: batch i's images are a view of slot i mod R, R = batches
    in flight + 2, so they stay intact while the caller holds batch i + 1 and are overwritten once it asks for
    batch i + 2 (the DataLoader dispatches batch i + in_flight + 1 when batch i + 1 is handed out). Fresh
    buffers per batch would cost a page fault per 4 KiB written (BENCHMARKS.md, VTAB evaluation)."""
    if cfg.preprocess == "md":
        compile_resize()  # once here, so forked workers inherit the compiled kernel
    batches = math.ceil(len(rows) / cfg.batch_size)
    workers = min(cfg.num_workers, batches)
    size = cfg.image_size
    shape = (min(workers * cfg.prefetch_factor + 2, batches), cfg.batch_size, 3, size, size)  # (R, B, 3, S, S)
    # Shared before the workers start, which then write into it in place. A sparse memfd: each page is
    # committed by the worker that first writes it, in parallel, where share_memory_() would commit (zero
    # and copy) all R slots serially in this process first and the workers would still fault on every page.
    slots = _shared_empty(shape, "lite-train-vtab-batches") if workers else torch.empty(shape, dtype=torch.float32)
    batch_indices = iter(DataLoader(_RowBatches(task.reader, rows, cfg, slots), batch_size=None, shuffle=False,
                                    num_workers=workers, prefetch_factor=cfg.prefetch_factor if workers else None))
    try:
        for expected, i in enumerate(batch_indices):
            if i != expected:
                raise RuntimeError(f"{task.reader.path}: batch {i} arrived where batch {expected} was due")
            batch_rows = rows[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # (b,) global sample indices
            yield {"images": slots[i % len(slots), :len(batch_rows)],
                   "labels": torch.from_numpy(task.labels[batch_rows]), "rows": torch.from_numpy(batch_rows.copy())}
    finally:
        # Stop the workers now (an error, a break), not when the iterator is collected: a decode error's
        # traceback references the iterator, and whoever keeps the exception would keep the workers alive.
        shutdown = getattr(batch_indices, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


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
