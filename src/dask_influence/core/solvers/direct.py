"""DirectInfluence: form ``H``, factorize it once, solve exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..blocks import BlockSums
from ..eigen import EigenOperator, check_positive_definite  # noqa: F401  (check_positive_definite re-exported)
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
        """The eigenvalues of every block, concatenated: ``(p,)``."""
        return torch.cat(self.eigenvalues)


@dataclass(frozen=True)
class DirectConfig(SolverConfig):
    """Hyperparameters of :class:`DirectInfluence`."""

    blocks: str = hyperparameter(
        "full",
        "'full' (the whole curvature) or 'layer' (one independent block per layer; "
        "memory O(sum p_layer^2), the full (p, p) matrix is never formed).",
    )

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
        self.state_ = DirectState(ranges, tuple(values), tuple(vectors))
        # checked after the state is kept: a refused regularization leaves the solver fitted
        check_positive_definite(self.state_.all_eigenvalues, self.regularization, type(self).__name__)

    @property
    def hessian(self) -> Tensor:
        """The fitted, unregularized curvature matrix ``(p, p)`` (block-diagonal with ``blocks="layer"``)."""
        self._require_fitted()
        assert self.state_ is not None
        out = torch.zeros(self.num_params, self.num_params, dtype=self.dtype, device=self.device)
        for (start, stop), e, v in zip(self.state_.blocks, self.state_.eigenvalues, self.state_.eigenvectors):
            out[start:stop, start:stop] = EigenOperator(e, v).dense()
        return out

    def _solve(self, rhs: Tensor) -> Tensor:
        assert self.state_ is not None
        check_positive_definite(self.state_.all_eigenvalues, self.regularization, type(self).__name__)
        out = torch.empty_like(rhs)
        for (start, stop), e, v in zip(self.state_.blocks, self.state_.eigenvalues, self.state_.eigenvectors):
            out[:, start:stop] = EigenOperator(e, v).solve_rows(rhs[:, start:stop], self.regularization)
        return out
