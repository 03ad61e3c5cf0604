"""A task embedding z (1, 64) in, 18 FiLM (gamma, beta) pairs out, plus the regulariser R that the loss
adds: LITE's FiLM generator, the "feature adaptation network" (reference lite.md §1.4; LITE:src/features.py).

Per FiLM site with C channels: gamma = 1 + g(z)·r_gamma, beta = b(z)·r_beta, where g, b are
Linear(64,64) -> LayerNorm(64) -> ReLU -> Linear(64, C) and r_gamma, r_beta are learnt C-vectors initialised
N(0, 0.001^2), so a fresh generator is near the identity. R = sum over sites of |r_gamma|^2 + |r_beta|^2.
Names (`layers.{L}.gamma_generators.0.linear1.weight`, `layers.{L}.gamma_regularizers.0`, ...) are the
reference's; each site has exactly one block (the reference's per-block lists always hold one entry).
"""

from __future__ import annotations

import torch
from torch import nn

from lite_train.model.efficientnet import FILM_CHANNELS
from lite_train.model.set_encoder import EMBEDDING_DIM

REGULARIZER_INIT_STD = 0.001


class DenseBlock(nn.Module):
    """z (1, 64) -> (1, C): Linear -> LayerNorm -> ReLU -> Linear (PyTorch default initialisation)."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.linear1 = nn.Linear(in_size, in_size)
        self.layernorm = nn.LayerNorm(in_size)
        self.linear2 = nn.Linear(in_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.layernorm(self.linear1(x))))


def _regularizer(channels: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(channels).normal_(0.0, REGULARIZER_INIT_STD))


class FilmLayerGenerator(nn.Module):
    """One FiLM site: z (1, 64) -> (gamma [C], beta [C])."""

    def __init__(self, channels: int, task_dim: int = EMBEDDING_DIM):
        super().__init__()
        # Single-entry lists: the reference's names carry the block index `.0`.
        self.gamma_generators = nn.ModuleList([DenseBlock(task_dim, channels)])
        self.gamma_regularizers = nn.ParameterList([_regularizer(channels)])
        self.beta_generators = nn.ModuleList([DenseBlock(task_dim, channels)])
        self.beta_regularizers = nn.ParameterList([_regularizer(channels)])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r_gamma, r_beta = self.gamma_regularizers[0], self.beta_regularizers[0]
        gamma = self.gamma_generators[0](z).reshape(-1) * r_gamma + torch.ones_like(r_gamma)  # (C,)
        beta = self.beta_generators[0](z).reshape(-1) * r_beta  # (C,)
        return gamma, beta

    def regularization_term(self) -> torch.Tensor:
        return (self.gamma_regularizers[0] ** 2).sum() + (self.beta_regularizers[0] ** 2).sum()


class FilmAdapter(nn.Module):
    """z (1, 64) -> [(gamma, beta)] * 18, one pair per FiLM site of FilmEfficientNet, in forward order."""

    def __init__(self, channels: tuple[int, ...] = FILM_CHANNELS, task_dim: int = EMBEDDING_DIM):
        super().__init__()
        self.layers = nn.ModuleList([FilmLayerGenerator(c, task_dim) for c in channels])

    def forward(self, z: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if z.shape != (1, self.layers[0].gamma_generators[0].linear1.in_features):
            raise ValueError(f"task embedding must have shape (1, {EMBEDDING_DIM}), got {tuple(z.shape)}")
        return [layer(z) for layer in self.layers]

    def regularization_term(self) -> torch.Tensor:
        """R = sum over sites of |r_gamma|^2 + |r_beta|^2 (a scalar with gradients)."""
        total = self.layers[0].regularization_term()
        for layer in self.layers[1:]:
            total = total + layer.regularization_term()
        return total
