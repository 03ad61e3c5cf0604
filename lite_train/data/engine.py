"""ImageJobs in, (job, decoded images) out, in job order: the decode engine under every loader front-end
(episodes, pretraining batches, ordered VTAB batches).

    front-end        seed, sources -> ImageJob   (main process: which stored samples fill which rows)
    _TaskSampler     ImageJob      -> DecodeTask (main process: takes a buffer from the `BufferPool`, cuts the
                                                  job into tasks of at most `images_per_task` rows)
    DataLoader       DecodeTask    -> job index  (a worker reads, checks, decodes and resizes its images
                                                  straight into rows of the shared buffer)
    DecodeEngine     job indices   -> (ImageJob, images (n, 3, S, S))  once all of a job's tasks are done

Why tasks and not whole jobs: MD episodes vary from ~50 to ~1000 images, and torch's DataLoader hands items
to workers round-robin and returns them in order, so with one episode per item a worker that drew a small
episode waits for the one that drew a big one (docs/architecture.md, "Workers"). Equal-size tasks keep every
worker busy, the images are written in place (no copy between
processes), and since jobs are planned sequentially in the main process, the content of job i is the same
for any number of workers. Jobs complete in order: every task of job i is handed out before job i + 1's,
and the DataLoader returns tasks in order.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import signal
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from lite_train.data.buffers import BufferPool, shutdown_workers
from lite_train.data.decode import compile_resize, decode_resize_into, decode_rgb
from manifests import SourceReader
from manifests.reader import ChecksumError

PREPROCESSING = ("md", "lite")


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """The stored samples that fill one yielded tensor, row by row."""

    index: int  # position in the front-end's stream (episode or batch index), echoed back
    sources: np.ndarray  # (n,) reader index of each row
    samples: np.ndarray  # (n,) sample index of each row within its reader


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How images are decoded and how many are in flight."""

    image_size: int  # output side S
    num_workers: int = 2  # decode processes; 0 = decode in the calling process
    images_per_task: int = 64  # images one worker decodes per DataLoader item
    tasks_in_flight: int = 8  # DataLoader items queued ahead
    preprocess: str = "md"  # "md": TF-equal decode + TF1 bilinear resize; "lite": LITE's VTAB reader (PIL)
    dct_scale: bool = False  # md only: fast, not TF-identical JPEG decoding (docs/fidelity.md)
    multiprocessing_context: str | None = None  # None = the platform default (fork on Linux)
    min_rows: int = 1  # buffers are at least this many rows (the largest job expected)
    buffer_name: str = "lite-train-images"  # the memfd name /proc/<pid>/maps shows

    def __post_init__(self):
        if self.preprocess not in PREPROCESSING:
            raise ValueError(f"preprocess {self.preprocess!r} is not one of {PREPROCESSING}")
        if self.images_per_task < 1 or self.tasks_in_flight < 1 or self.num_workers < 0 or self.image_size < 1:
            raise ValueError(f"invalid EngineConfig {self}")


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    """Decode samples into rows `start : start + len(samples)` of `images`."""

    job: int  # ImageJob.index
    sources: np.ndarray  # (k,) reader index per row
    samples: np.ndarray  # (k,) sample index per row
    images: torch.Tensor  # (capacity, 3, S, S): the job's buffer
    start: int


@dataclasses.dataclass
class _Pending:
    """A job whose tasks are out: its rows of the buffer and how many tasks have not come back."""

    job: ImageJob
    images: torch.Tensor  # (n, 3, S, S) view of the buffer
    tasks_left: int


def lite_resize_into(data: bytes, out: np.ndarray, size: int) -> None:
    """LITE's VTAB preprocessing (reference lite.md §5; LITE:src/tf_dataset_reader.py) of one encoded image
    into `out` (3, size, size) float32: the decoded image through PIL, `resize((S, S), LANCZOS)` (aspect
    ratio not kept), RGB, ToTensor (`x / 255`) then Normalize(0.5, 0.5) (`(t - 0.5) / 0.5`), in float32 as
    torchvision computes it. Grey images decode to three equal channels; LANCZOS on them gives per channel
    what LITE's resize of the one-channel image then `convert("RGB")` gives."""
    from PIL import Image

    img = Image.fromarray(decode_rgb(data)).resize((size, size), Image.LANCZOS)  # (size, size) RGB
    t = np.asarray(img, dtype=np.float32) / np.float32(255)  # ToTensor, (S, S, 3)
    out[...] = ((t - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)  # Normalize, (3, S, S)


class _TaskSampler(Sampler):
    """Main process, one per run: turns each job into a buffer view + decode tasks and remembers that run's
    pending jobs (so two live runs over one engine never share them)."""

    def __init__(self, jobs: Iterable[ImageJob], pool: BufferPool, images_per_task: int):
        self.jobs, self.pool, self.images_per_task = jobs, pool, images_per_task
        self.pending: dict[int, _Pending] = {}

    def __iter__(self) -> Iterator[DecodeTask]:
        step = self.images_per_task
        for job in self.jobs:
            n = len(job.samples)
            buf = self.pool.take(n)  # (capacity, 3, S, S)
            tasks = [DecodeTask(job.index, job.sources[i:i + step], job.samples[i:i + step], buf, i)
                     for i in range(0, n, step)]
            self.pending[job.index] = _Pending(job, buf[:n], len(tasks))
            del buf  # the pool's reference is the only one besides the views
            yield from tasks


class _DecodeDataset(Dataset):
    """Worker side: a DecodeTask is read and decoded in place; only the job index travels back."""

    def __init__(self, readers: Sequence[SourceReader], cfg: EngineConfig, keep_mapped: int):
        self.readers, self.cfg = list(readers), cfg
        # Worker processes keep the buffers they have written to: torch maps a received shared storage
        # anew unless the process still holds it, and a fresh mapping faults on every page again.
        self.keep_mapped = keep_mapped
        self.mapped: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()

    def __getitem__(self, task: DecodeTask) -> int:
        out, size = task.images.numpy(), self.cfg.image_size
        for row, (source, sample) in enumerate(zip(task.sources.tolist(), task.samples.tolist()), task.start):
            reader = self.readers[source]
            try:
                data = reader.read(sample)
                if self.cfg.preprocess == "md":
                    decode_resize_into(data, out[row], size, dct_scale=self.cfg.dct_scale)
                else:
                    lite_resize_into(data, out[row], size)
            except ChecksumError:
                raise  # already names source, shard, key and row
            except ValueError as e:
                raise ValueError(f"{reader.locate(sample)}: {e}") from None
        if self.keep_mapped and get_worker_info() is not None:  # in-process, holding would block reuse
            self.mapped[task.images.data_ptr()] = task.images
            self.mapped.move_to_end(task.images.data_ptr())
            while len(self.mapped) > self.keep_mapped:
                self.mapped.popitem(last=False)
        return task.job


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode per process: intra-op threads would only contend
    # A signal to the whole process group (Ctrl-C in a terminal, `timeout`, a cluster's SIGTERM before
    # preemption) is the main process's to handle: the trainer finishes its task, checkpoints, then shuts the
    # workers down. torch's worker start-up makes SIGTERM fatal, so without this the workers die first and
    # the main process fails on a dead worker instead of checkpointing. Workers still end with the main
    # process (the engine's shutdown, or torch's watchdog when the main process is gone).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DecodeEngine:
    """Decodes the images of a stream of ImageJobs with `cfg.num_workers` processes, in job order.

    Several runs may be live at once (a trainer's stream while validation runs); each has its own workers.
    The buffers are recycled through one `BufferPool` and dropped when no run is live, or on `close()`.
    """

    def __init__(self, readers: Sequence[SourceReader], cfg: EngineConfig):
        self.readers, self.cfg = list(readers), cfg
        if cfg.preprocess == "md":
            compile_resize()  # here, so that forked workers inherit the compiled kernel
        # Buffers in use at once: one per job with tasks in flight, the one being assembled, the one the
        # consumer holds.
        buffers = cfg.tasks_in_flight + 2
        self.pool = BufferPool((3, cfg.image_size, cfg.image_size), cfg.num_workers > 0, buffers, cfg.min_rows,
                               cfg.buffer_name)
        self._dataset = _DecodeDataset(self.readers, cfg, keep_mapped=buffers)
        self._live = 0

    def data_loader(self, sampler: Sampler | None) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            self._dataset, sampler=sampler, batch_size=None, num_workers=workers,
            # Its own generator: starting an iterator draws a worker base seed, which would otherwise come from
            # torch's global generator and make a resumed run's global RNG state differ from an uninterrupted one.
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_worker_init if workers else None,
            multiprocessing_context=self.cfg.multiprocessing_context if workers else None,
            prefetch_factor=max(1, math.ceil(self.cfg.tasks_in_flight / workers)) if workers else None)

    def run(self, jobs: Iterable[ImageJob]) -> Iterator[tuple[ImageJob, torch.Tensor]]:
        """(job, images (n, 3, S, S) float32) per job, in order. The images are a view of a pooled buffer,
        never reused while anything references it."""
        sampler = _TaskSampler(jobs, self.pool, self.cfg.images_per_task)
        pending = sampler.pending
        done = iter(self.data_loader(sampler))
        self._live += 1
        try:
            for index in done:  # job indices, one per task, in task order
                entry = pending[int(index)]
                entry.tasks_left -= 1
                if entry.tasks_left == 0:
                    del pending[int(index)]
                    yield entry.job, entry.images
        finally:
            # Stop this run's workers now, then give the shared memory back once no other run is live.
            shutdown_workers(done)
            pending.clear()
            del done, sampler, pending
            self._live -= 1
            if self._live == 0:
                self.pool.clear()

    def close(self) -> None:
        """Drop the shared buffers and close the shard descriptors (images already yielded stay valid)."""
        self.pool.clear()
        for reader in self.readers:
            reader.close()
