"""CLI flags in, one frozen `TrainConfig` out: the resolved training configuration, saved as config.json and
inside every checkpoint; plus the MD-v2 source lists and the check of which of them are converted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from manifests.reader import find_sources

# MD-v2 as LITE uses it (reference §4, LITE:src/run.py `init_data`): ImageNet is train-only (flat 1000-class
# spec), MNIST is an extra training source, VGG Flowers is gone (it belongs to VTAB).
MD_V2_TRAIN = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "mnist")
MD_V2_VALID = ("omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "mscoco")
MD_V2_TEST = ("omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "traffic_sign", "mscoco")

TRAIN_METHODS = ("lite", "small_task", "no_lite")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Defaults are the reference's (LITE:src/run.py)."""

    data: str  # root of converted sources
    out: str  # run folder: config.json, checkpoint.pt, metrics.csv, TensorBoard events, model files
    sources: tuple[str, ...]  # training sources (split "train"), resolved
    val_sources: tuple[str, ...]  # validation sources (split "valid"), resolved; () = never validate
    view: str = "md-v2"  # class-split view of every loader (LITE's: ImageNet flat, MNIST a training source)
    train_method: str = "lite"  # lite | small_task | no_lite (reference §2)
    classifier: str = "simple_cnaps"  # head of the model: simple_cnaps (LITE) | protonets
    h: int = 40  # LITE: support images that carry gradients per query chunk
    chunk_size: int = 40  # query chunk / no-grad pass size (the reference's --batch_size)
    tasks_per_step: int = 16  # tasks whose gradients accumulate into one Adam step
    learning_rate: float = 1e-3
    iterations: int = 10_000  # training tasks in total (one iteration = one task)
    image_size: int = 224
    max_way_train: int = 50
    max_support_train: int = 500
    max_query_train: int = 10  # query images per class at most (MD's max_num_query; not a reference flag)
    val_freq: int = 5000  # validate every val_freq tasks (not after the last one), as the reference
    val_episodes: int = 200  # episodes per validation source
    lite_scale: bool = False  # multiply the subset gradient by N/H (the paper's estimator; fidelity.md M3)
    backbone_weights: str | None = None  # EfficientNet weights file; None = random backbone
    # Random backbone only: before training, set its BN running statistics from the first this-many images of
    # the training stream (model.calibrate_batch_norm); without it a random backbone's features hardly depend
    # on the image. 0 = keep the initial statistics.
    calibration_images: int = 0
    seed: int = 0  # model init, episode stream, LITE subsets: every random draw derives from it
    device: str = "cpu"  # resolved torch device string
    bf16: bool = False  # CUDA only: bfloat16 autocast for the forward passes
    tf32: bool = False  # CUDA only: TF32 for float32 convolutions and matmuls (`set_tf32`; off = float32 as LITE)
    num_workers: int = 2  # episode-loader decode processes
    checkpoint_every: int = 1000  # tasks between checkpoint.pt writes (also on SIGTERM/Ctrl-C and at the end)

    def __post_init__(self):
        if self.train_method not in TRAIN_METHODS:
            raise ValueError(f"train_method {self.train_method!r} is not one of {TRAIN_METHODS}")
        for name in ("chunk_size", "tasks_per_step", "iterations", "image_size", "max_way_train",
                     "max_support_train", "max_query_train", "val_freq", "val_episodes", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.h < 0:
            raise ValueError(f"h must be >= 0, got {self.h}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.sources:
            raise ValueError("no training sources")
        if self.calibration_images < 0 or (self.calibration_images and self.backbone_weights is not None):
            raise ValueError("calibration_images is for a random backbone only (>= 0, no backbone_weights)")
        if self.bf16 and not self.device.startswith("cuda"):
            raise ValueError("bf16 autocast needs a CUDA device")
        if self.tf32 and not self.device.startswith("cuda"):
            raise ValueError("tf32 needs a CUDA device")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "config") -> "TrainConfig":
        """The inverse of `to_dict`; unknown or missing keys are errors, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{origin}: unknown config keys {sorted(unknown)}")
        raw = dict(raw)
        for key in ("sources", "val_sources"):
            if key in raw:
                raw[key] = tuple(raw[key])
        try:
            return cls(**raw)
        except TypeError as e:
            raise ValueError(f"{origin}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA float32 convolutions (cuDNN) and matmuls, process-wide. PyTorch turns it on for cuDNN
    convolutions by default; with it LITE's float32 logits move far beyond float32 rounding (docs/fidelity.md,
    "CUDA"), so `lite-train` turns it off unless `--tf32` asks for it. No effect on CPU."""
    import torch

    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def converted_sources(data: str | Path) -> set[str]:
    """Names of the complete converted sources under `data`."""
    return {p.name for p in find_sources(data)}


def resolve_sources(data: str | Path, requested: Sequence[str] | None, default: Sequence[str],
                    what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sources to use, default sources missing). Explicit names must all exist; defaults may be partial.

    Raises:
        ValueError: an explicitly requested source is not converted under `data`.
    """
    present = converted_sources(data)
    if requested:
        missing = [s for s in requested if s not in present]
        if missing:
            raise ValueError(f"{data}: {what} sources not converted there: {', '.join(missing)} "
                             f"(found: {', '.join(sorted(present)) or 'none'})")
        return tuple(requested), ()
    return tuple(s for s in default if s in present), tuple(s for s in default if s not in present)
