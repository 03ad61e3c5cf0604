"""scikit-learn's two bundled sample photographs -> a deterministic ImageNet-like set of JPEG bytes.

The benchmarks need real photographs (natural texture, edges, noise and colour statistics), because the
decoder's fast mode errs most at fine detail that synthetic images lack (issue 9). Nothing can be
downloaded here, but scikit-learn ships two photos (`china.jpg`, `flower.jpg`, 640x427) inside the package.
Each fixture image i is derived from one of them with its own generator `default_rng([seed, i])` (so the
first k images are the same whatever the count):

  1. an output size like ILSVRC's: half of them 500x375, the rest 375x500, 500x333, 333x500, 500x500 or
     500 wide and 300-450 high;
  2. a crop with that aspect ratio, at a random scale (resampled by 0.6x up to the largest crop that fits)
     and position, resampled with PIL's bicubic filter; a horizontal flip with probability 1/2;
  3. a colour shift: per-channel gain, contrast, saturation and brightness;
  4. encoded as a baseline JPEG, 4:2:0, quality 90 (Pillow's libjpeg).

The bytes are cached under `bench-out/` (keyed by seed, count, quality and the Pillow and scikit-learn
versions, which decide the bytes), written atomically.

Consumes: the sample photos of the installed scikit-learn. Produces: `list[bytes]` of JPEGs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["PhotoConfig", "photo_jpegs", "summary", "DEFAULT_CACHE"]

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "bench-out"
_FORMAT = "v1"  # bump when the derivation below changes: old cache files then stop matching

# (width, height, weight): ILSVRC's most common shapes; height None: drawn uniformly from 300-450.
_SHAPES = ((500, 375, 0.5), (375, 500, 0.14), (500, 333, 0.12), (333, 500, 0.04), (500, 500, 0.06),
           (500, None, 0.14))


@dataclasses.dataclass(frozen=True)
class PhotoConfig:
    """Which fixture: `count` images from generator seed `seed`, JPEG quality `quality`."""

    count: int = 1000
    seed: int = 0
    quality: int = 90


def _sources() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(im) for im in load_sample_images().images]  # each (427, 640, 3) uint8


def _output_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one image."""
    w, h, _ = _SHAPES[rng.choice(len(_SHAPES), p=[s[2] for s in _SHAPES])]
    return w, (h if h is not None else int(rng.integers(300, 451)))


def _derive(source: np.ndarray, rng: np.random.Generator, quality: int) -> bytes:
    src_h, src_w, _ = source.shape
    w, h = _output_size(rng)
    # Crop = output size x scale; the largest scale that fits the photo; 0.6 caps the upsampling blur.
    largest = min(src_w / w, src_h / h)
    scale = float(rng.uniform(min(0.6, largest), largest))
    cw, ch = w * scale, h * scale
    x0, y0 = float(rng.uniform(0, src_w - cw)), float(rng.uniform(0, src_h - ch))
    im = Image.fromarray(source).resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(im, np.float32)  # (h, w, 3)
    gray = a.mean(axis=2, keepdims=True)  # (h, w, 1)
    a = gray + (a - gray) * rng.uniform(0.7, 1.3)  # saturation
    a = (a - 128.0) * rng.uniform(0.8, 1.2) + 128.0  # contrast
    a = a * rng.uniform(0.88, 1.12, size=3) + rng.uniform(-20, 20)  # per-channel gain, brightness
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    return out.getvalue()


def _cache_path(cfg: PhotoConfig, cache_dir: Path) -> Path:
    versions = f"pil{importlib.metadata.version('pillow')}-skl{importlib.metadata.version('scikit-learn')}"
    return cache_dir / f"photos-{_FORMAT}-s{cfg.seed}-n{cfg.count}-q{cfg.quality}-{versions}.npz"


def photo_jpegs(cfg: PhotoConfig = PhotoConfig(), cache_dir: Path | None = DEFAULT_CACHE) -> list[bytes]:
    """The fixture's JPEG bytes, from the cache when it holds them (`cache_dir=None`: never cached).

    Image i depends only on (seed, i, quality) and the library versions, not on `count`.
    """
    if cfg.count < 1 or not 1 <= cfg.quality <= 100:
        raise ValueError(f"bad photo fixture config {cfg}")
    path = _cache_path(cfg, Path(cache_dir)) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            data, ends = z["data"], z["ends"]
        return [data[a:b].tobytes() for a, b in zip(np.r_[0, ends[:-1]], ends)]
    sources = _sources()
    images = []
    for i in range(cfg.count):
        rng = np.random.default_rng([cfg.seed, i])
        images.append(_derive(sources[int(rng.integers(len(sources)))], rng, cfg.quality))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, data=np.frombuffer(b"".join(images), np.uint8),
                     ends=np.cumsum([len(b) for b in images]))
        os.replace(tmp, path)
    return images


def summary(images: list[bytes]) -> str:
    """One phrase describing a fixture: count, shapes, mean size (for table captions)."""
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    common = max(set(sizes), key=sizes.count)
    return (f"{len(images)} photo JPEGs derived from scikit-learn's 2 sample photos (crops, flips, colour "
            f"shifts, scales; `benchmarks/photos.py`), q90 4:2:0, {sum(s == common for s in sizes)} of them "
            f"{common[0]}x{common[1]}, widths {min(s[0] for s in sizes)}-{max(s[0] for s in sizes)}, heights "
            f"{min(s[1] for s in sizes)}-{max(s[1] for s in sizes)}, mean {np.mean([len(b) for b in images]) / 1e3:.0f} kB")
