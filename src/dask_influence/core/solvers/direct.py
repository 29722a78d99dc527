"""DirectInfluence: form ``H``, factorize it once, solve exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import NotPositiveDefiniteError
from ..data import TrainingData
from ..operators import CurvatureOperator
from .base import InfluenceModel


@dataclass(frozen=True)
class DirectState:
    """The eigendecomposition ``H = V diag(eigenvalues) V^T`` of the unregularized curvature.

    Attributes:
        eigenvalues: ``(p,)``, ascending.
        eigenvectors: ``(p, p)``, orthonormal columns.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor


def check_positive_definite(eigenvalues: Tensor, regularization: float, solver: str) -> None:
    """Raise :class:`NotPositiveDefiniteError` unless ``eigenvalues + regularization`` are safely > 0.

    "Safely" means above ``p * eps * max|eigenvalue|``, the level at which an eigenvalue is
    indistinguishable from rounding error.
    """
    shifted = eigenvalues.double() + regularization
    p = eigenvalues.numel()
    scale = float(eigenvalues.double().abs().max()) if p else 0.0
    eps = torch.finfo(eigenvalues.dtype).eps
    threshold = max(p * eps * scale, torch.finfo(eigenvalues.dtype).tiny)
    smallest = float(shifted.min())
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


class DirectInfluence(InfluenceModel):
    """Exact influences from the dense curvature matrix.

    ``fit`` forms ``H`` (``p`` curvature-vector products per training batch) and its
    eigendecomposition in float64, once; changing ``regularization`` afterwards needs no
    refit. Memory ``O(p^2)``; for models with more than a few thousand parameters use an
    iterative or low-rank solver.

    Raises:
        NotPositiveDefiniteError: from ``fit`` (and from later calls if ``regularization``
            was lowered) when ``H + regularization*I`` is not positive definite; the message
            gives the smallest eigenvalue and a regularization that fixes it.
    """

    state_: DirectState | None = None

    def _fit(self, operator: CurvatureOperator, data: TrainingData) -> None:
        hessian = operator.dense().double()
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
        check_positive_definite(eigenvalues, self.regularization, type(self).__name__)
        self.state_ = DirectState(eigenvalues.to(self.dtype), eigenvectors.to(self.dtype))

    @property
    def hessian(self) -> Tensor:
        """The fitted, unregularized curvature matrix ``(p, p)``."""
        self._require_fitted()
        assert self.state_ is not None
        v, e = self.state_.eigenvectors, self.state_.eigenvalues
        return (v * e) @ v.T

    def _solve(self, rhs: Tensor) -> Tensor:
        assert self.state_ is not None
        e, v = self.state_.eigenvalues, self.state_.eigenvectors
        check_positive_definite(e, self.regularization, type(self).__name__)
        return ((rhs @ v) / (e + self.regularization)) @ v.T
