"""Image buffers shared with decode workers, and every private torch / DataLoader API the loaders rely on.

The loaders decode images in worker processes straight into rows of shared float32 buffers (only an index
travels back). This module owns those buffers and the three private APIs that make them cheap, each with a
public fallback that warns once per process:

- `shared_empty`: an anonymous memfd mapped by `torch.UntypedStorage._new_shared_fd_cpu`, whose pages are
  committed only when first written (fallback: `share_memory_()`, which commits the whole size up front);
- `storage_users`: `torch._C._storage_Use_Count`, how many tensors share a storage (fallback: never reuse);
- `shutdown_workers`: `_MultiProcessingDataLoaderIter._shutdown_workers`, to stop a DataLoader's workers at
  once rather than when its iterator is garbage-collected (fallback: let the collector do it).

`BufferPool` hands a buffer out again only once no tensor outside the pool references its storage.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn about a fallback once per process (it would otherwise repeat for every episode)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def shared_empty(shape: tuple[int, ...], name: str = "lite-train-images") -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory whose pages are committed only when first written
    (`name`: the memfd's name, what /proc/<pid>/maps shows).

    torch's own shared allocation (`share_memory_()`, `UntypedStorage._new_shared`) reserves the whole size
    up front (fallocate): a 1000-row 224-px episode buffer would cost 600 MB before any image is written to
    it. An anonymous memfd is sparse; workers receive it like any torch shared storage (by descriptor).
    """
    nbytes = math.prod(shape) * 4
    if nbytes == 0:
        return torch.empty(shape).share_memory_()
    if not hasattr(os, "memfd_create") or not hasattr(torch.UntypedStorage, "_new_shared_fd_cpu"):
        warn_once("memfd", "lite-train loader: no os.memfd_create or torch.UntypedStorage._new_shared_fd_cpu "
                           "here; image buffers commit their whole size up front (share_memory_)")
        return torch.empty(shape).share_memory_()
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # maps a duplicate of fd
    finally:
        os.close(fd)
    return torch.empty(0).set_(storage, 0, shape)


def storage_users(tensor: torch.Tensor) -> int | None:
    """How many tensors (views included) share `tensor`'s storage, or None where torch cannot tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        warn_once("use_count", "lite-train loader: this torch has no torch._C._storage_Use_Count; image "
                               "buffers cannot be recycled, every episode or batch gets fresh memory")
        return None
    return use_count(tensor.untyped_storage()._cdata)


def shutdown_workers(iterator) -> None:
    """Stop a DataLoader iterator's workers now (an error, a `break`), not when the iterator is collected: a
    decode error's traceback references the iterator, and whoever keeps the exception would keep the workers
    alive. A single-process iterator has nothing to stop."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class BufferPool:
    """Main process: image buffers, each reused once nothing outside the pool holds it.

    A buffer is a (capacity, 3, H, W) float32 tensor; a consumer gets views of its first rows. A buffer is
    free when its storage has no users besides the pool's own tensor, i.e. every view handed out (to the
    consumer, to in-flight decode tasks) is gone. Where torch cannot count storage users, every request gets
    a fresh buffer.

    Every new buffer gets the largest capacity asked for so far (at least `min_rows`), so any free buffer fits
    the next request and the pool stops growing at the number of buffers alive at once. Untouched rows cost
    address space only: memory is committed page by page as rows are first written.

    Why recycle: a fresh 224-px episode is hundreds of MB of new shared memory, and the first write to each of
    its pages is a page fault in the worker; workers keep their mapping of the buffers they have written to, so
    after warm-up no page is faulted again (BENCHMARKS.md, "Episode loader").
    """

    def __init__(self, image_shape: tuple[int, int, int], shared: bool, max_buffers: int, min_rows: int = 1,
                 name: str = "lite-train-images"):
        self.image_shape, self.max_buffers, self.name = image_shape, max_buffers, name
        self.shared = shared
        self.capacity = min_rows
        self.buffers: list[tuple[torch.Tensor, int | None]] = []  # (buffer, its storage users when free)

    def allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        return shared_empty(shape, self.name) if self.shared else torch.empty(shape)

    def take(self, rows: int) -> torch.Tensor:
        """A buffer with at least `rows` rows, not referenced by anything outside the pool."""
        self.capacity = max(self.capacity, rows)
        free = [i for i, (buf, idle) in enumerate(self.buffers) if idle is not None and storage_users(buf) == idle]
        fitting = [i for i in free if len(self.buffers[i][0]) >= rows]
        if fitting:
            return self.buffers[fitting[0]][0]
        # Make room: drop free buffers that are too small, then the oldest ones if the pool is full (a
        # dropped buffer still referenced by a consumer lives on as long as that consumer holds it).
        self.buffers = [b for i, b in enumerate(self.buffers) if i not in free]
        del self.buffers[:max(0, len(self.buffers) + 1 - self.max_buffers)]
        buf = self.allocate((self.capacity,) + self.image_shape)
        self.buffers.append((buf, storage_users(buf)))
        return buf

    def clear(self) -> None:
        """Drop every buffer (one still referenced by a consumer lives on as long as it is held)."""
        self.buffers.clear()
