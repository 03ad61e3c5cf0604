"""Encoded image bytes -> TF-equal RGB uint8 -> TF1 corner-aligned bilinear resize, written into a CHW float32 buffer in [-1, 1].

Rules implemented (Meta-Dataset `data/decoder.py`, see docs reference §5):

1. Decode as `tf.image.decode_image(bytes, channels=3)` does: JPEG with libjpeg's fast integer
   IDCT and fancy upsampling (`simplejpeg` with `fastdct=True, fastupsample=False` is
   bit-identical); PNG via Pillow, alpha dropped (not blended), gray replicated to 3 channels,
   16-bit samples reduced to 8 bit as TF does (see `_png_rgb`).
2. Resize as `tf.compat.v1.image.resize_images(img, [S, S], BILINEAR, align_corners=True)`:
   source coordinate `x_in = x_out * float32((n_in - 1) / (n_out - 1))`, `lo = floor(x_in)`,
   `hi = min(lo + 1, n_in - 1)`, weight `x_in - lo`; no antialiasing, aspect ratio not kept,
   float32 output, no rounding.
3. Map to [-1, 1]: `x / 127.5 - 1` (MD writes `2 * (x / 255 - 0.5)`).

This module never imports TensorFlow. The resize is one compiled loop (numba, compiled on first use
and cached beside this file; ~3x faster than the equivalent NumPy passes, which write every
intermediate to memory); it keeps no state, so concurrent threads are safe. The loader's intended
use is one call per image inside a worker process.
"""

from __future__ import annotations

import functools
import io
import re

import numba
import numpy as np
import simplejpeg

__all__ = ["decode_rgb", "resize_into", "decode_resize_into", "compile_resize"]

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# APP14 "Adobe" segment: FF EE, 2-byte length, "Adobe". libjpeg sets saw_Adobe_marker from it.
_ADOBE_APP14 = re.compile(rb"\xff\xee..Adobe", re.DOTALL)
_DCT_SCALES = (8, 4, 2)  # power-of-two libjpeg downscales; their reduced IDCTs are the fast ones


def decode_rgb(data: bytes, *, min_size: int = 0) -> np.ndarray:
    """Decodes JPEG or PNG bytes to an RGB array exactly as `tf.image.decode_image(channels=3)`.

    The format is sniffed from the magic bytes, never from a file name.

    * JPEG (baseline, progressive, gray, any chroma subsampling): libjpeg-turbo with the fast
      integer IDCT and fancy upsampling, i.e. TF's default `dct_method=''`. Gray becomes three
      equal channels. CMYK/YCCK JPEGs are decoded to raw CMYK by libjpeg and converted with TF's
      integer rule (`tensorflow/core/lib/jpeg/jpeg_mem.cc`): with an Adobe APP14 marker (inverted
      CMYK, what Photoshop and Pillow write) `r = c * k // 255`, otherwise
      `r = (255 - c) * (255 - k) // 255`, likewise g from m and b from y.
    * PNG: see `_png_rgb`.

    Args:
      data: the encoded image.
      min_size: if > 0 and the image is a JPEG, let libjpeg downscale in the DCT domain by the
        largest power of two (1/2, 1/4, 1/8) that keeps both sides >= `min_size`. This is the
        FAST mode: pixels then differ from TF's (see `decode_resize_into`). Ignored for PNG.

    Returns:
      uint8 array of shape (H, W, 3).

    Raises:
      ValueError: unknown format, or bytes the decoder rejects (message says why).
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if data.startswith(_JPEG_MAGIC):
        return _jpeg_rgb(data, min_size)
    if data.startswith(_PNG_MAGIC):
        return _png_rgb(data)
    raise ValueError(f"not a JPEG or PNG (first bytes {data[:8]!r}, {len(data)} bytes)")


def _jpeg_rgb(data: bytes, min_size: int) -> np.ndarray:
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        kwargs = {}
        if min_size > 0:
            for f in _DCT_SCALES:  # libjpeg's scaled size is ceil(side / f)
                if -(-min(h, w) // f) >= min_size:
                    kwargs = {"min_height": -(-h // f), "min_width": -(-w // f)}
                    break
        if colorspace in ("CMYK", "YCCK"):
            # libjpeg-turbo cannot emit RGB from CMYK; TF reads CMYK and converts it itself.
            cmyk = simplejpeg.decode_jpeg(data, colorspace="CMYK", fastdct=True, fastupsample=False, **kwargs)
            return _cmyk_to_rgb(cmyk, inverted=_ADOBE_APP14.search(data) is not None)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False, **kwargs)
    except ValueError as e:  # simplejpeg reports libjpeg errors as ValueError
        raise ValueError(f"bad JPEG: {e}") from None


def _cmyk_to_rgb(cmyk: np.ndarray, *, inverted: bool) -> np.ndarray:
    c = cmyk.astype(np.uint16)  # (H, W, 4); products fit in uint16 (255 * 255)
    cmy, k = c[..., :3], c[..., 3:]
    rgb = cmy * k if inverted else (255 - cmy) * (255 - k)
    return (rgb // 255).astype(np.uint8)


def _png_rgb(data: bytes) -> np.ndarray:
    """PNG -> RGB the way TF's libpng path does with channels=3.

    Alpha (RGBA, gray+alpha, palette tRNS) is stripped, not composited; palette entries are
    expanded; gray (1/2/4/8/16-bit) is replicated. 16-bit samples keep their high byte
    (libpng `png_set_strip_16`, which TF uses): v8 = v16 >> 8.
    """
    from PIL import Image  # Pillow is only needed for the rare PNG records

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: Pillow's RGB convert clips
                g = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(g[..., None], 3, axis=2)
            # Pillow already keeps the high byte of 16-bit RGB(A)/LA samples.
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"bad PNG: {e}") from None


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
    Measured on 100 synthetic 500x375 q90 JPEGs (benchmarks/decode_bench.py `make_images`),
    |fast - exact| in [0, 255] units: 84 px mean 2.2, max 109 (at sharp edges: the reduced IDCT
    box-averages, the exact path point-samples); 126 px mean 1.4, max 65; 224 px 0 (same path).
    Speed-up at 84 px: about 1.2x images/s over the exact mode (~1.6x over TF; BENCHMARKS.md).

    Args:
      data: encoded JPEG or PNG bytes.
      out: (3, size, size) float32 np.ndarray or CPU torch tensor, written in place.
      size: output side S (84, 126, 224, ...).
      dct_scale: enable the fast DCT-domain downscale.

    Raises:
      ValueError: undecodable bytes, or `out` of the wrong shape/dtype.
    """
    resize_into(decode_rgb(data, min_size=size if dct_scale else 0), out, size)
