"""Which images of a class fill an episode: per-class passes + cursor with Meta-Dataset's flush rule.

In MD every class is an infinite stream of passes over its record file (`data/reader.py`), and the episode
generator keeps a cursor into the current pass (`pipeline.py`): a request for `need` images that does not
fit in what is left of the pass discards ("flushes") the rest and starts the next pass. Hence no image
repeats inside an episode, and consecutive episodes draw disjoint images of a class until its pass ends.

Only the order inside a pass differs between the two modes (see docs/fidelity.md):
- "md": MD's `shuffle(min(n, 1000))` over record order. With n <= 1000 a pass is a uniform permutation; with
  n > 1000 output j of a pass is drawn uniformly from what is left of records 0 .. 999 + j (a local shuffle
  biased towards file order), which this emulates on record indices instead of 1000 buffered images.
- "uniform": every pass is a uniform permutation, whatever n.
Both are lazy for big classes: memory grows with the images drawn in the current pass, not with n.
"""

from __future__ import annotations

import numpy as np

SHUFFLE_BUFFER_SIZE = 1000  # MD's DataConfig.shuffle_buffer_size as set by its Trainer
ORDERS = ("md", "uniform")


class ClassStream:
    """The pass-by-pass image order of one class of `num_images` images, read through a cursor.

    Args:
        num_images: n, the class size from the manifest.
        order: "md" or "uniform" (module docstring).
        rng: the RandomState that draws every pass order; shared by the streams of a source so the whole
            selection is a function of the seed and the sequence of requests.
    """

    def __init__(self, num_images: int, order: str, rng: np.random.RandomState,
                 buffer_size: int = SHUFFLE_BUFFER_SIZE):
        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {ORDERS}")
        if num_images < 1:
            raise ValueError("a class stream needs at least one image")
        self.num_images = num_images
        self.order = order
        self.rng = rng
        self.buffer_size = buffer_size
        self.cursor = 0  # position in the current pass
        self.passes = 0  # completed or flushed passes
        self._start_pass()

    def _start_pass(self) -> None:
        n = self.num_images
        self._small = n <= self.buffer_size or self.order == "uniform" and n <= 4 * self.buffer_size
        if self._small:
            self._perm = self.rng.permutation(n).astype(np.int64)  # uniform permutation: (n,)
        elif self.order == "md":
            self._buffer = list(range(self.buffer_size))  # record indices waiting in the shuffle buffer
            self._next_record = self.buffer_size
        else:
            self._swapped: dict[int, int] = {}  # sparse Fisher-Yates: position -> record, where moved

    def take(self, need: int) -> np.ndarray:
        """The next `need` record indices of the class (within-class positions), flushing if needed.

        Rule (MD `episode_representation_generator`): if need > n - cursor, the rest of the pass is
        discarded and a new pass starts; then the next `need` elements are returned, cursor += need.
        """
        n = self.num_images
        if need > n:
            raise ValueError(f"asked for {need} images of a class that has {n}")
        if need > n - self.cursor:
            self.passes += 1
            self.cursor = 0
            self._start_pass()
        start = self.cursor
        self.cursor += need
        if self._small:
            return self._perm[start:start + need]
        if self.order == "md":
            return np.fromiter((self._draw_from_buffer() for _ in range(need)), np.int64, need)
        return np.fromiter((self._draw_fisher_yates(start + i) for i in range(need)), np.int64, need)

    def _draw_from_buffer(self) -> int:
        """One output of TF's shuffle buffer: a uniform slot, refilled with the next record if any."""
        buf = self._buffer
        slot = self.rng.randint(len(buf))
        out = buf[slot]
        if self._next_record < self.num_images:
            buf[slot] = self._next_record
            self._next_record += 1
        else:  # end of file: the buffer drains
            buf[slot] = buf[-1]
            buf.pop()
        return out

    def _draw_fisher_yates(self, position: int) -> int:
        """Element `position` of a uniform permutation built lazily by Fisher-Yates swaps."""
        swapped = self._swapped
        j = self.rng.randint(position, self.num_images)
        out = swapped.get(j, j)
        swapped[j] = swapped.pop(position, position)
        return out
