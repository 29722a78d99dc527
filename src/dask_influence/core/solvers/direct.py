"""DirectInfluence: form ``H``, factorize it once, solve exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...errors import NotPositiveDefiniteError
from ..blocks import BlockSums
from ..operators import BlockDiagonalOperator, LinearOperator
from ..serialization import serializable
from .base import InfluenceModel
from .config import SolverConfig, check_blocks, hyperparameter
from .registry import register


@serializable
@dataclass(frozen=True)
class DirectState:
    """Eigendecompositions of the unregularized curvature, one per diagonal block.

    With ``blocks="full"`` there is one block ``(0, p)``: ``H = V diag(eigenvalues) V^T``.

    Attributes:
        blocks: ``(start, stop)`` of each block in the flat parameter vector.
        eigenvalues: per block ``(p_b,)``, ascending.
        eigenvectors: per block ``(p_b, p_b)``, orthonormal columns.
    """

    blocks: tuple[tuple[int, int], ...]
    eigenvalues: tuple[Tensor, ...]
    eigenvectors: tuple[Tensor, ...]

    @property
    def all_eigenvalues(self) -> Tensor:
        return torch.cat(self.eigenvalues)


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


@dataclass(frozen=True)
class DirectConfig(SolverConfig):
    """Hyperparameters of :class:`DirectInfluence`."""

    blocks: str = hyperparameter(
        "full", "'full' (the whole curvature) or 'layer' (one independent block per layer; "
        "memory O(sum p_layer^2), the full (p, p) matrix is never formed).")

    solve_time: ClassVar[frozenset[str]] = frozenset({"regularization"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_blocks(self.blocks)


@register("direct")
class DirectInfluence(InfluenceModel):
    """Exact influences from the dense curvature matrix.

    ``fit`` forms ``H`` (``p`` curvature-vector products per training batch) and its
    eigendecomposition in float64, once; changing ``regularization`` afterwards needs no
    refit. Memory ``O(p^2)``; for models with more than a few thousand parameters use
    ``blocks="layer"`` or an iterative or low-rank solver.

    Args:
        model, loss, regularization, curvature, chunk_size: as for every solver.
        blocks: ``"full"`` (default) or ``"layer"``: each layer's parameters form an
            independent block (cross-layer curvature dropped). Memory is then
            ``O(sum p_layer^2)``; the full ``(p, p)`` matrix is never formed.

    Raises:
        NotPositiveDefiniteError: from ``fit`` (and from later calls if ``regularization``
            was lowered) when ``H + regularization*I`` is not positive definite; the message
            gives the smallest eigenvalue and a regularization that fixes it.
    """

    config_class = DirectConfig
    state_: DirectState | None = None

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        if isinstance(operator, BlockDiagonalOperator):
            ranges = tuple(operator.blocks)
            matrices = [operator.block_dense(b) for b in range(len(ranges))]
        else:
            ranges = ((0, operator.size),)
            matrices = [operator.dense()]
        values, vectors = [], []
        for matrix in matrices:
            e, v = torch.linalg.eigh(matrix.double())
            values.append(e.to(self.dtype))
            vectors.append(v.to(self.dtype))
        state = DirectState(ranges, tuple(values), tuple(vectors))
        check_positive_definite(state.all_eigenvalues, self.regularization, type(self).__name__)
        self.state_ = state

    @property
    def hessian(self) -> Tensor:
        """The fitted, unregularized curvature matrix ``(p, p)`` (block-diagonal with ``blocks="layer"``)."""
        self._require_fitted()
        assert self.state_ is not None
        out = torch.zeros(self.num_params, self.num_params, dtype=self.dtype, device=self.device)
        for (start, stop), e, v in zip(self.state_.blocks, self.state_.eigenvalues, self.state_.eigenvectors):
            out[start:stop, start:stop] = (v * e) @ v.T
        return out

    def _solve(self, rhs: Tensor) -> Tensor:
        assert self.state_ is not None
        check_positive_definite(self.state_.all_eigenvalues, self.regularization, type(self).__name__)
        out = torch.empty_like(rhs)
        for (start, stop), e, v in zip(self.state_.blocks, self.state_.eigenvalues, self.state_.eigenvectors):
            out[:, start:stop] = ((rhs[:, start:stop] @ v) / (e + self.regularization)) @ v.T
        return out
