"""Episode data: MD's episode-description law, per-class image streams, TF-identical decoding, the loader;
the ordered front-end (VTAB tasks: a support block, then ordered query batches)."""

from lite_train.data.decode import decode_resize_into, decode_rgb
from lite_train.data.episode_description import EpisodeDescriptionConfig, EpisodeDescriptionSampler, sampler_rngs
from lite_train.data.episodes import EpisodePlan, EpisodePlanner, open_readers
from lite_train.data.loader import Episode, EpisodeLoader, EpisodeLoaderConfig, make_episode_loader
from lite_train.data.ordered import (OrderedBatch, OrderedLoaderConfig, OrderedTask, open_ordered_task, query_batches,
                                     read_support)

__all__ = [
    "Episode",
    "EpisodeDescriptionConfig",
    "EpisodeDescriptionSampler",
    "EpisodeLoader",
    "EpisodeLoaderConfig",
    "EpisodePlan",
    "EpisodePlanner",
    "OrderedBatch",
    "OrderedLoaderConfig",
    "OrderedTask",
    "decode_resize_into",
    "decode_rgb",
    "make_episode_loader",
    "open_ordered_task",
    "open_readers",
    "query_batches",
    "read_support",
    "sampler_rngs",
]
