"""Support features (N, D) + labels (N,) in, a fitted classifier out; query features (M, D) in, logits
(M, K) out, column k = the k-th smallest support label. Two heads, chosen by name through `HEADS`:

- "simple_cnaps" (LITE's head, reference lite.md §1.5; LITE:src/mahalanonbis.py): per class mean mu_k and
  Sigma_k = lambda_k·cov(F_k) + (1 - lambda_k)·cov(F) + I, lambda_k = n_k / (n_k + 1);
  logit = -(x - mu_k)^T Sigma_k^{-1} (x - mu_k).
- "protonets" (ORBIT's ProtoNets head, ORBIT:models/classifiers.py): logit = 2·mu_k·x - |mu_k|^2, i.e. the
  negative squared Euclidean distance up to a per-query constant that softmax ignores.

How Simple CNAPs applies Sigma_k^{-1} (`solver`):
- "cholesky" (default): Sigma_k = I + a_k^2 C_k^T C_k + b_k^2 T^T T from the centred class and task rows, and
  d^T Sigma_k^{-1} d by Woodbury and a Schur complement, with Cholesky factors of small matrices and of the
  task's N x N Gram matrix shared by the classes of equal shot count (`lite_train.model._lowrank`), in
  float64 (the Woodbury difference cancels where Sigma has large eigenvalues; float64 keeps it well below
  float32 rounding). Far fewer operations than an inverse (BENCHMARKS.md, "Training speed"), no D x D matrix
  per class, and closer to LITE's float64 numbers than LITE's own float32.
- "inverse": the reference's explicit float32 `torch.inverse` of every Sigma_k (docs/fidelity.md M11).

Heads have no parameters (the reference's head is not an nn.Module); gradients flow through the features.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from lite_train.model._lowrank import LowRankStats, fit_lowrank, precisions, squared_distances

SOLVERS = ("cholesky", "inverse")


@dataclasses.dataclass(frozen=True)
class ClassStats:
    """What a head keeps from the support set."""

    classes: torch.Tensor  # (K,) sorted unique support labels = the logit column order
    means: torch.Tensor  # (K, D) class means
    precisions: torch.Tensor | None = None  # simple_cnaps "inverse": (K, D, D) explicit precision matrices
    lowrank: LowRankStats | None = None  # simple_cnaps "cholesky": the factored Sigma_k (float64)

    def precision_matrices(self) -> torch.Tensor:
        """Sigma_k^{-1} as explicit (K, D, D) matrices (for checks; the "cholesky" logits never form them)."""
        if self.precisions is not None:
            return self.precisions
        if self.lowrank is None:
            raise ValueError("this head keeps no covariances (ProtoNets)")
        return precisions(self.lowrank)


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


def covariance_rows(x: torch.Tensor, one_shot_quirk: bool) -> torch.Tensor:
    """Rows R (r, D) with R^T R = `sample_covariance(x, one_shot_quirk)` (broadcast scalar included):
    (x - mean) / sqrt(n - 1) for n >= 2; for n = 1 with the quirk the scalar variance s^2 fills the D x D
    matrix, which is s·1 times its transpose (one row); without it, no rows."""
    n, d = x.shape
    if n >= 2:
        return (x - x.mean(dim=0, keepdim=True)) / math.sqrt(n - 1)  # (n, D)
    if not one_shot_quirk:
        return x.new_zeros(0, d)
    centred = x - x.mean(dim=1, keepdim=True)  # (1, D)
    variance = (centred * centred).sum() / (d - 1)  # () the quirk's scalar
    # clamp: a constant feature row has variance 0, where sqrt's gradient is infinite
    return variance.clamp_min(1e-300).sqrt() * x.new_ones(1, d)  # (1, D)


@dataclasses.dataclass(frozen=True)
class SimpleCnapsHead:
    """Regularised per-class Mahalanobis distance (Simple CNAPs as LITE implements it)."""

    one_shot_covariance_quirk: bool = True  # see `sample_covariance`; False = zero class covariance
    solver: str = "cholesky"  # one of SOLVERS (module docstring)

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown Simple CNAPs solver {self.solver!r}; known: {SOLVERS}")

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        if self.solver == "inverse":
            return self._fit_inverse(features, labels)
        classes, means, blocks = class_means(features, labels)
        quirk = self.one_shot_covariance_quirk
        task = covariance_rows(features.double(), quirk)  # (N or 1 or 0, D)
        rows = [covariance_rows(block.double(), quirk) for block in blocks]  # (n_k or 1 or 0, D) each
        lambdas = [len(block) / (len(block) + 1) for block in blocks]
        return ClassStats(classes, means, lowrank=fit_lowrank(task, rows, lambdas))

    def _fit_inverse(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
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
        return ClassStats(classes, means, precisions=precisions)

    def logits(self, stats: ClassStats, query: torch.Tensor) -> torch.Tensor:
        if stats.precisions is not None:
            diff = stats.means[:, None, :] - query[None, :, :]  # (K, M, D)
            return -(torch.matmul(diff, stats.precisions) * diff).sum(dim=2).t()  # (M, K)
        distance = squared_distances(stats.lowrank, stats.means.double(), query.double())  # (K, M)
        return -distance.t().to(query.dtype)  # (M, K)


@dataclasses.dataclass(frozen=True)
class ProtoNetsHead:
    """Class means as prototypes; logit = 2·mu_k·x - |mu_k|^2 (ORBIT's linear form)."""

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        classes, means, _ = class_means(features, labels)
        return ClassStats(classes, means)

    def logits(self, stats: ClassStats, query: torch.Tensor) -> torch.Tensor:
        return 2 * query @ stats.means.t() - (stats.means ** 2).sum(dim=1)[None, :]  # (M, K)


# name -> factory(ModelConfig-independent switches as keyword arguments); filled explicitly.
HEADS: dict[str, Callable[..., object]] = {
    "simple_cnaps": SimpleCnapsHead,
    "protonets": ProtoNetsHead,
}


def make_head(name: str, one_shot_covariance_quirk: bool = True, solver: str = "cholesky"):
    """The head registered as `name`; the covariance switches only concern simple_cnaps."""
    if name not in HEADS:
        raise ValueError(f"unknown classifier {name!r}; known: {sorted(HEADS)}")
    if name == "simple_cnaps":
        return SimpleCnapsHead(one_shot_covariance_quirk=one_shot_covariance_quirk, solver=solver)
    return HEADS[name]()
