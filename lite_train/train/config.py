"""`lite-train train` flags in, one frozen `TrainConfig` out: the resolved meta-training configuration, saved as
config.json, inside every checkpoint and in every model file; plus the MD-v2 source lists and the check of
which of them are converted. Every field is a command-line option (`lite_train.options`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from lite_train.data.episode_description import EpisodeDescriptionConfig
from lite_train.data.loader import EpisodeLoaderConfig
from lite_train.model.heads import HEADS
from lite_train.options import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ConfigRecord, check_bounds, option
from lite_train.runtime import THREADS_HELP
from manifests.reader import find_sources
from manifests.sources import MD_V2_TEST, MD_V2_TRAIN, MD_V2_VALID  # noqa: F401 (MD_V2_TEST: lite_train.train exports it)


TRAIN_METHODS = ("lite", "small_task", "no_lite")
VIEWS = ("md-v2", "md-v1")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigRecord):
    """Everything that decides a training run. Defaults are the reference's (LITE:src/run.py)."""

    data: str = option(..., "Root of converted sources.")
    out: str = option(..., "Run folder: config.json, checkpoint.pt, metrics.csv, validation.csv, TensorBoard "
                           "events, curves.png, fully_trained.pt, best_validation.pt.")
    sources: tuple[str, ...] = option((), "Training sources (split train), comma-separated [default: the "
                                          "MD-v2 training sources present].")
    val_sources: tuple[str, ...] = option((), "Validation sources (split valid) [default: the MD-v2 "
                                              "validation sources present]; none = never validate.")
    view: str = option("md-v2", "Class-split view: md-v2 (LITE's) | md-v1.")
    train_method: str = option("lite", "lite | small_task | no_lite (reference §2).")
    classifier: str = option("simple_cnaps", "Head: simple_cnaps (LITE) | protonets.")
    h: int = option(40, "LITE: support images that carry gradients per query chunk (0 = only the query path, "
                        "as the reference allows).", min=0)
    chunk_size: int = option(40, "Query chunk and no-grad pass size (the reference's --batch_size).", min=2)
    tasks_per_step: int = option(16, "Tasks per Adam step (gradient accumulation).", min=1)
    learning_rate: float = option(1e-3, "Adam learning rate.", min=0)
    iterations: int = option(10_000, "Training tasks in total.", min=1)
    image_size: int = option(224, "Side of the (square) images, px.", min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE)
    max_way_train: int = option(50, "Most classes per training episode (MD's max_ways_upper_bound; at least "
                                    "MD's min_ways, 5).", min=5)
    max_support_train: int = option(500, "Most support images per training episode (at least "
                                         "--max-way-train: one per class).", min=5)
    max_query_train: int = option(10, "Query images per class at most (MD's max_num_query).", min=1)
    val_freq: int = option(5000, "Validate every this many tasks (never after the last).", min=1)
    val_episodes: int = option(200, "Episodes per validation source.", min=1)
    lite_scale: bool = option(False, "Multiply the H-subset gradient by N/H (the paper's estimator; "
                                     "docs/fidelity.md M3 says where it is unbiased).")
    backbone_weights: str | None = option(None, "EfficientNet-B0 weights: lite-train pretrain's backbone.pt, "
                                                "EfficientNet-PyTorch, timm or a LITE model [default: random].")
    # Random backbone only: before training, set its BN running statistics from the first this-many images of
    # the training stream (model.calibrate_batch_norm); without it a random backbone's features hardly depend
    # on the image. 0 = keep the initial statistics.
    calibration_images: int = option(0, "Random backbone: set its BN statistics from this many training "
                                        "images first.", min=0)
    seed: int = option(0, "Model initialisation, episode stream and LITE subsets all derive from it.")
    device: str = option("cpu", "Resolved torch device.", cli=False)
    bf16: bool = option(False, "bfloat16 autocast (CUDA only).")
    tf32: bool = option(False, "CUDA: TF32 float32 convolutions/matmuls (faster; moves LITE's logits beyond "
                               "float32 rounding, docs/fidelity.md M10).")
    threads: int = option(0, THREADS_HELP, min=0)
    num_workers: int = option(2, "Episode decode processes.", min=0)
    checkpoint_every: int = option(1000, "Tasks between checkpoint.pt writes (also on SIGTERM/Ctrl-C and at "
                                         "the end).", min=1)

    def __post_init__(self):
        check_bounds(self)
        if self.train_method not in TRAIN_METHODS:
            raise ValueError(f"--train-method {self.train_method!r}: one of {', '.join(TRAIN_METHODS)}")
        if self.classifier not in HEADS:
            raise ValueError(f"--classifier {self.classifier!r}: one of {', '.join(sorted(HEADS))}")
        if self.view not in VIEWS:
            raise ValueError(f"--view {self.view!r}: one of {', '.join(VIEWS)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate {self.learning_rate}: must be positive")
        if self.max_support_train < self.max_way_train:
            raise ValueError(f"--max-support-train {self.max_support_train}: fewer than --max-way-train "
                             f"{self.max_way_train} (every class of an episode needs a support image)")
        if not self.sources:
            raise ValueError("no training sources (--sources)")
        if self.calibration_images and self.backbone_weights is not None:
            raise ValueError("--calibration-images is for a random backbone only (no --backbone-weights)")
        if self.bf16 and not self.device.startswith("cuda"):
            raise ValueError("--bf16: bfloat16 autocast needs a CUDA device")
        if self.tf32 and not self.device.startswith("cuda"):
            raise ValueError("--tf32: TF32 needs a CUDA device")

    def description(self) -> EpisodeDescriptionConfig:
        """The training episodes' law: MD's, with the reference's training caps."""
        return EpisodeDescriptionConfig(max_ways_upper_bound=self.max_way_train,
                                        max_support_set_size=self.max_support_train,
                                        max_num_query=self.max_query_train)

    def loader_config(self, rank: int = 0, world_size: int = 1, **overrides) -> EpisodeLoaderConfig:
        """The training episode loader of this run (this process's share under torchrun)."""
        values = dict(data=self.data, sources=self.sources, split="train", seed=self.seed,
                      image_size=self.image_size, view=self.view, num_workers=self.num_workers,
                      pin_memory=self.device.startswith("cuda"), rank=rank, world_size=world_size)
        return EpisodeLoaderConfig(**{**values, **overrides})


# What a resumed run must agree on (the device, threads, workers and checkpoint period may change, and the
# What a resumed run must agree on (the device, threads, workers and checkpoint period may change).
TRAIN_RESUME_FIELDS = TrainConfig.resume_fields()


def converted_sources(data: str | Path) -> set[str]:
    """Names of the complete converted sources under `data`."""
    return {p.name for p in find_sources(data)}


def resolve_sources(data: str | Path, requested: Sequence[str] | None, default: Sequence[str],
                    what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sources to use, default sources missing). Explicit names must all exist; defaults may be partial.

    Raises:
        ValueError: `data` is not a folder, or an explicitly requested source is not converted there.
    """
    if not Path(data).is_dir():
        raise ValueError(f"--data {data}: no such folder")
    present = converted_sources(data)
    if requested:
        missing = [s for s in requested if s not in present]
        if missing:
            raise ValueError(f"{data}: {what} sources not converted there: {', '.join(missing)} "
                             f"(found: {', '.join(sorted(present)) or 'none'})")
        return tuple(requested), ()
    return tuple(s for s in default if s in present), tuple(s for s in default if s not in present)


def resolve_train_config(values: dict[str, Any], device: str) -> tuple[TrainConfig, list[str]]:
    """Command-line values -> the resolved TrainConfig (default sources filled in, `none` validation) and the
    notes to show (MD-v2 sources that are not converted).

    Raises:
        ValueError: one line naming the bad option.
    """
    values = dict(values)
    notes = []
    data = values["data"]
    sources, missing = resolve_sources(data, values.get("sources"), MD_V2_TRAIN, "training")
    if missing:
        notes.append(f"MD-v2 training sources not converted under {data} (training without them): "
                     f"{', '.join(missing)}")
    if not sources:
        raise ValueError(f"{data}: none of the MD-v2 training sources is converted there; pass --sources")
    if tuple(values.get("val_sources") or ()) == ("none",):
        val = ()
    else:
        val, missing = resolve_sources(data, values.get("val_sources"), MD_V2_VALID, "validation")
        if missing:
            notes.append(f"MD-v2 validation sources not converted under {data} (validating without them): "
                         f"{', '.join(missing)}")
    values.update(sources=sources, val_sources=val, device=device)
    return TrainConfig(**values), notes
