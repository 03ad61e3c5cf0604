"""Encoded image bytes -> TF-equal RGB uint8 -> TF1 corner-aligned bilinear resize, written into a CHW float32 buffer in [-1, 1].

Rules implemented (Meta-Dataset `data/decoder.py`, see docs reference §5):

1. Decode as `tf.image.decode_image(bytes, channels=3)` does, accepting and refusing the same bytes:
   `manifests.decode.decode_rgb` (the byte-level decoder lives in `manifests` so that
   `lite-convert verify --decode` runs the very decoder training uses).
2. Resize as `tf.compat.v1.image.resize_images(img, [S, S], BILINEAR, align_corners=True)`:
   source coordinate `x_in = x_out * float32((n_in - 1) / (n_out - 1))`, `lo = floor(x_in)`,
   `hi = min(lo + 1, n_in - 1)`, weight `x_in - lo`; no antialiasing, aspect ratio not kept,
   float32 output, no rounding.
3. Map to [-1, 1]: `x / 127.5 - 1` (MD writes `2 * (x / 255 - 0.5)`).

This module never imports TensorFlow. The resize is one compiled loop (numba, compiled on first use
and cached beside this file; faster than the equivalent NumPy passes, which write every intermediate
to memory, see BENCHMARKS.md); it keeps no state, so concurrent threads are safe. The loader's intended
use is one call per image inside a worker process.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from manifests.decode import decode_rgb

__all__ = ["decode_rgb", "resize_into", "decode_resize_into", "compile_resize"]


@functools.lru_cache(maxsize=512)
def _axis_table(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 `align_corners=True` interpolation table for one axis: (lo, hi, weight of hi)."""
    if n_out > 1:
        scale = np.float32(n_in - 1) / np.float32(n_out - 1)
    else:  # TF's rule for a single output sample: plain in/out scale, i.e. take index 0
        scale = np.float32(n_in) / np.float32(n_out)
    src = np.arange(n_out, dtype=np.float32) * scale  # float32, as TF computes it
    lo = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - np.floor(src)).astype(np.float32)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _resize_kernel(src, y_lo, y_hi, wy, x_lo, x_hi, wx, out):  # pragma: no cover (compiled)
    """src (H, W, 3) uint8 -> out (3, S, S) float32 = bilinear / 127.5 - 1, in float32 throughout.

    Per output row: blend its two source rows over the full width (a contiguous, vectorised loop
    into a (W*3,) scratch row), then blend the two source columns of every output pixel.
    """
    w3 = src.shape[1] * 3
    rows = src.reshape(src.shape[0], w3)  # (H, W*3)
    blended = np.empty(w3, np.float32)  # (W*3,) the current output row before the column blend
    scale = np.float32(1.0 / 127.5)
    one = np.float32(1.0)
    for y in range(out.shape[1]):
        top, bottom, ly = rows[y_lo[y]], rows[y_hi[y]], wy[y]
        for i in range(w3):
            t = np.float32(top[i])
            blended[i] = t + (np.float32(bottom[i]) - t) * ly
        for x in range(out.shape[2]):
            left, right, lx = x_lo[x] * 3, x_hi[x] * 3, wx[x]
            for c in range(3):
                v = blended[left + c]
                out[c, y, x] = (v + (blended[right + c] - v) * lx) * scale - one


def resize_into(img: np.ndarray, out, size: int) -> None:
    """Resizes an RGB uint8 image to size x size and writes `resized / 127.5 - 1` into `out`.

    Implements TF1 `resize_images(..., BILINEAR, align_corners=True)` separably (rows, then
    columns; TF blends columns first, which differs by float32 rounding only). Agrees with TF to
    float32 rounding (tested: |delta| <= 1e-3 in [0, 255] units).

    Args:
      img: (H, W, 3) uint8.
      out: (3, size, size) float32 C-contiguous np.ndarray or CPU torch tensor (e.g. a row of a
        shared-memory episode buffer); written in place.
      size: output side S.
    """
    out = out if isinstance(out, np.ndarray) else out.numpy()  # torch CPU tensor: shares memory
    h, w, ch = img.shape
    if ch != 3 or out.shape != (3, size, size) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"resize_into: img {img.shape}, out {out.shape} {out.dtype}, size {size}")
    y_lo, y_hi, wy = _axis_table(h, size)
    x_lo, x_hi, wx = _axis_table(w, size)
    _resize_kernel(np.ascontiguousarray(img), y_lo, y_hi, wy, x_lo, x_hi, wx, out)


def compile_resize() -> None:
    """Compile the resize kernel now (or load it from numba's cache), e.g. in a parent process before it
    forks workers, which then inherit the compiled code instead of each compiling it (~0.6 s)."""
    resize_into(np.zeros((2, 2, 3), np.uint8), np.empty((3, 2, 2), np.float32), 2)


def decode_resize_into(data: bytes, out, size: int, *, dct_scale: bool = False) -> None:
    """Decodes one image and writes its MD-normalised size x size CHW float32 form into `out`.

    Exact mode (default): TF-equal decode (`decode_rgb`) then `resize_into`; matches MD's TF
    pipeline to < 1e-3 in [0, 255] units.

    Fast mode (`dct_scale=True`, opt-in, NOT TF-equal): JPEGs are decoded at 1/2, 1/4 or 1/8 scale
    in the DCT domain (largest power of two keeping both sides >= size), then resized with the
    same bilinear rule. It helps when the source is >= 2x the target (e.g. 500x375 -> 84: decode at
    1/4); for 224 from 375 rows no power-of-two downscale fits, so it equals the exact mode.
    The error is large on photographs (the reduced IDCT box-averages where the exact path
    point-samples, so fine texture and edges differ): at 84 px most values are off by more than one
    level. Its error against TF and its speed against the exact mode, measured on photographs
    (benchmarks/photos.py), are in BENCHMARKS.md and docs/fidelity.md (deviation 7).

    Args:
      data: encoded JPEG or PNG bytes.
      out: (3, size, size) float32 np.ndarray or CPU torch tensor, written in place.
      size: output side S (84, 126, 224, ...).
      dct_scale: enable the fast DCT-domain downscale.

    Raises:
      ValueError: undecodable bytes, or `out` of the wrong shape/dtype.
    """
    resize_into(decode_rgb(data, min_size=size if dct_scale else 0), out, size)
