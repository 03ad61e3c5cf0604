"""Small, fast configurations of the training commands for tests (32-px images, a few tasks or batches)."""

from __future__ import annotations

from pathlib import Path

from lite_train.train import PretrainConfig, TrainConfig


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A fast configuration: 32-px images (the smallest the set encoder takes), 5-way episodes, one query
    chunk, the ProtoNets head (the loop does not depend on the head), the random backbone's BN calibrated on
    20 images, one torch thread (on a shared 2-core machine two threads wait on each other: ~10x slower)."""
    base = dict(data=str(data), out=str(out), sources=("toya", "toyb"), val_sources=(), train_method="lite",
                classifier="protonets", h=3, chunk_size=40, tasks_per_step=4, iterations=6, image_size=32,
                max_way_train=5, max_support_train=12, val_freq=1000, val_episodes=2, num_workers=0,
                checkpoint_every=1000, calibration_images=20, threads=1)
    return TrainConfig(**{**base, **overrides})


def tiny_pretrain_config(data: Path, out: Path, **overrides) -> PretrainConfig:
    """toya: 6 train classes, toyb: 5, 4 images each: 44 images, 1 held out per class -> 33, 4 batches of 8."""
    base = dict(data=str(data), out=str(out), sources=("toya", "toyb"), image_size=32, epochs=2, batch_size=8,
                learning_rate=0.01, holdout=0.25, bn_batches=2, num_workers=0, checkpoint_every=1000, threads=1)
    return PretrainConfig(**{**base, **overrides})


def train_args(cfg: TrainConfig, *extra: str) -> list[str]:
    """`lite-train train` arguments that give exactly `cfg` (for tests that go through the CLI)."""
    import dataclasses

    args = ["train"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not f.metadata.get("cli", True) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(value, tuple):
            args += [flag, ",".join(value) or "none"]
        else:
            args += [flag, str(value)]
    return args + ["--device", cfg.device, *extra]
