"""Curvature as linear operators over flat parameter vectors.

An operator acts on a block of vectors ``V`` of shape ``(p, k)`` and returns ``(p, k)``.
:class:`CurvatureOperator` is the Hessian (or generalized Gauss-Newton matrix) of the MEAN
training loss, accumulated over the training batches with weights ``n_b / n``, so a ragged
last batch counts exactly as much as its samples. :class:`DampedOperator` adds
``regularization * I``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor

from . import batches, memory
from .batches import check_finite
from .data import TrainingData
from .gradients import ModelFunctions

ACTIVATION_BUDGET = 16 << 20
"""Bytes of one layer's activations (its largest module output per sample, times the samples
and vectors of one batched curvature product) above which
:meth:`CurvatureOperator.batch_matmat` splits the product: first into fewer vectors (down to
:data:`MIN_PIECE_VECTORS`), then into fewer samples (down to :data:`MIN_PIECE_SAMPLES`).
Measured with torch 2.13 on 2 cores, microseconds per sample and vector of a Hessian product
(samples x vectors): the digits CNN (4 KiB per sample) 44-48 at 64 x 64, 128 x 32 and
256 x 16 (16 MiB), 74-98 at twice that or more; an MLP of 1e5 parameters (1.1 KiB) 19-22 at
256-1,024 x 16 against 23-26 at 64 vectors and 26-58 below 256 samples; an MLP of 1e4
(280 B) fastest at the largest pieces (2.6 at 1,024 x 64). Beyond the caches the vectorized
double backward runs at memory speed; too small a piece pays the forward and backward that
every product starts with."""

MIN_PIECE_VECTORS = 16
"""The fewest vectors a split product keeps before it takes fewer samples."""

MIN_PIECE_SAMPLES = 64
"""The fewest samples a split product keeps."""


class Curvature(str, Enum):
    """Which second-order matrix stands for ``H``."""

    hessian = "hessian"
    """The exact Hessian of the mean training loss."""
    ggn = "ggn"
    """The generalized Gauss-Newton matrix ``J^T H_out J`` (PSD for convex losses)."""

    @classmethod
    def parse(cls, value: str | Curvature) -> Curvature:
        """The member named ``value``, else a ``ValueError`` listing the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"curvature must be one of {[c.value for c in cls]}; got {value!r}.") from None


class LinearOperator:
    """A symmetric ``p x p`` operator known through products with blocks of vectors."""

    size: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(p, k)``; returns ``(p, k)``."""
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(p,)``."""
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

    def dense(self, column_chunk: int = 64) -> Tensor:
        """Materialize the operator as a symmetric ``(p, p)`` matrix, ``column_chunk`` columns per product."""
        p = self.size
        out = torch.empty(p, p, dtype=self.dtype, device=self.device)
        for start in range(0, p, column_chunk):
            stop = min(start + column_chunk, p)
            eye = torch.zeros(p, stop - start, dtype=self.dtype, device=self.device)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = self.matmat(eye)
        return 0.5 * (out + out.T)


class CurvatureOperator(LinearOperator):
    """``H`` of the mean training loss (Hessian or GGN) as an operator.

    Args:
        functions: the model's pure functions.
        theta: the trained parameters ``(p,)``.
        data: the training batches.
        curvature: ``"hessian"`` or ``"ggn"``.
        max_columns: at most this many vectors are pushed through one vmapped product
            (bounds memory; a larger block is split).
        memory_room: bytes one product piece may hold (``None``: no limit beyond
            :data:`ACTIVATION_BUDGET`'s speed sizing): pieces are cut to fewer vectors, down to
            one, then fewer samples, down to one, so that
            :func:`~.memory.product_bytes` fits; a one-line ``ValueError`` when one sample and
            one vector do not fit. The solver sets it from its ``memory_budget``.

    Attributes:
        num_passes: how many sweeps over the training data the operator has made.
    """

    def __init__(
        self,
        functions: ModelFunctions,
        theta: Tensor,
        data: TrainingData,
        curvature: Curvature | str = Curvature.hessian,
        *,
        max_columns: int = 64,
        memory_room: int | None = None,
    ):
        self.functions = functions
        self.theta = theta
        self.data = data
        self.curvature = Curvature.parse(curvature)
        self.size = int(theta.numel())
        self.dtype = theta.dtype
        self.device = theta.device
        self.max_columns = int(max_columns)
        self.memory_room = memory_room
        self.num_passes = 0
        self._activation_bytes: dict[tuple, int] = {}  # per sample, by the batch's sample shapes

    def batch_matmat(self, batch: Any, v: Tensor) -> Tensor:
        """The curvature of ONE batch's mean loss times ``v`` ``(p, k)``: ``(p, k)``.

        Pushed through in pieces of at most ``max_columns`` vectors, fewer vectors and then
        fewer samples where one layer's activations for all of them would exceed
        :data:`ACTIVATION_BUDGET`, or the piece :attr:`memory_room` (the pieces' products
        weighted by their share of the batch: the same mean; the product is linear in ``v``)."""
        fn = self.functions.hessian_matmat if self.curvature is Curvature.hessian else self.functions.ggn_matmat
        n = batches.size(batch)
        rows, cols = self._piece(batch, n, min(v.shape[1], self.max_columns))

        def product(piece: Any) -> Tensor:
            return torch.cat([fn(self.theta, piece, v[:, s : s + cols]) for s in range(0, v.shape[1], cols)], dim=1)

        if rows >= n:
            return product(batch)
        out = torch.zeros_like(v)
        for r0 in range(0, n, rows):
            piece = batches.slice_rows(batch, r0, min(r0 + rows, n))
            out += (batches.size(piece) / n) * product(piece)
        return out

    def _piece(self, batch: Any, n: int, cols: int) -> tuple[int, int]:
        """Samples and vectors per product: all of them while ``n * cols`` per-sample
        activations fit in the budget, else fewer vectors (down to :data:`MIN_PIECE_VECTORS`),
        then fewer samples (down to :data:`MIN_PIECE_SAMPLES`)."""
        shape = tuple(tuple(leaf.shape[1:]) for leaf in batches.leaves(batch) if isinstance(leaf, Tensor))
        if shape not in self._activation_bytes:
            self._activation_bytes[shape] = self.functions.activation_bytes(self.theta, batch)
        per = self._activation_bytes[shape]
        rows, cols = self._speed_piece(per, n, cols)
        if self.memory_room is None:
            return rows, cols
        piece = memory.product_piece(per, rows, cols, self.memory_room)
        if piece is None:
            raise ValueError(
                f"One curvature product of one sample and one vector holds "
                f"{memory.readable(memory.product_bytes(per, 1, 1))} ({memory.PRODUCT_COPIES} x the largest "
                f"module output of a sample, {memory.readable(per)}), beyond the "
                f"{memory.readable(self.memory_room)} the solver's memory_budget leaves for it. Pass a larger "
                "memory_budget, or shorter sequences."
            )
        return piece

    @staticmethod
    def _speed_piece(per: int, n: int, cols: int) -> tuple[int, int]:
        """The pieces :data:`ACTIVATION_BUDGET` asks for speed (at least :data:`MIN_PIECE_VECTORS`
        vectors and :data:`MIN_PIECE_SAMPLES` samples)."""
        if per == 0 or n * cols * per <= ACTIVATION_BUDGET:
            return n, cols
        cols = max(min(cols, MIN_PIECE_VECTORS), ACTIVATION_BUDGET // (n * per))
        if n * cols * per <= ACTIVATION_BUDGET:
            return n, cols
        return min(n, max(MIN_PIECE_SAMPLES, ACTIVATION_BUDGET // (cols * per))), cols

    def matmat(self, v: Tensor) -> Tensor:
        """``H V``: the mean over the training batches of their curvature products."""
        n = self.data.num_samples
        out = torch.zeros_like(v)
        for batch in self.data.batches():
            out += (batches.size(batch) / n) * self.batch_matmat(batch, v)
        self.num_passes += 1
        return finite_curvature(out)


def finite_curvature(out: Tensor) -> Tensor:
    """``out`` (a curvature product), or a ``NonFiniteError`` saying what to check."""
    check_finite(
        "A curvature-vector product",
        out,
        hint="The model or loss produced NaN/Inf second derivatives at the trained "
        "parameters; check for overflow in the model or use curvature='ggn'.",
    )
    return out


class BlockDiagonalOperator(LinearOperator):
    """The block-diagonal part of an operator: each block (a layer's parameters) alone.

    ``matmat`` costs ONE product of the inner operator with ``n_blocks * k`` columns (each
    block of ``V`` padded with zeros elsewhere), i.e. one sweep over the training data.

    Args:
        inner: the full operator.
        blocks: ``(start, stop)`` ranges that partition ``0..p``.
    """

    def __init__(self, inner: LinearOperator, blocks: list[tuple[int, int]]):
        covered = sorted(blocks)
        if (
            not covered
            or covered[0][0] != 0
            or covered[-1][1] != inner.size
            or any(a[1] != b[0] for a, b in zip(covered, covered[1:]))
        ):
            raise ValueError(f"blocks must partition 0..{inner.size}; got {blocks}.")
        self.inner = inner
        self.blocks = list(blocks)
        self.size = inner.size
        self.dtype = inner.dtype
        self.device = inner.device

    def matmat(self, v: Tensor) -> Tensor:
        """``A V`` restricted to the blocks: one product of the inner operator with the padded columns."""
        k = v.shape[1]
        padded = torch.zeros(self.size, k * len(self.blocks), dtype=v.dtype, device=v.device)
        for b, (start, stop) in enumerate(self.blocks):
            padded[start:stop, b * k : (b + 1) * k] = v[start:stop]
        full = self.inner.matmat(padded)
        out = torch.empty_like(v)
        for b, (start, stop) in enumerate(self.blocks):
            out[start:stop] = full[start:stop, b * k : (b + 1) * k]
        return out

    def block_dense(self, b: int, column_chunk: int = 64) -> Tensor:
        """Block ``b`` as a dense symmetric ``(p_b, p_b)`` matrix; never forms ``(p, p)``."""
        start, stop = self.blocks[b]
        width = stop - start
        out = torch.empty(width, width, dtype=self.dtype, device=self.device)
        for c0 in range(0, width, column_chunk):
            c1 = min(c0 + column_chunk, width)
            eye = torch.zeros(self.size, c1 - c0, dtype=self.dtype, device=self.device)
            eye[torch.arange(start + c0, start + c1), torch.arange(c1 - c0)] = 1
            out[:, c0:c1] = self.inner.matmat(eye)[start:stop]
        return 0.5 * (out + out.T)


class DampedOperator(LinearOperator):
    """``A + regularization * I``."""

    def __init__(self, inner: LinearOperator, regularization: float):
        self.inner = inner
        self.regularization = float(regularization)
        self.size = inner.size
        self.dtype = inner.dtype
        self.device = inner.device

    def matmat(self, v: Tensor) -> Tensor:
        """``(A + regularization I) V``."""
        out = self.inner.matmat(v)
        if self.regularization:
            out = out + self.regularization * v
        return out


class DenseOperator(LinearOperator):
    """A dense symmetric matrix ``(p, p)`` as an operator (tests and small problems)."""

    def __init__(self, matrix: Tensor):
        self.matrix = matrix
        self.size = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matmat(self, v: Tensor) -> Tensor:
        """``M V``."""
        return self.matrix @ v
