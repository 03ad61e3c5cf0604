"""Models + converted sources in, accuracies out: episodes (validation and `lite-train test`), your own folders
(`lite-train predict`) and VTAB tasks (`lite-train eval-vtab`, `lite_train.evaluate.vtab`)."""

from lite_train.evaluate.episodes import (SourceResult, better_on_half, episode_accuracies, evaluate, paired_difference,
                                          summarise)
from lite_train.evaluate.predict import PredictConfig, predict_folders
from lite_train.evaluate.testing import TestConfig, run_test

__all__ = [
    "PredictConfig",
    "SourceResult",
    "TestConfig",
    "better_on_half",
    "episode_accuracies",
    "evaluate",
    "paired_difference",
    "predict_folders",
    "run_test",
    "summarise",
]
