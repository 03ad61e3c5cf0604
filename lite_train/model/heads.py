"""Support features (N, D) + labels (N,) in, a fitted classifier out; query features (M, D) in, logits
(M, K) out, column k = the k-th smallest support label. Two heads, chosen by name through `HEADS`:

- "simple_cnaps" (LITE's head, reference lite.md §1.5; LITE:src/mahalanonbis.py): per class mean mu_k and
  precision Q_k = inverse(lambda_k·cov(F_k) + (1 - lambda_k)·cov(F) + I), lambda_k = n_k / (n_k + 1);
  logit = -(x - mu_k)^T Q_k (x - mu_k).
- "protonets" (ORBIT's ProtoNets head, ORBIT:models/classifiers.py): logit = 2·mu_k·x - |mu_k|^2, i.e. the
  negative squared Euclidean distance up to a per-query constant that softmax ignores.

Heads have no parameters (the reference's head is not an nn.Module); gradients flow through the features.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class ClassStats:
    """What a head keeps from the support set."""

    classes: torch.Tensor  # (K,) sorted unique support labels = the logit column order
    means: torch.Tensor  # (K, D) class means
    precisions: torch.Tensor | None  # (K, D, D) class precision matrices (simple_cnaps only)


def class_means(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(sorted classes (K,), means (K, D), per-class feature blocks [(n_k, D)])."""
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features (N, D) and labels (N,) expected, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    classes = torch.unique(labels)  # sorted
    blocks = [features[labels == c] for c in classes]
    means = torch.stack([b.mean(dim=0) for b in blocks])  # (K, D)
    return classes, means, blocks


def sample_covariance(x: torch.Tensor, one_shot_quirk: bool) -> torch.Tensor:
    """Unbiased covariance (D, D) of the rows of x (n, D), or for n = 1:

    one_shot_quirk=True (the reference): the reference's helper does not transpose a single row, so it
    treats it as one variable with D observations and returns the scalar unbiased variance of the D
    feature values (shape ()), which then broadcasts over every entry of the D x D matrix.
    one_shot_quirk=False (corrected): the zero matrix (one example has no spread).
    """
    n, d = x.shape
    if n == 1:
        if one_shot_quirk:
            centred = x - x.mean(dim=1, keepdim=True)  # (1, D)
            return (1.0 / (d - 1)) * (centred @ centred.t()).squeeze()  # () scalar
        return torch.zeros(d, d, dtype=x.dtype, device=x.device)
    centred = (x - x.mean(dim=0, keepdim=True)).t()  # (D, n)
    return (1.0 / (n - 1)) * (centred @ centred.t())  # (D, D)


@dataclasses.dataclass(frozen=True)
class SimpleCnapsHead:
    """Regularised per-class Mahalanobis distance (Simple CNAPs as LITE implements it)."""

    one_shot_covariance_quirk: bool = True  # see `sample_covariance`; False = zero class covariance

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        classes, means, blocks = class_means(features, labels)
        d = features.shape[1]
        task_cov = sample_covariance(features, self.one_shot_covariance_quirk)  # (D, D)
        eye = torch.eye(d, dtype=features.dtype, device=features.device)
        sigmas = []
        for block in blocks:
            lam = block.shape[0] / (block.shape[0] + 1)
            sigmas.append(lam * sample_covariance(block, self.one_shot_covariance_quirk)
                          + (1 - lam) * task_cov + eye)  # (D, D)
        # Explicit inverse as the reference, one matrix at a time: torch's batched CPU inverse (MKL) raises or
        # returns garbage once torch.set_num_threads(k > 1) has been called (torch 2.14.1).
        precisions = torch.stack([torch.inverse(sigma) for sigma in sigmas])  # (K, D, D)
        return ClassStats(classes, means, precisions)

    def logits(self, stats: ClassStats, query: torch.Tensor) -> torch.Tensor:
        diff = stats.means[:, None, :] - query[None, :, :]  # (K, M, D)
        return -(torch.matmul(diff, stats.precisions) * diff).sum(dim=2).t()  # (M, K)


@dataclasses.dataclass(frozen=True)
class ProtoNetsHead:
    """Class means as prototypes; logit = 2·mu_k·x - |mu_k|^2 (ORBIT's linear form)."""

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        classes, means, _ = class_means(features, labels)
        return ClassStats(classes, means, None)

    def logits(self, stats: ClassStats, query: torch.Tensor) -> torch.Tensor:
        return 2 * query @ stats.means.t() - (stats.means ** 2).sum(dim=1)[None, :]  # (M, K)


# name -> factory(ModelConfig-independent switches as keyword arguments); filled explicitly.
HEADS: dict[str, Callable[..., object]] = {
    "simple_cnaps": SimpleCnapsHead,
    "protonets": ProtoNetsHead,
}


def make_head(name: str, one_shot_covariance_quirk: bool = True):
    """The head registered as `name`; the covariance switch only concerns simple_cnaps."""
    if name not in HEADS:
        raise ValueError(f"unknown classifier {name!r}; known: {sorted(HEADS)}")
    if name == "simple_cnaps":
        return SimpleCnapsHead(one_shot_covariance_quirk=one_shot_covariance_quirk)
    return HEADS[name]()
