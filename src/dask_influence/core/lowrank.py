"""Low-rank pieces built from curvature-vector products only.

``nystroem_sketch`` is the randomized Nystroem approximation ``H ~ U diag(eigenvalues) U^T``
(Frangella, Tropp & Udell 2023, Alg. 2.1, with the stabilizing shift): it costs ONE block
product of ``H`` with ``rank`` random vectors. ``LowRankInverse`` applies the Woodbury
inverse of ``U diag(eigenvalues) U^T + regularization * I``.
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
    omega = torch.randn(p, rank, generator=generator, dtype=torch.float64)
    omega = torch.linalg.qr(omega).Q.to(device=operator.device, dtype=operator.dtype)
    y = operator.matmat(omega).double()
    omega = omega.double()
    # |Y|_2 from the small Gram matrix (an SVD of the tall Y costs more than the rest here)
    shift = torch.finfo(operator.dtype).eps * float(torch.linalg.eigvalsh(y.T @ y)[-1].clamp(min=0).sqrt())
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
    return LowRankFactor(u.to(operator.dtype), eigenvalues.to(operator.dtype))
