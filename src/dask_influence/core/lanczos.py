"""The symmetric Lanczos iteration with full reorthogonalization, from operator products only.

Used by :class:`~dask_influence.core.solvers.arnoldi.ArnoldiInfluence` (its eigenpairs) and by
CG's negative-curvature report (a bound on the smallest eigenvalue).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .operators import LinearOperator


@dataclass(frozen=True)
class LanczosResult:
    """What the Lanczos iteration produced.

    Attributes:
        basis: ``(p, m)`` float64, orthonormal columns spanning the Krylov space(s).
        alphas: ``(m,)`` float64, the diagonal of ``T = Q^T H Q``.
        betas: ``(m - 1,)`` float64, its off-diagonal (zero where the iteration restarted).
        last_beta: the norm of the residual after the last vector (``0`` on breakdown).
        restarts: how often a breakdown was followed by a fresh start vector.
        null_complement: True when the iteration proved that the operator vanishes outside
            the basis (a fresh random vector orthogonal to it was mapped to ~0, or none was
            left): the Ritz pairs of the basis are then the whole operator.
    """

    basis: Tensor
    alphas: Tensor
    betas: Tensor
    last_beta: float
    restarts: int
    null_complement: bool = False


def lanczos(
    operator: LinearOperator,
    krylov_dimension: int,
    *,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    stop: Callable[[Tensor, float], bool] | None = None,
    check_every: int = 5,
) -> LanczosResult:
    """Lanczos iteration with full reorthogonalization for a symmetric operator.

    Args:
        operator: the symmetric ``p x p`` operator; only ``operator.matmat`` is used, with
            one column per call (one sweep over the training data for a curvature operator).
        krylov_dimension: at most this many basis vectors ``m <= p``.
        tol: relative breakdown threshold. When the new Lanczos vector has norm
            ``beta_j <= tol * |T|`` (``|T|`` estimated by the largest ``|alpha|`` and ``beta``
            seen so far) the basis spans an invariant subspace and its Ritz pairs are exact.
            The iteration then restarts from a random vector orthogonal to the basis, so that
            further copies of repeated eigenvalues are found (``T`` gets a zero off-diagonal
            entry there). It stops early when the operator maps such a fresh random vector to
            (nearly) zero: then the operator vanishes on the whole complement of the basis.
        generator: seeds the random start vector(s), drawn in float64 on the CPU.
        stop: an optional early stop, asked every ``check_every`` steps: ``stop(t, beta)``
            with ``t`` the ``(j, j)`` float64 tridiagonal ``T = Q^T H Q`` of the ``j`` steps
            so far and ``beta`` the norm of the next residual (the Ritz pair ``(theta_i,
            Q s_i)`` of ``T`` has residual ``beta * |s_{j,i}|``); True ends the iteration
            there (``ArnoldiInfluence(rank="auto")`` stops once the Ritz values above its
            threshold have converged).
        check_every: steps between calls of ``stop``.

    Returns:
        a :class:`LanczosResult`; ``operator`` was applied ``m`` times.
    """
    p = operator.size
    m_max = min(int(krylov_dimension), p)
    rows = torch.zeros(m_max, p, dtype=torch.float64, device=operator.device)  # the basis, one vector per row
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    restarts = 0
    last_beta = 0.0

    def orthogonalize(w: Tensor, j: int) -> Tensor:
        # classical Gram-Schmidt, twice ("twice is enough"), against the first j basis vectors
        # (rows: contiguous in memory, 2-3x faster than a slice of columns at p = 1e4)
        q = rows[:j]
        for _ in range(2):
            w = w - (q @ w) @ q
        return w

    def random_start(j: int) -> Tensor | None:
        for _ in range(3):
            v = torch.randn(p, generator=generator, dtype=torch.float64).to(operator.device)
            v = orthogonalize(v, j)
            norm = float(torch.linalg.vector_norm(v))
            if norm > 1e-8:  # a random unit vector is mostly outside a basis of dimension j < p
                return v / norm
        return None

    q = random_start(0)
    assert q is not None
    j = 0
    segment_start = 0
    null_complement = False
    while True:
        rows[j] = q
        w = operator.matmat(q.to(operator.dtype).unsqueeze(1)).squeeze(1).double()
        alpha = float(q @ w)
        alphas.append(alpha)
        w = orthogonalize(w, j + 1)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alpha), beta)
        j += 1
        last_beta = beta
        if j >= m_max:
            break
        if stop is not None and j % check_every == 0 and beta > tol * scale and stop(tridiagonal(alphas, betas), beta):
            break
        if beta > tol * scale:
            betas.append(beta)
            q = w / beta
            continue
        # breakdown: the span of the j basis vectors is invariant under the operator
        last_beta = 0.0
        if j - segment_start == 1 and abs(alpha) <= tol * scale:
            # a random vector orthogonal to the basis is mapped to ~0: the operator vanishes
            # on the complement of the basis, nothing is left to find
            null_complement = True
            break
        q = random_start(j)
        if q is None:
            null_complement = True  # the basis spans (numerically) everything
            break
        betas.append(0.0)
        restarts += 1
        segment_start = j
    return LanczosResult(
        basis=rows[:j].T.contiguous(),
        alphas=torch.tensor(alphas, dtype=torch.float64, device=operator.device),
        betas=torch.tensor(betas, dtype=torch.float64, device=operator.device),
        last_beta=last_beta,
        restarts=restarts,
        null_complement=null_complement,
    )


def tridiagonal(alphas: list[float] | Tensor, betas: list[float] | Tensor) -> Tensor:
    """The symmetric tridiagonal matrix ``(m, m)`` (float64, CPU) with diagonal ``alphas`` ``(m,)``
    and off-diagonal ``betas`` ``(m - 1,)``."""
    a = torch.as_tensor(alphas, dtype=torch.float64).cpu()
    b = torch.as_tensor(betas, dtype=torch.float64).cpu()
    t = torch.diag(a)
    if a.numel() > 1:
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t
