"""The LITE model: FiLM EfficientNet-B0 + set encoder + FiLM generator + Simple CNAPs / ProtoNets head
(`LiteModel`, configured by `ModelConfig`), and backbone weights from files the user has."""

from lite_train.model.efficientnet import FILM_CHANNELS, FilmEfficientNet, calibrate_batch_norm, identity_film
from lite_train.model.heads import HEADS, ClassStats, ProtoNetsHead, SimpleCnapsHead, make_head
from lite_train.model.lite import REFERENCE_CHUNK_SIZE, LiteModel, ModelConfig, query_chunks, set_encoder_chunks
from lite_train.model.weights import backbone_state_from_file, load_backbone_weights, timm_to_lite_backbone

__all__ = [
    "FILM_CHANNELS",
    "HEADS",
    "REFERENCE_CHUNK_SIZE",
    "ClassStats",
    "FilmEfficientNet",
    "LiteModel",
    "ModelConfig",
    "ProtoNetsHead",
    "SimpleCnapsHead",
    "backbone_state_from_file",
    "calibrate_batch_norm",
    "identity_film",
    "load_backbone_weights",
    "make_head",
    "query_chunks",
    "set_encoder_chunks",
    "timm_to_lite_backbone",
]
