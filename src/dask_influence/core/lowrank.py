"""Low-rank pieces built from curvature-vector products only.

``nystroem_sketch`` is the randomized Nystroem approximation ``H ~ U diag(eigenvalues) U^T``
(Frangella, Tropp & Udell 2023, Alg. 2.1, with the stabilizing shift): it costs ONE block
product of ``H`` with ``rank`` random vectors. ``adaptive_nystroem_sketch`` doubles the
probes, one sweep per doubling, until the sketch reaches below a threshold.
``LowRankFactor.inverse_apply`` applies the Woodbury inverse of
``U diag(eigenvalues) U^T + regularization * I``. ``LowRankInfo`` is the report of a solve
with retained eigenvectors (Arnoldi, Nystroem): how much of each right-hand side they capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .eigen import EigenOperator
from .operators import LinearOperator
from .serialization import serializable


@serializable
@dataclass(frozen=True)
class LowRankFactor:
    """``U diag(eigenvalues) U^T``: ``U`` ``(p, r)`` orthonormal, ``eigenvalues`` ``(r,)`` descending."""

    basis: Tensor
    eigenvalues: Tensor

    def inverse_apply(self, v: Tensor, regularization: float) -> Tensor:
        """``(U diag(e) U^T + mu I)^-1 v`` for ``v`` ``(p, k)``, by Woodbury; needs ``mu > 0``.

        Equals ``U diag(1/(e+mu)) U^T v + (v - U U^T v) / mu``.
        """
        if regularization <= 0:
            raise ValueError(
                "The low-rank inverse needs regularization > 0 (the complement of the sketched "
                f"subspace is treated as regularization*I); got {regularization}."
            )
        return EigenOperator(self.eigenvalues, self.basis).inverse_apply(v, regularization, complement=True)


def nystroem_sketch(operator: LinearOperator, rank: int, generator: torch.Generator) -> LowRankFactor:
    """Randomized Nystroem approximation of a positive semi-definite operator.

    Args:
        operator: ``p x p``, symmetric PSD (a Hessian that is not PSD gives a PSD
            approximation of its positive part at best).
        rank: number of random probe vectors ``r <= p``.
        generator: seeds the Gaussian test matrix (drawn on the CPU, then moved).

    Returns:
        a :class:`LowRankFactor` with ``r`` non-negative eigenvalues.
    """
    p = operator.size
    if not 1 <= rank <= p:
        raise ValueError(f"rank must be between 1 and the number of parameters {p}; got {rank}.")
    omega = _probes(p, rank, None, generator, operator.dtype)
    y = operator.matmat(omega.to(device=operator.device, dtype=operator.dtype)).double()
    return _nystroem_factor(omega.to(y.device), y, operator.dtype)


def adaptive_nystroem_sketch(
    operator: LinearOperator, threshold: float, *, start: int, cap: int, generator: torch.Generator
) -> tuple[LowRankFactor, int]:
    """A Nystroem sketch grown until it reaches below ``threshold``: ``(factor, sweeps)``.

    Starts with ``start`` probes (the same as ``nystroem_sketch(operator, start, generator)``)
    and doubles them, each doubling ONE product of ``operator`` with the new probes only
    (drawn orthogonal to the earlier ones), until the sketch eigenvalue at the middle of its
    spectrum, ``eigenvalues[r // 2]``, is at most ``threshold`` (every eigenvalue of the sketch
    above ``threshold`` is then resolved with at least twice as many probes), or ``cap`` probes
    are reached.

    Args:
        operator: ``p x p`` symmetric positive semi-definite.
        threshold: the level below which eigenvalues no longer matter (a fraction of the
            regularization, for influences).
        start, cap: ``1 <= start <= cap <= p`` probes at the first and at most.
        generator: seeds the Gaussian probes.

    Returns:
        the :class:`LowRankFactor` of all the probes and the number of sweeps it took.
    """
    p = operator.size
    if not 1 <= start <= cap <= p:
        raise ValueError(f"Need 1 <= start <= cap <= p={p}; got start={start}, cap={cap}.")
    omega = torch.zeros(p, 0, dtype=torch.float64)
    y = torch.zeros(p, 0, dtype=torch.float64, device=operator.device)
    new, sweeps = start, 0
    while True:
        fresh = _probes(p, new, omega, generator, operator.dtype)
        y = torch.cat([y, operator.matmat(fresh.to(device=operator.device, dtype=operator.dtype)).double()], dim=1)
        omega = torch.cat([omega, fresh], dim=1)
        sweeps += 1
        factor = _nystroem_factor(omega.to(y.device), y, operator.dtype)
        r = omega.shape[1]
        values = factor.eigenvalues
        middle = float(values[r // 2]) if values.numel() > r // 2 else 0.0
        if r >= cap or middle <= threshold:
            return factor, sweeps
        new = min(r, cap - r)


def _probes(p: int, count: int, earlier: Tensor | None, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``count`` orthonormal Gaussian probes ``(p, count)``, orthogonal to ``earlier``: float64 on
    the CPU, rounded to ``dtype`` (the products are taken with exactly these vectors)."""
    omega = torch.randn(p, count, generator=generator, dtype=torch.float64)
    if earlier is not None and earlier.shape[1]:
        for _ in range(2):  # twice is enough
            omega = omega - earlier @ (earlier.T @ omega)
    return torch.linalg.qr(omega).Q.to(dtype).double()


def _nystroem_factor(omega: Tensor, y: Tensor, dtype: torch.dtype) -> LowRankFactor:
    """The Nystroem factor of probes ``omega`` ``(p, r)`` and their products ``y = H omega`` (float64)."""
    # |Y|_2 from the small Gram matrix (an SVD of the tall Y costs more than the rest here)
    shift = torch.finfo(dtype).eps * float(torch.linalg.eigvalsh(y.T @ y)[-1].clamp(min=0).sqrt())
    y_shift = y + shift * omega
    core = omega.T @ y_shift
    core = 0.5 * (core + core.T)
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:
        # core is not PD (H has a negative part): fall back to its eigen-decomposition
        evals, evecs = torch.linalg.eigh(core)
        keep = evals > shift
        b = y_shift @ (evecs[:, keep] / evals[keep].sqrt())
    else:
        b = torch.linalg.solve_triangular(chol, y_shift.T, upper=False).T
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    eigenvalues = torch.clamp(sigma**2 - shift, min=0.0)
    return LowRankFactor(u.to(dtype), eigenvalues.to(dtype))


@dataclass(frozen=True)
class LowRankInfo:
    """The report of a solve with retained eigenvectors ``V`` ``(p, r)`` (Arnoldi, Nystroem).

    Outside ``span(V)`` the curvature is taken to be zero (or dropped), so the part of a
    right-hand side ``g`` outside it is where the approximation can err: a right-hand side
    that ``V`` captures entirely is solved exactly (up to the eigenpairs' own accuracy).

    Attributes:
        captured_fractions: ``(k,)`` ``|V^T g| / |g|`` of each right-hand side (1 for ``g = 0``).
        rank: ``r``, the eigenpairs used.
        iterations: the curvature-vector products of the fit that found them (Arnoldi: Lanczos
            steps, one sweep each; Nystroem: probe vectors).
    """

    captured_fractions: Tensor
    rank: int
    iterations: int

    @property
    def relative_residuals(self) -> Tensor:
        """``(k,)`` ``|g - V V^T g| / |g|``: the fraction of each right-hand side's norm outside ``span(V)``."""
        return torch.sqrt(torch.clamp(1 - self.captured_fractions**2, min=0.0))

    @property
    def not_converged(self) -> int:
        """Always 0: a low-rank solve has no tolerance to miss."""
        return 0

    @staticmethod
    def concatenate(reports: list[LowRankInfo]) -> LowRankInfo:
        """One report for solves of consecutive blocks of right-hand sides."""
        return LowRankInfo(
            torch.cat([r.captured_fractions for r in reports]),
            max(r.rank for r in reports),
            max(r.iterations for r in reports),
        )

    @staticmethod
    def of(rhs: Tensor, basis: Tensor, iterations: int) -> LowRankInfo:
        """The report of solving the rows of ``rhs`` ``(k, p)`` with eigenvectors ``basis`` ``(p, r)``."""
        norms = torch.linalg.vector_norm(rhs, dim=1)
        inside = torch.linalg.vector_norm(rhs @ basis, dim=1) if basis.shape[1] else torch.zeros_like(norms)
        captured = torch.where(norms > 0, inside / torch.where(norms > 0, norms, 1), torch.ones_like(norms))
        return LowRankInfo(torch.clamp(captured, max=1.0), int(basis.shape[1]), int(iterations))
