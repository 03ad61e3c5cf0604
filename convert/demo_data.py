"""A seed in, a small real-format Meta-Dataset records folder out (written with TensorFlow's own writer).

`write_demo_data(root, seed)` writes, deterministically:
* `demo_textures/`: a flat source (DatasetSpecification), 30 classes split 20/5/5, 40 JPEGs each of a
  procedurally drawn class-specific texture (gratings, checkers, rings, waves) at 100-200 px;
* `demo_glyphs/`: an Omniglot-like bilevel source (BiLevelDatasetSpecification), 8 alphabets split 4/2/2,
  10-14 characters each, 20 images per character: 105×105 black strokes on white, each character a few
  fixed random strokes, each image that character under a small affine jitter, stroke width and noise;
* `mnist_idx/`: gzipped `t10k-{images-idx3,labels-idx1}-ubyte.gz` of 100 drawn digits per class.
TensorFlow is imported only inside `write_md_records` (the one place that needs it).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np

TEXTURE_SPLITS = (20, 5, 5)
TEXTURE_IMAGES = 40
GLYPH_ALPHABET_SPLITS = (4, 2, 2)
GLYPH_IMAGES = 20
GLYPH_SIDE = 105
DIGITS_PER_CLASS = 100

# Seven-segment digit skeletons in a unit box (x right, y down): segment -> end points.
_SEGMENTS = {"a": ((0, 0), (1, 0)), "b": ((1, 0), (1, .5)), "c": ((1, .5), (1, 1)), "d": ((0, 1), (1, 1)),
             "e": ((0, .5), (0, 1)), "f": ((0, 0), (0, .5)), "g": ((0, .5), (1, .5))}
_DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")


def write_md_records(path: str | Path, images: Iterable[bytes], label: int) -> None:
    """Write one MD class file with TF's `tf.io.TFRecordWriter` + `tf.train.Example` (image, label)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's start-up banner off the demo's output
    import tensorflow as tf  # the converter's only TF use: producing genuine records

    with tf.io.TFRecordWriter(str(path)) as writer:
        for image in images:
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }))
            writer.write(example.SerializeToString())


def write_spec(folder: Path, spec: dict[str, Any]) -> None:
    """`dataset_spec.json` in MD's JSON layout (indent 2, keys in MD's to_dict order)."""
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=2))


def flat_spec(name: str, split_counts: tuple[int, int, int], counts: list[int], names: list[str],
              path: str) -> dict[str, Any]:
    """A `DatasetSpecification` dict: classes of each split are contiguous ids in TRAIN, VALID, TEST order."""
    return {
        "name": name,
        "classes_per_split": dict(zip(("TRAIN", "VALID", "TEST"), split_counts)),
        "images_per_class": {str(i): n for i, n in enumerate(counts)},
        "class_names": {str(i): s for i, s in enumerate(names)},
        "path": path,
        "file_pattern": "{}.tfrecords",
        "__class__": "DatasetSpecification",
    }


def bilevel_spec(name: str, sc_splits: tuple[int, int, int], per_sc: list[int], counts: list[int],
                 sc_names: list[str], names: list[str], path: str) -> dict[str, Any]:
    """A `BiLevelDatasetSpecification` dict (Omniglot's layout)."""
    return {
        "name": name,
        "superclasses_per_split": dict(zip(("TRAIN", "VALID", "TEST"), sc_splits)),
        "classes_per_superclass": {str(i): n for i, n in enumerate(per_sc)},
        "images_per_class": {str(i): n for i, n in enumerate(counts)},
        "superclass_names": {str(i): s for i, s in enumerate(sc_names)},
        "class_names": {str(i): s for i, s in enumerate(names)},
        "path": path,
        "file_pattern": "{}.tfrecords",
        "__class__": "BiLevelDatasetSpecification",
    }


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def texture_image(params: dict[str, Any], rng: np.random.RandomState) -> np.ndarray:
    """One [H, W, 3] uint8 image of a class's texture: random size 100-200 px, phase, scale and noise."""
    h, w = rng.randint(100, 201, size=2)
    yy = np.arange(h, dtype=np.float32)[:, None] / 100.0  # [H, 1]
    xx = np.arange(w, dtype=np.float32)[None, :] / 100.0  # [1, W]
    t = params["angle"] + rng.uniform(-0.15, 0.15)
    f = params["freq"] * rng.uniform(0.9, 1.1)
    u = xx * np.cos(t) + yy * np.sin(t)
    v = -xx * np.sin(t) + yy * np.cos(t)
    phase = rng.uniform(0, 2 * np.pi)
    kind = params["kind"]
    if kind == 0:  # grating
        m = np.sin(2 * np.pi * f * u + phase)
    elif kind == 1:  # checkerboard
        m = np.sign(np.sin(2 * np.pi * f * u + phase) * np.sin(2 * np.pi * f * v))
    elif kind == 2:  # rings around a random centre
        cx, cy = rng.uniform(0, w / 100.0), rng.uniform(0, h / 100.0)
        m = np.sin(2 * np.pi * f * np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + phase)
    else:  # waves
        m = np.sin(2 * np.pi * f * u + 2.0 * np.sin(2 * np.pi * f / 2 * v) + phase)
    m = ((m + 1) / 2)[..., None]  # [H, W, 1] in [0, 1]
    noise = rng.randint(-20, 21, size=(h, w, 1)).astype(np.float32)
    img = params["c1"] * m + params["c2"] * (1 - m) + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def glyph_image(strokes: list[np.ndarray], rng: np.random.RandomState) -> np.ndarray:
    """One 105×105 image of a character (list of [K, 2] polylines): affine jitter, width, noise."""
    from PIL import Image, ImageDraw

    a = rng.uniform(-0.15, 0.15)
    s = rng.uniform(0.9, 1.1)
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = np.array([GLYPH_SIDE / 2, GLYPH_SIDE / 2])
    shift = rng.uniform(-5, 5, size=2)
    img = Image.new("L", (GLYPH_SIDE, GLYPH_SIDE), 255)
    draw = ImageDraw.Draw(img)
    width = int(rng.randint(2, 5))
    for stroke in strokes:
        pts = (stroke - centre) @ rot.T + centre + shift + rng.normal(0, 1.0, size=stroke.shape)
        draw.line([tuple(p) for p in pts], fill=0, width=width, joint="curve")
    pixels = np.asarray(img).copy()
    specks = rng.randint(0, GLYPH_SIDE, size=(30, 2))
    pixels[specks[:, 0], specks[:, 1]] = rng.randint(0, 160, size=30)
    return pixels


def digit_image(digit: int, rng: np.random.RandomState) -> np.ndarray:
    """One 28×28 uint8 white-on-black digit: a jittered seven-segment skeleton drawn at 4x, then reduced."""
    from PIL import Image, ImageDraw

    big = 112
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    slant, sx, sy = rng.uniform(-0.3, 0.1), rng.uniform(30, 42), rng.uniform(56, 70)
    ox, oy = big / 2 - sx / 2 + rng.uniform(-6, 6), big / 2 - sy / 2 + rng.uniform(-6, 6)
    width = int(rng.randint(8, 14))
    for seg in _DIGIT_SEGMENTS[digit]:
        pts = []
        for x, y in _SEGMENTS[seg]:
            x, y = x + rng.uniform(-0.08, 0.08), y + rng.uniform(-0.05, 0.05)
            pts.append((ox + sx * (x - slant * (y - 0.5)), oy + sy * y))
        draw.line(pts, fill=255, width=width, joint="curve")
    return np.asarray(img.resize((28, 28), Image.LANCZOS))


def _write_textures(folder: Path, rng: np.random.RandomState) -> None:
    folder.mkdir(parents=True)
    n = sum(TEXTURE_SPLITS)
    names = []
    for c in range(n):
        params = {"kind": c % 4, "angle": rng.uniform(0, np.pi), "freq": rng.uniform(2.0, 8.0),
                  "c1": rng.randint(0, 256, size=3).astype(np.float32),
                  "c2": rng.randint(0, 256, size=3).astype(np.float32)}
        names.append(f"{('grating', 'checker', 'rings', 'waves')[c % 4]}_{c:02d}")
        write_md_records(folder / f"{c}.tfrecords",
                         [_jpeg(texture_image(params, rng)) for _ in range(TEXTURE_IMAGES)], c)
    write_spec(folder, flat_spec(folder.name, TEXTURE_SPLITS, [TEXTURE_IMAGES] * n, names, folder.name))


def _write_glyphs(folder: Path, rng: np.random.RandomState) -> None:
    folder.mkdir(parents=True)
    n_sc = sum(GLYPH_ALPHABET_SPLITS)
    per_sc = [int(rng.randint(10, 15)) for _ in range(n_sc)]
    sc_names = [f"Demo_Alphabet_{chr(ord('A') + k)}" for k in range(n_sc)]
    names, c = [], 0
    for k, n_chars in enumerate(per_sc):
        for j in range(n_chars):
            strokes = [rng.uniform(18, 87, size=(rng.randint(2, 5), 2)) for _ in range(rng.randint(2, 5))]
            write_md_records(folder / f"{c}.tfrecords",
                             [_jpeg(glyph_image(strokes, rng)) for _ in range(GLYPH_IMAGES)], c)
            names.append(f"{sc_names[k]}-character{j + 1:02d}")
            c += 1
    write_spec(folder, bilevel_spec(folder.name, GLYPH_ALPHABET_SPLITS, per_sc, [GLYPH_IMAGES] * c,
                                    sc_names, names, folder.name))


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Gzipped MNIST t10k idx files (magic 2051 / 2049, big-endian counts); gzip mtime 0 (reproducible)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(images)
    with gzip.GzipFile(folder / "t10k-images-idx3-ubyte.gz", "wb", mtime=0) as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + np.ascontiguousarray(images, np.uint8).tobytes())
    with gzip.GzipFile(folder / "t10k-labels-idx1-ubyte.gz", "wb", mtime=0) as f:
        f.write(struct.pack(">II", 2049, n) + np.ascontiguousarray(labels, np.uint8).tobytes())


def write_demo_data(root: str | Path, seed: int = 0) -> list[Path]:
    """Write the demo records folder under `root` (which must not exist or be empty); returns what was made."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root}: exists and is not empty")
    rng = np.random.RandomState(seed)
    made = [root / "demo_textures", root / "demo_glyphs", root / "mnist_idx"]
    _write_textures(made[0], rng)
    _write_glyphs(made[1], rng)
    labels = rng.permutation(np.repeat(np.arange(10), DIGITS_PER_CLASS)).astype(np.uint8)
    write_idx(made[2], np.stack([digit_image(int(d), rng) for d in labels]), labels)
    return made
