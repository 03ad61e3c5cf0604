"""Meta-training and pretraining: `TrainConfig` / `PretrainConfig` in, a run folder out."""

from lite_train.train.checkpoint import load_checkpoint, save_checkpoint
from lite_train.train.config import MD_V2_TEST, MD_V2_TRAIN, MD_V2_VALID, TrainConfig, resolve_sources
from lite_train.train.loop import TrainResult, task_generator, train
from lite_train.train.pretraining import PretrainResult, pretrain
from lite_train.train.pretrain_config import PretrainConfig
from lite_train.train.step import lite_task_backward, no_lite_backward, small_task_backward

__all__ = [
    "MD_V2_TEST",
    "MD_V2_TRAIN",
    "MD_V2_VALID",
    "PretrainConfig",
    "PretrainResult",
    "TrainConfig",
    "TrainResult",
    "lite_task_backward",
    "load_checkpoint",
    "no_lite_backward",
    "pretrain",
    "resolve_sources",
    "save_checkpoint",
    "small_task_backward",
    "task_generator",
    "train",
]
