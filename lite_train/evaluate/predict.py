"""A model file + a folder of labelled support images + a folder of query images in, predictions out: a CSV
(query file, predicted class, softmax score per class) and a printed table (`lite-train predict`).

Images are decoded and resized exactly as in training (`lite_train.data.decode`: TF-equal JPEG/PNG decode,
corner-aligned bilinear resize, [-1, 1]); other formats Pillow can open (BMP, GIF, WebP, TIFF, ...) are
converted to RGB by Pillow first, then resized the same way. Images of 2**29 decoded bytes or more are
refused, as TensorFlow refuses them (a 14000 x 14000 photo), on the size their header declares, before
anything is decoded (what guards against decompression bombs).
Every entry of the folders is accounted for: hidden files (dot files) are skipped and counted; a
sub-folder, a broken link or an unreadable file among the images is an error naming it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from lite_train.data.decode import decode_rgb, resize_into
from lite_train.files import atomic_write
from lite_train.options import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_bounds, option
from lite_train.runtime import THREADS_HELP

MAX_DECODED_BYTES = 2 ** 29  # TF's decode_image limit, as manifests.decode.decode_rgb enforces it


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """`lite-train predict` settings (the CLI options are these fields)."""

    checkpoint: str = option(..., "A model file (checkpoint.pt, fully_trained.pt, a LITE .pt, or backbone "
                                  "weights: identity FiLM).")
    support: str = option(..., "Folder with one sub-folder of images per class.")
    query: str = option(..., "Folder of images to classify.")
    out: str = option("predictions.csv", "CSV: file, predicted class, score per class.")
    overwrite: bool = option(False, "Replace --out if it exists (otherwise an existing file is an error).")
    image_size: int | None = option(None, "Image side [default: the size the model was trained at; 224 for "
                                          "files that do not say].", min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE)
    chunk_size: int = option(40, "Images per no-grad pass.", min=2)
    device: str = option("cpu", "Resolved torch device.", cli=False)
    tf32: bool = option(False, "CUDA: TF32 float32 convolutions/matmuls (docs/fidelity.md M10).")
    threads: int = option(0, THREADS_HELP, min=0)

    def __post_init__(self):
        check_bounds(self)

    def check_output(self) -> None:
        """Before any work: --out must be a file name whose folder can hold it, and new unless --overwrite."""
        out = Path(self.out)
        if out.is_dir():
            raise ValueError(f"--out {out}: is a folder; give a file name, e.g. {out / 'predictions.csv'}")
        if out.exists() and not self.overwrite:
            raise ValueError(f"--out {out}: exists; pass --overwrite to replace it, or choose another name")
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is not a folder")


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a PNG's IHDR chunk or a JPEG's frame header declares it, read without decoding
    anything; None for other formats or a header that cannot be read (the decoders then refuse the file)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        import simplejpeg

        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except (ValueError, KeyError):
            return None
        return width, height
    return None


def _too_large(path: Path, width: int, height: int) -> ValueError:
    return ValueError(f"{path}: {width} x {height} pixels, too large to decode (TensorFlow's limit: "
                      f"{MAX_DECODED_BYTES} bytes of RGB); resize it first")


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """(3, S, S) float32 in [-1, 1]. Raises ValueError naming the file if it is not a readable image or too
    large (checked on the header, before anything is decoded)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    declared = _declared_size(data)
    if declared is not None and declared[0] * declared[1] * 3 >= MAX_DECODED_BYTES:
        raise _too_large(path, *declared)
    try:
        rgb = decode_rgb(data)  # (H, W, 3) uint8
    except ValueError as first:
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():  # Pillow's DecompressionBombWarning: the size is checked here
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
                    if w * h * 3 >= MAX_DECODED_BYTES:
                        raise _too_large(path, w, h)
                    rgb = np.asarray(img.convert("RGB"))
        except Image.DecompressionBombError as e:
            raise ValueError(f"{path}: too large to decode ({e}); resize it first") from None
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{path}: not a readable image ({first})") from None
    out = torch.empty(3, image_size, image_size)
    resize_into(rgb, out, image_size)
    return out


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Visible regular files of `folder`, sorted, and how many hidden entries (dot files) were skipped.

    Raises:
        ValueError: a visible entry that is not a readable file (a sub-folder, a broken link, a FIFO).
    """
    entries = sorted(folder.iterdir())
    hidden = sum(1 for p in entries if p.name.startswith("."))
    files = []
    for p in entries:
        if p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            raise ValueError(f"{p}: a broken link")
        if not p.is_file():
            raise ValueError(f"{p}: not an image file ({'a folder' if p.is_dir() else 'not a regular file'}); "
                             f"{folder} must hold only images")
        files.append(p)
    return files, hidden


def read_support(folder: Path, image_size: int) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
    """(class names sorted, images (N, 3, S, S), labels (N,) = index into the names, hidden files skipped).

    Raises:
        ValueError: not a folder, fewer than two classes, an empty class, a loose file, an unreadable image.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of class folders")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    loose = [p for p in entries if not p.is_dir()]
    if loose:
        raise ValueError(f"{loose[0]}: the support folder must hold only class folders")
    if len(entries) < 2:
        raise ValueError(f"{folder}: needs at least two class folders, found {len(entries)}")
    images, labels, hidden = [], [], 0
    for label, class_dir in enumerate(entries):
        files, skipped = _image_files(class_dir)
        hidden += skipped
        if not files:
            raise ValueError(f"{class_dir}: no images")
        images += [load_image(p, image_size) for p in files]
        labels += [label] * len(files)
    return [p.name for p in entries], torch.stack(images), torch.tensor(labels, dtype=torch.int64), hidden


def read_query(folder: Path, image_size: int) -> tuple[list[Path], torch.Tensor, int]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    files, hidden = _image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no images")
    return files, torch.stack([load_image(p, image_size) for p in files]), hidden


def predict_folders(model: torch.nn.Module, support_dir: Path, query_dir: Path, image_size: int,
                    device: torch.device, chunk_size: int = 40) -> tuple[list[str], list[Path], torch.Tensor, int]:
    """(class names, query files, softmax scores (Q, classes), hidden files skipped)."""
    names, support, labels, hidden_s = read_support(support_dir, image_size)
    files, query, hidden_q = read_query(query_dir, image_size)
    logits = model.predict(support.to(device), labels.to(device), query.to(device), chunk_size=chunk_size)
    return names, files, torch.softmax(logits.float().cpu(), dim=1), hidden_s + hidden_q  # (Q, classes)


def write_predictions(path: Path, names: list[str], files: list[Path], scores: torch.Tensor,
                      settings: dict | None = None) -> None:
    """CSV: file, predicted, then one score column per class (softmax of the logits), written atomically; and
    beside it `<path>.json`: the settings it was made with (the PredictConfig, the image size, the model's
    metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["file", "predicted", *names])
    for file, row in zip(files, scores.tolist()):
        writer.writerow([file.name, names[int(np.argmax(row))], *(f"{v:.6f}" for v in row)])
    atomic_write(path, text.getvalue())
    if settings is not None:
        import json

        atomic_write(path.with_name(path.name + ".json"), json.dumps(settings, indent=1, default=str) + "\n")


def print_predictions(names: list[str], files: list[Path], scores: torch.Tensor) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="predictions (softmax score per class)")
    table.add_column("query")
    table.add_column("predicted")
    for name in names:
        table.add_column(name, justify="right")
    for file, row in zip(files, scores.tolist()):
        best = int(np.argmax(row))
        table.add_row(file.name, names[best], *(f"{v:.3f}" for v in row))
    Console().print(table)
