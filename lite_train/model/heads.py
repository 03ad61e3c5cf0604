"""Support features (N, D) + labels (N,) in, a fitted classifier out; query features (M, D) in, logits
(M, K) out, column k = the k-th smallest support label. Two heads, chosen by name through `HEADS`:

- "simple_cnaps" (LITE's head, reference lite.md §1.5; LITE:src/mahalanonbis.py): per class mean mu_k and
  Sigma_k = lambda_k·cov(F_k) + (1 - lambda_k)·cov(F) + I, lambda_k = n_k / (n_k + 1);
  logit = -(x - mu_k)^T Sigma_k^{-1} (x - mu_k).
- "protonets" (ORBIT's ProtoNets head, ORBIT:models/classifiers.py): logit = 2·mu_k·x - |mu_k|^2, i.e. the
  negative squared Euclidean distance up to a per-query constant that softmax ignores.

How Simple CNAPs applies Sigma_k^{-1} (`solver`):
- "cholesky" (default): every covariance is a Gram matrix of centred rows, so Sigma_k = I + W_k^T W_k with
  W_k (r_k, D) stacking sqrt(lambda_k / (n_k - 1))·(F_k - mu_k) and sqrt((1 - lambda_k) / (N - 1))·(F - mu)
  (r_k = n_k + N rows; the 1-shot quirk adds one row of ones, see `covariance_rows`). When r < D the Woodbury
  identity gives d^T Sigma^{-1} d = |d|^2 - |L^{-1} W d|^2 with L the Cholesky factor of the r x r matrix
  I + W W^T; otherwise L factors Sigma itself (D x D) and d^T Sigma^{-1} d = |L^{-1} d|^2. Computed in float64
  (the Woodbury difference cancels where Sigma has large eigenvalues; float64 keeps it well below float32
  rounding) and batched over classes by zero rows, which change neither form. Far fewer operations than an
  inverse (BENCHMARKS.md, "Training speed"), and closer to LITE's float64 numbers than LITE's own float32.
- "inverse": the reference's explicit float32 `torch.inverse` of every Sigma_k (docs/fidelity.md M11).

Heads have no parameters (the reference's head is not an nn.Module); gradients flow through the features.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

SOLVERS = ("cholesky", "inverse")


@dataclasses.dataclass(frozen=True)
class ClassStats:
    """What a head keeps from the support set."""

    classes: torch.Tensor  # (K,) sorted unique support labels = the logit column order
    means: torch.Tensor  # (K, D) class means
    # simple_cnaps "inverse": (K, D, D) explicit precision matrices
    precisions: torch.Tensor | None = None
    # simple_cnaps "cholesky", float64: factor rows W (K, r, D) with Sigma_k = I + W_k^T W_k (zero rows pad
    # classes to a common r), and the lower Cholesky factor of I + W W^T (K, r, r) if r < D, else of Sigma
    # (K, D, D)
    rows: torch.Tensor | None = None
    cholesky: torch.Tensor | None = None

    def precision_matrices(self) -> torch.Tensor:
        """Sigma_k^{-1} as explicit (K, D, D) matrices (for checks; the logits never form them)."""
        if self.precisions is not None:
            return self.precisions
        if self.rows is None:
            raise ValueError("this head keeps no covariances (ProtoNets)")
        k, r, d = self.rows.shape
        if r >= d:
            return torch.cholesky_inverse(self.cholesky)
        # Woodbury: Sigma^{-1} = I - W^T (I + W W^T)^{-1} W
        inner = torch.cholesky_solve(self.rows, self.cholesky)  # (K, r, D)
        return torch.eye(d, dtype=self.rows.dtype, device=self.rows.device) - self.rows.transpose(1, 2) @ inner


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
        x = features.double()  # (N, D)
        d = x.shape[1]
        task_rows = covariance_rows(x, self.one_shot_covariance_quirk)  # (N or 1 or 0, D)
        per_class = []
        for block in blocks:
            lam = block.shape[0] / (block.shape[0] + 1)
            per_class.append(torch.cat([math.sqrt(lam) * covariance_rows(block.double(), self.one_shot_covariance_quirk),
                                        math.sqrt(1 - lam) * task_rows]))  # (r_k, D)
        r = max(len(w) for w in per_class)
        rows = x.new_zeros(len(per_class), r, d)  # (K, r, D): zero rows add nothing to I + W^T W
        for k, w in enumerate(per_class):
            rows[k, :len(w)] = w
        if r < d:
            inner = torch.eye(r, dtype=x.dtype, device=x.device) + rows @ rows.transpose(1, 2)  # (K, r, r)
        else:
            inner = torch.eye(d, dtype=x.dtype, device=x.device) + rows.transpose(1, 2) @ rows  # (K, D, D)
        return ClassStats(classes, means, rows=rows, cholesky=torch.linalg.cholesky(inner))

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
        q, mu, rows, chol = query.double(), stats.means.double(), stats.rows, stats.cholesky
        if rows.shape[1] >= rows.shape[2]:  # D x D factor: |L^{-1} (x - mu_k)|^2
            diff = (q[None, :, :] - mu[:, None, :]).transpose(1, 2)  # (K, D, M)
            solved = torch.linalg.solve_triangular(chol, diff, upper=False)  # (K, D, M)
            distance = (solved * solved).sum(dim=1)  # (K, M)
        else:  # Woodbury: |x - mu_k|^2 - |L^{-1} W_k (x - mu_k)|^2, without forming the (K, M, D) differences
            projected = torch.einsum("md,krd->krm", q, rows) - (rows @ mu[:, :, None])  # (K, r, M) = W_k (x - mu_k)
            solved = torch.linalg.solve_triangular(chol, projected, upper=False)  # (K, r, M)
            squared = (q * q).sum(dim=1)[None, :] - 2 * mu @ q.t() + (mu * mu).sum(dim=1)[:, None]  # (K, M)
            distance = squared - (solved * solved).sum(dim=1)  # (K, M)
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
