"""Meta-training and pretraining: `TrainConfig` / `PretrainConfig` -> run folder; model + sources -> accuracies."""

from lite_train.train.checkpoint import load_checkpoint, save_checkpoint
from lite_train.train.config import MD_V2_TEST, MD_V2_TRAIN, MD_V2_VALID, TrainConfig, resolve_sources
from lite_train.train.evaluate import SourceResult, better_on_half, evaluate, summarise
from lite_train.train.loop import TrainResult, task_generator, train
from lite_train.train.pretrain import PretrainResult, pretrain
from lite_train.train.pretrain_config import PretrainConfig
from lite_train.train.step import lite_task_backward, no_lite_backward, small_task_backward

__all__ = [
    "MD_V2_TEST",
    "MD_V2_TRAIN",
    "MD_V2_VALID",
    "PretrainConfig",
    "PretrainResult",
    "SourceResult",
    "TrainConfig",
    "TrainResult",
    "better_on_half",
    "evaluate",
    "lite_task_backward",
    "load_checkpoint",
    "no_lite_backward",
    "pretrain",
    "resolve_sources",
    "save_checkpoint",
    "small_task_backward",
    "summarise",
    "task_generator",
    "train",
]
