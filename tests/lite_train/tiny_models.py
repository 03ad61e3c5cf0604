"""A small random LITE model whose gradients are worth comparing (shared by the step and lite-scale tests)."""

from __future__ import annotations

import torch

from lite_train.model import LiteModel, ModelConfig, calibrate_batch_norm


def tiny_lite_model(size: int, calibration_images: int, classifier: str = "simple_cnaps") -> LiteModel:
    """A seeded float64 `LiteModel` in train mode: backbone BN calibrated on `calibration_images` random
    `size`-px images, FiLM regularisers drawn from N(0, 0.05) (non-trivial FiLM)."""
    torch.manual_seed(0)
    model = LiteModel(ModelConfig(classifier=classifier)).double()
    # A random backbone needs BN statistics that fit its activations, or its features barely depend on
    # the image and every gradient vanishes (~1e-28).
    calibration = torch.rand(calibration_images, 3, size, size, generator=torch.Generator().manual_seed(9),
                             dtype=torch.float64)
    calibrate_batch_norm(model.feature_extractor, calibration * 2 - 1)
    with torch.no_grad():  # non-trivial FiLM so the FiLM path carries real gradients
        for name, p in model.feature_adaptation_network.named_parameters():
            if "_regularizers." in name:
                p.normal_(0, 0.05)
    return model.train()
