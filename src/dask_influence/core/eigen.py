"""Symmetric operators by their eigendecomposition, and the one positive-definiteness test.

:class:`EigenOperator` is ``V diag(d) V^T`` with ``V`` ``(p, r)`` orthonormal columns
(``r <= p``). Its regularized inverse serves every solver that factorizes the curvature:
Direct (one per diagonal block, ``r = p``), Arnoldi (the dominant Ritz pairs), the Nystroem
sketch (with the complement of ``span(V)`` weighted ``1/lambda``). The regularization is a
parameter of the solve, so it can change without a refit.

:func:`definiteness` is the one test of "``d + lambda`` safely above zero": an eigenvalue
is indistinguishable from rounding below ``p * eps * max|d|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NotPositiveDefiniteError


@dataclass(frozen=True)
class EigenOperator:
    """``V diag(eigenvalues) V^T``.

    Attributes:
        eigenvalues: ``(r,)``.
        eigenvectors: ``(p, r)``, orthonormal columns.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor

    def solve_rows(self, rhs: Tensor, regularization: float, *, complement: bool = False) -> Tensor:
        """``(V diag(d) V^T + lambda I)^-1`` applied to each row of ``rhs`` ``(k, p)``: ``(k, p)``.

        With ``complement=False`` the part of each row outside ``span(V)`` is dropped (exact
        when ``r = p``); with ``complement=True`` it is divided by ``lambda`` (the operator
        taken to be zero there; Woodbury), which needs ``lambda > 0``.
        """
        v = self.eigenvectors
        coeff = rhs @ v
        out = (coeff / (self.eigenvalues + regularization)) @ v.T
        if complement:
            if regularization <= 0:
                raise ValueError(
                    "The low-rank inverse needs regularization > 0 (the complement of the eigenvectors "
                    f"is treated as regularization*I); got {regularization:g}. Set a positive regularization."
                )
            out = out + (rhs - coeff @ v.T) / regularization
        return out

    def inverse_apply(self, v: Tensor, regularization: float, *, complement: bool = False) -> Tensor:
        """As :meth:`solve_rows` for the columns of ``v`` ``(p, k)``: ``(p, k)``."""
        return self.solve_rows(v.T, regularization, complement=complement).T

    def dense(self) -> Tensor:
        """The operator as a ``(p, p)`` matrix."""
        return (self.eigenvectors * self.eigenvalues) @ self.eigenvectors.T


def definiteness(eigenvalues: Tensor, regularization: float) -> tuple[float, float, float]:
    """``(smallest, threshold, scale)``: the smallest of ``eigenvalues + regularization``, the level
    ``max(r * eps * scale, tiny)`` it must exceed, and ``scale = max|eigenvalue|`` (float64 arithmetic,
    ``eps`` of the eigenvalues' dtype)."""
    values = eigenvalues.double()
    count = eigenvalues.numel()
    scale = float(values.abs().max()) if count else 0.0
    threshold = rounding_level(count, scale, eigenvalues.dtype)
    smallest = float((values + regularization).min()) if count else float("inf")
    return smallest, threshold, scale


def rounding_level(count: int, scale: float, dtype: torch.dtype) -> float:
    """``max(count * eps * scale, tiny)`` in ``dtype``: below it an eigenvalue of a ``count x count``
    matrix whose largest is ``scale`` cannot be told from rounding."""
    info = torch.finfo(dtype)
    return max(count * info.eps * scale, info.tiny)


def check_positive_definite(eigenvalues: Tensor, regularization: float, solver: str) -> None:
    """Raise :class:`NotPositiveDefiniteError` unless ``eigenvalues + regularization`` are safely > 0.

    "Safely" means above ``p * eps * max|eigenvalue|``, the level at which an eigenvalue is
    indistinguishable from rounding error.
    """
    smallest, threshold, scale = definiteness(eigenvalues, regularization)
    if smallest > threshold:
        return
    lam_min = float(eigenvalues.double().min())
    suggestion = max(2 * abs(lam_min), 1e-4 * scale, 1e-8)
    suggestion = float(f"{suggestion:.1g}") if suggestion < 1 else round(suggestion, 1)
    if suggestion <= -lam_min:
        suggestion *= 2
    raise NotPositiveDefiniteError(
        f"The curvature H + regularization*I is not positive definite: its smallest "
        f"eigenvalue is {smallest:.3e} (H's smallest is {lam_min:.3e}, its largest "
        f"{float(eigenvalues.double().max()):.3e}; regularization={regularization:g}). "
        f"Pass regularization={suggestion:g} or larger, e.g. {solver}(model, loss, "
        f"regularization={suggestion:g}), or use curvature='ggn', which is positive "
        "semi-definite for losses convex in the model outputs.",
        smallest_eigenvalue=smallest,
        suggested_regularization=suggestion,
    )


def factor_solve(factor: Tensor, b: Tensor) -> Tensor:
    """``(L L^T)^-1 b`` for a lower-triangular Cholesky factor ``L`` ``(p, p)`` and ``b`` ``(p, k)``:
    ``(p, k)``, by two triangular solves (torch 2.13's ``cholesky_solve`` measured 10x slower for
    one column and 1.3x for 100)."""
    y = torch.linalg.solve_triangular(factor, b, upper=False)
    return torch.linalg.solve_triangular(factor.T, y, upper=True)
