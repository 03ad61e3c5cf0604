"""`lite-train pretrain` flags in, one frozen `PretrainConfig` out: the resolved configuration of a supervised
backbone pretraining run, saved as config.json and inside every checkpoint and in the backbone file."""

from __future__ import annotations

import dataclasses

from lite_train.options import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ConfigRecord, check_bounds, option
from lite_train.runtime import THREADS_HELP


AUGMENTATIONS = ("crop", "flip", "none")


@dataclasses.dataclass(frozen=True)
class PretrainConfig(ConfigRecord):
    """Everything that decides a pretraining run (the CLI options are these fields)."""

    data: str = option(..., "Root of converted sources.")
    out: str = option(..., "Run folder: config.json, checkpoint.pt, metrics.csv, validation.csv, TensorBoard "
                           "events, curves.png, backbone.pt and backbone.json.")
    sources: tuple[str, ...] = option(..., "Sources whose training classes are learnt, comma-separated; labels "
                                           "number their classes in this order.")
    view: str = option("md-v2", "Class-split view: md-v2 (LITE's) | md-v1. Only the view's training classes "
                                "are ever read.")
    image_size: int = option(84, "Side of the (square) training images, px.", min=MIN_IMAGE_SIZE,
                             max=MAX_IMAGE_SIZE)
    epochs: int = option(30, "Passes over the training images; 0 = a random backbone whose BN statistics "
                             "are set from training images (a baseline).", min=0)
    batch_size: int = option(32, "Images per SGD step (all processes together).", min=2)
    learning_rate: float = option(0.02, "Peak learning rate of SGD (Nesterov momentum), reached after the "
                                        "warm-up, then cosine to 0.", min=0)
    momentum: float = option(0.9, "SGD momentum.", min=0, max=1)
    weight_decay: float = option(5e-4, "L2 weight decay on conv and linear weights (not on BN or biases).",
                                 min=0)
    warmup_epochs: float = option(1.0, "Linear learning-rate warm-up from 0, in epochs.", min=0)
    label_smoothing: float = option(0.1, "Cross-entropy label smoothing.", min=0, max=1)
    augment: tuple[str, ...] = option(("crop", "flip"), "Training-image augmentation, comma-separated: crop "
                                      "(a random window of the image padded by 1/8 of its side, edges "
                                      "replicated), flip (horizontal, p = 1/2); none = neither. Digits and "
                                      "glyphs want crop alone (a mirrored 2 is a 5).")
    holdout: float = option(0.1, "Fraction of every class's images held out of training; their accuracy is "
                                 "reported after every epoch.", min=0, max=0.9)
    bn_batches: int = option(20, "At the end, BN statistics are recomputed as the mean over this many shuffled "
                                 "training batches (no augmentation); 0 keeps the running ones.", min=0)
    seed: int = option(0, "Model initialisation, holdout, batch order and augmentation all derive from it.")
    device: str = option("cpu", "Resolved torch device.", cli=False)
    threads: int = option(0, THREADS_HELP, min=0)
    num_workers: int = option(2, "Image decode processes.", min=0)
    checkpoint_every: int = option(500, "Batches between checkpoint.pt writes (also after every epoch, on "
                                        "SIGTERM/Ctrl-C and at the end).", min=1)

    def __post_init__(self):
        check_bounds(self)
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown or ("none" in self.augment and len(self.augment) > 1):
            raise ValueError(f"--augment {','.join(self.augment)}: comma-separated from {', '.join(AUGMENTATIONS)}")
        if not self.sources:
            raise ValueError("--sources: give at least one source to pretrain on")
        if self.view not in ("md-v1", "md-v2"):
            raise ValueError(f"--view {self.view!r}: md-v1 or md-v2")


# What a resumed run must agree on (the device, threads, workers and checkpoint period may change).
PRETRAIN_RESUME_FIELDS = PretrainConfig.resume_fields()
