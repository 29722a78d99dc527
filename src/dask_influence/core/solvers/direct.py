"""DirectInfluence: form ``H``, factorize it once, solve exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor

from .. import memory
from ..blocks import BlockSums
from ..eigen import EigenOperator, check_positive_definite, factor_solve, rounding_level
from ..operators import BlockDiagonalOperator, LinearOperator
from ..serialization import serializable
from .base import InfluenceModel
from .config import SolverConfig, check_blocks, check_positive_int, hyperparameter
from .registry import register

# Steps of the power and inverse iterations that estimate ``H``'s largest eigenvalue and
# ``H + lambda I``'s smallest after a Cholesky factorization (each O(p^2) per block).
ESTIMATE_STEPS = 30
# The Cholesky path is trusted when the estimated smallest eigenvalue of ``H + lambda I`` is
# at least this many times the rounding level of :func:`~..eigen.definiteness`; otherwise the
# exact eigenvalues decide (and name the problem).
SAFETY_MARGIN = 10.0


@serializable
@dataclass(frozen=True)
class DirectState:
    """The unregularized curvature, one dense matrix per diagonal block.

    With ``blocks="full"`` there is one block ``(0, p)``. Files saved by earlier versions
    hold an eigendecomposition instead (``eigenvalues``, ``eigenvectors``; ``matrices`` is
    then ``None``): they load and solve as before.

    Attributes:
        blocks: ``(start, stop)`` of each block in the flat parameter vector.
        matrices: per block ``H_b`` ``(p_b, p_b)``, symmetric, in the model's dtype.
        eigenvalues: (older files) per block ``(p_b,)``, ascending.
        eigenvectors: (older files) per block ``(p_b, p_b)``, orthonormal columns.
    """

    blocks: tuple[tuple[int, int], ...]
    matrices: tuple[Tensor, ...] | None = None
    eigenvalues: tuple[Tensor, ...] | None = None
    eigenvectors: tuple[Tensor, ...] | None = None


@dataclass(frozen=True)
class DirectConfig(SolverConfig):
    """Hyperparameters of :class:`DirectInfluence`."""

    blocks: str = hyperparameter(
        "full",
        "'full' (the whole curvature) or 'layer' (one independent block per layer; "
        "memory O(sum p_layer^2), the full (p, p) matrix is never formed).",
    )

    memory_budget: int | None = hyperparameter(None, memory.BUDGET_HELP)
    resource_fields: ClassVar[frozenset[str]] = frozenset({"memory_budget"})

    solve_time: ClassVar[frozenset[str]] = frozenset({"regularization"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_blocks(self.blocks)
        if self.memory_budget is not None:
            check_positive_int("memory_budget", self.memory_budget)


@register("direct")
class DirectInfluence(InfluenceModel):
    """Exact influences from the dense curvature matrix.

    ``fit`` forms ``H`` (from per-sample output Jacobians for the GGN of small-output
    models, else ``p`` curvature-vector products per training batch, many per sweep) and a
    Cholesky factorization of ``H + regularization * I`` in float64. Changing
    ``regularization`` afterwards needs no refit (one new factorization, ``p^3 / 3`` flops).
    Memory ``O(p^2)``; for models with more than a few thousand parameters use
    ``blocks="layer"`` or an iterative or low-rank solver.

    The factorization is checked: an estimate of the smallest eigenvalue of
    ``H + regularization * I`` (inverse iteration on the factor) must stand clear of
    rounding; when it does not, or the factorization fails, the exact eigenvalues decide,
    as in :func:`~..eigen.check_positive_definite`.

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
    _factors: tuple[float, tuple[Tensor, ...]] | None = None  # (lambda, lower Cholesky factor per block)

    def _validate(self, config: SolverConfig) -> None:
        """At construction: refuse in one line a dense curvature that cannot fit ``memory_budget``."""
        assert isinstance(config, DirectConfig)
        budget = memory.budget_of(config.memory_budget, self.device)
        (_, matrix), (_, factor) = self._dense_pieces(config.blocks)
        if matrix + factor > budget:
            p, name = self.num_params, str(self.dtype).removeprefix("torch.")
            what = "the dense (p, p) curvature" if config.blocks == "full" else "its dense per-layer blocks"
            raise ValueError(
                f"DirectInfluence needs {what}: {memory.short(matrix)} in {name} for p = {p:,} "
                f"({memory.short(matrix + factor)} with its float64 Cholesky factor), beyond "
                f"memory_budget={memory.readable(budget)}. Use CgInfluence, ArnoldiInfluence or EkfacInfluence "
                "(or blocks='layer', or a larger memory_budget)."
            )

    def _dense_pieces(self, blocks: str) -> list[tuple[str, int]]:
        """The dense matrix ``(p, p)`` (per block with ``blocks="layer"``: ``sum p_b^2``) in the model's
        dtype, and the float64 Cholesky factor of the largest block with its workspace (the float64
        copy and the shifted matrix: 2 x ``p_b^2`` float64, 3 for a float32 model)."""
        size = memory.itemsize(self.dtype)
        if blocks == "layer":
            widths = [stop - start for _, start, stop in self._functions.spec.layer_slices()]
        else:
            widths = [self.num_params]
        copies = 2 if size == 8 else 3
        more = " + ..." if len(widths) > 4 else ""
        largest = max(widths)
        return [
            (
                f"the dense curvature ({' + '.join(f'{w:,}^2' for w in widths[:4])}{more})",
                sum(w * w for w in widths) * size,
            ),
            (
                f"the float64 Cholesky factor and workspace ({copies} x {largest:,} x {largest:,})",
                copies * 8 * largest * largest,
            ),
        ]

    def memory_pieces(self, batch_size: int) -> tuple[list[tuple[str, int]], int]:
        """Engine hook. The dense matrix and its factor (:meth:`_dense_pieces`), the parameters and a chunk's
        gradients; the products push 64 unit vectors at once."""
        chunk = min(self.chunk_size, batch_size)
        pieces = self._dense_pieces(cast(DirectConfig, self.config).blocks)
        return memory.common_pieces(self.num_params, memory.itemsize(self.dtype), chunk) + pieces, 64

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        if isinstance(operator, BlockDiagonalOperator):
            ranges = tuple(operator.blocks)
            matrices = [operator.block_dense(b) for b in range(len(ranges))]
        else:
            ranges = ((0, operator.size),)
            matrices = [operator.dense()]
        self.state_ = DirectState(ranges, tuple(m.to(self.dtype) for m in matrices))
        self._factors = None
        # checked after the state is kept: a refused regularization leaves the solver fitted
        self._cholesky_factors()

    @property
    def hessian(self) -> Tensor:
        """The fitted, unregularized curvature matrix ``(p, p)`` (block-diagonal with ``blocks="layer"``)."""
        self._require_fitted()
        state = self.state_
        assert state is not None
        out = torch.zeros(self.num_params, self.num_params, dtype=self.dtype, device=self.device)
        for b, (start, stop) in enumerate(state.blocks):
            if state.matrices is not None:
                out[start:stop, start:stop] = state.matrices[b]
            else:
                assert state.eigenvalues is not None and state.eigenvectors is not None
                out[start:stop, start:stop] = EigenOperator(state.eigenvalues[b], state.eigenvectors[b]).dense()
        return out

    def _solve(self, rhs: Tensor) -> Tensor:
        state = self.state_
        assert state is not None
        out = torch.empty_like(rhs)
        if state.matrices is None:  # an older file: the eigendecomposition
            assert state.eigenvalues is not None and state.eigenvectors is not None
            check_positive_definite(torch.cat(state.eigenvalues), self.regularization, type(self).__name__)
            for (start, stop), e, v in zip(state.blocks, state.eigenvalues, state.eigenvectors):
                out[:, start:stop] = EigenOperator(e, v).solve_rows(rhs[:, start:stop], self.regularization)
            return out
        for (start, stop), factor in zip(state.blocks, self._cholesky_factors()):
            part = rhs[:, start:stop].to(factor.dtype).T  # (p_b, k)
            out[:, start:stop] = factor_solve(factor, part).T.to(rhs.dtype)
        return out

    def _cholesky_factors(self) -> tuple[Tensor, ...]:
        """The lower Cholesky factors of ``H_b + lambda I`` ``(p_b, p_b)`` float64 for the current
        regularization (kept until it changes); raises when ``H + lambda I`` is not safely definite."""
        lam = float(self.regularization)
        cached = self._factors
        if cached is not None and cached[0] == lam:
            return cached[1]
        state = self.state_
        assert state is not None and state.matrices is not None
        factors = []
        for matrix in state.matrices:
            factor = _checked_cholesky(matrix, lam)
            if factor is None:  # not clearly definite: the exact eigenvalues decide (and name the problem)
                check_positive_definite(self._exact_eigenvalues(), lam, type(self).__name__)
                factor = _eigen_factor(matrix, lam)
            factors.append(factor)
        self._factors = (lam, tuple(factors))
        return self._factors[1]

    def _exact_eigenvalues(self) -> Tensor:
        """The eigenvalues of every block of ``H``, in the model's dtype: ``(p,)``."""
        state = self.state_
        assert state is not None and state.matrices is not None
        return torch.cat([torch.linalg.eigvalsh(m.double()).to(self.dtype) for m in state.matrices])


def _checked_cholesky(matrix: Tensor, regularization: float) -> Tensor | None:
    """The lower Cholesky factor of ``matrix + regularization * I`` ``(p, p)`` float64, or ``None``
    when it fails or when the estimated smallest eigenvalue is within ``SAFETY_MARGIN`` of the
    rounding level of :func:`~..eigen.definiteness` (``p * eps * max|eigenvalue|``, ``eps`` of the
    matrix's dtype)."""
    h = matrix.double()
    p = h.shape[0]
    a = h.clone()  # no (p, p) identity: the same numbers
    a.diagonal().add_(regularization)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(p, 1, generator=generator, dtype=h.dtype).to(h.device)
    x = start / start.norm()
    for _ in range(ESTIMATE_STEPS):  # power iteration: |H|'s largest eigenvalue (a lower bound)
        y = h @ x
        x = y / y.norm().clamp_min(torch.finfo(h.dtype).tiny)
    largest = float((x.T @ h @ x).abs())
    x = start / start.norm()
    for _ in range(ESTIMATE_STEPS):  # inverse iteration: the smallest of H + lambda I (an upper bound)
        y = factor_solve(factor, x)
        x = y / y.norm()
    smallest = float(x.T @ a @ x)
    threshold = rounding_level(p, largest, matrix.dtype)  # of the eigenvalues in the model's dtype
    return factor if smallest > SAFETY_MARGIN * threshold else None


def _eigen_factor(matrix: Tensor, regularization: float) -> Tensor:
    """A lower-triangular ``L`` with ``L L^T = matrix + regularization * I`` for a definite matrix
    that Cholesky refused by rounding: the QR of ``diag(sqrt(d + lambda)) V^T``."""
    e, v = torch.linalg.eigh(matrix.double())
    root = (v * (e + regularization).sqrt()).T  # root^T root = V diag(d + lambda) V^T
    r = torch.linalg.qr(root, mode="r").R  # root = Q R: root^T root = R^T R
    return r.T
