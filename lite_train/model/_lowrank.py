"""Simple CNAPs' Sigma_k^{-1} applied without forming it: support features in, a factored `LowRankStats` out;
query features in, squared Mahalanobis distances (K, M) out. Float64 throughout; used by
`heads.SimpleCnapsHead(solver="cholesky")`.

Every covariance is a Gram matrix of centred rows, so with T the task's rows (N x D: (F - mu) / sqrt(N - 1))
and C_k class k's ((F_k - mu_k) / sqrt(n_k - 1); the 1-shot quirk: one row s·1, see `heads.covariance_rows`),

    Sigma_k = I + a_k^2 C_k^T C_k + b_k^2 T^T T,   a_k^2 = lambda_k, b_k^2 = 1 - lambda_k.

With W_k = [a_k C_k; b_k T], Woodbury gives d^T Sigma_k^{-1} d = |d|^2 - t^T (I + W_k W_k^T)^{-1} t, t = W_k d,
and the block form of I + W_k W_k^T = [[A, B], [B^T, D_k]] (A = I + a^2 C_k C_k^T, B = ab C_k T^T,
D_k = I + b^2 T T^T) gives, with L_D = chol(D_k), E = L_D^{-1} B^T, L_S = chol(A - E^T E) (the Schur
complement), u = L_D^{-1} t_T and v = L_S^{-1} (t_C - E^T u):

    d^T Sigma_k^{-1} d = |d|^2 - |u|^2 - |v|^2.

The task part D_k depends on the class only through b_k (i.e. its shot count n_k), so its factor is shared by
the classes with the same n_k, and the task's Gram matrix T T^T is computed once: the cost is that of the
N x N task factors plus small per-class blocks, instead of K factors of (n_k + N) x (n_k + N) or D x D.
Rows beyond D (N or n_k > D) are compressed first to D rows with the same Gram matrix (QR's R).
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class LowRankStats:
    """The factored Sigma_k of every class (module docstring), float64."""

    task: torch.Tensor  # (r_t, D) task rows T (r_t = N, 1 or 0, at most D)
    class_rows: list  # per class (r_k, D): a_k C_k
    b: list  # per class b_k (float)
    task_factor: list  # per class the index of its L_D in `task_factors`
    task_factors: list  # (r_t, r_t) lower Cholesky factors of I + b^2 T T^T, one per distinct b
    e: list  # per class (r_t, r_k): L_D^{-1} B^T
    schur: list  # per class (r_k, r_k): lower Cholesky factor of A - E^T E (None if r_k = 0)


def _cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a matrix that is positive definite by construction (identity plus a Gram
    matrix); numerically it is not when the features are so large that the identity is lost to rounding.

    Raises:
        ValueError: one line saying so (the reference's inverse would return garbage instead).
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        scale = float(matrix.diagonal(dim1=-2, dim2=-1).abs().max())
        raise ValueError(f"Simple CNAPs: the {what} is not positive definite in float64 (its largest diagonal "
                         f"entry is {scale:.3g}): the support features are too large for I + covariance; is the "
                         "backbone's BN calibrated, or is this a ProtoNets model?")
    return factor


def compress(rows: torch.Tensor) -> torch.Tensor:
    """At most D rows with the same Gram matrix rows^T rows: R of rows = QR when there are more than D."""
    if rows.shape[0] <= rows.shape[1]:
        return rows
    return torch.linalg.qr(rows, mode="reduced").R  # (D, D): R^T R = rows^T rows


def fit_lowrank(task: torch.Tensor, class_rows: list, lambdas: list) -> LowRankStats:
    """task: (r_t, D) task rows; class_rows: per class (r_k, D) unscaled class rows; lambdas: per class
    lambda_k = n_k / (n_k + 1)."""
    task = compress(task)
    r_t = task.shape[0]
    eye_t = torch.eye(r_t, dtype=task.dtype, device=task.device)
    gram = task @ task.t()  # (r_t, r_t)
    factors, factor_of_b, scaled, bs, index, es, schurs = [], {}, [], [], [], [], []
    for rows, lam in zip(class_rows, lambdas):
        a, b = math.sqrt(lam), math.sqrt(1.0 - lam)
        if b not in factor_of_b:
            factor_of_b[b] = len(factors)
            factors.append(_cholesky(eye_t + (b * b) * gram, "task covariance"))  # (r_t, r_t)
        l_d = factors[factor_of_b[b]]
        c = a * compress(rows)  # (r_k, D)
        r_k = c.shape[0]
        cross = b * (c @ task.t())  # B = ab C T^T: (r_k, r_t)
        e = torch.linalg.solve_triangular(l_d, cross.t(), upper=False)  # (r_t, r_k)
        schur = None
        if r_k:
            inner = torch.eye(r_k, dtype=c.dtype, device=c.device) + c @ c.t() - e.t() @ e  # (r_k, r_k)
            schur = _cholesky(inner, "class covariance")
        scaled.append(c)
        bs.append(b)
        index.append(factor_of_b[b])
        es.append(e)
        schurs.append(schur)
    return LowRankStats(task, scaled, bs, index, factors, es, schurs)


def squared_distances(stats: LowRankStats, means: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """(K, M): (x_m - mu_k)^T Sigma_k^{-1} (x_m - mu_k) for float64 means (K, D) and queries (M, D)."""
    squared = (query * query).sum(dim=1)[None, :] - 2 * means @ query.t() + (means * means).sum(dim=1)[:, None]
    task_q = stats.task @ query.t()  # (r_t, M)
    task_mu = stats.task @ means.t()  # (r_t, K)
    # u = L_D^{-1} b (T q - T mu_k): the shared solve per distinct b, then the class's own mean column
    solved_q = [torch.linalg.solve_triangular(f, task_q, upper=False) for f in stats.task_factors]  # (r_t, M)
    solved_mu = [torch.linalg.solve_triangular(f, task_mu, upper=False) for f in stats.task_factors]  # (r_t, K)
    rows = []
    for k, (c, b, f, e, schur) in enumerate(zip(stats.class_rows, stats.b, stats.task_factor, stats.e,
                                                   stats.schur)):
        u = b * (solved_q[f] - solved_mu[f][:, k:k + 1])  # (r_t, M)
        distance = squared[k] - (u * u).sum(dim=0)  # (M,)
        if schur is not None:
            t_c = c @ query.t() - (c @ means[k])[:, None]  # (r_k, M) = a C_k (x - mu_k)
            v = torch.linalg.solve_triangular(schur, t_c - e.t() @ u, upper=False)  # (r_k, M)
            distance = distance - (v * v).sum(dim=0)
        rows.append(distance)
    return torch.stack(rows)  # (K, M)


def precisions(stats: LowRankStats) -> torch.Tensor:
    """Sigma_k^{-1} as explicit (K, D, D) matrices, for checks: Sigma_k built from its rows and inverted."""
    d = stats.task.shape[1]
    eye = torch.eye(d, dtype=stats.task.dtype, device=stats.task.device)
    task_cov = stats.task.t() @ stats.task  # (D, D)
    return torch.stack([torch.cholesky_inverse(torch.linalg.cholesky(eye + c.t() @ c + b * b * task_cov))
                        for c, b in zip(stats.class_rows, stats.b)])
