"""Episode data: MD's episode-description law, per-class image streams, TF-identical decoding, the loader."""

from lite_train.data.decode import decode_resize_into, decode_rgb
from lite_train.data.episode_description import EpisodeDescriptionConfig, EpisodeDescriptionSampler, sampler_rngs
from lite_train.data.episodes import EpisodePlan, EpisodePlanner, open_readers
from lite_train.data.loader import Episode, EpisodeLoader, EpisodeLoaderConfig, make_episode_loader

__all__ = [
    "Episode",
    "EpisodeDescriptionConfig",
    "EpisodeDescriptionSampler",
    "EpisodeLoader",
    "EpisodeLoaderConfig",
    "EpisodePlan",
    "EpisodePlanner",
    "decode_resize_into",
    "decode_rgb",
    "make_episode_loader",
    "open_readers",
    "sampler_rngs",
]
