"""Sums over training blocks: the one way a fit touches the training data.

Every pass a solver's fit makes over the training data is a SUM over the training blocks
of a per-block function

    fn(solver, batch_b, start_b, weight_b, payload, out=None) -> Tensor | list[Tensor]

with ``batch_b`` the block's samples (a pytree of tensors, :mod:`.batches`),
``weight_b = n_b / n`` (the block's share of the mean loss) and ``payload`` the same
for every block of the pass (e.g. the vectors ``V`` of a curvature product). ``out``, when given, is the running sum
of the blocks before this one: the function returns that sum plus its block's result
(adding in place where it can, so an in-process pass holds one sum, not two). A solver's
``_fit(operator, blocks)`` sees the training data only through ``blocks.sum(fn, payload)``
(directly, as EK-FAC's factor sums do, or through the curvature operator below). Whoever
holds the blocks decides where the functions run and how the results are added:

- :class:`LocalBlocks` (here): the batches of a :class:`~.data.TrainingData`, one after the
  other in this process; ``solver.fit(data)`` uses it.
- the mapping layer's train blocks: one Dask task per block, summed by a fixed tree on
  the workers (``dask_influence.mapping.fitting``). A block function must therefore be a
  module-level function (it is sent by reference) that reads only its arguments.

:class:`SummedCurvatureOperator` is ``H`` of the mean training loss as such sums:
``matmat(V)`` is one pass of :func:`curvature_block`, and the dense matrix (or its
per-layer diagonal blocks) one pass of :func:`dense_block`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from . import batches
from .data import TrainingData
from .operators import BlockDiagonalOperator, LinearOperator, finite_curvature

if TYPE_CHECKING:
    from .solvers.engine import SolverEngine

BlockFunction = Callable[..., Any]
"""``fn(solver, batch, start, weight, payload, out=None) -> Tensor | list[Tensor]`` for one block."""


@dataclass(frozen=True)
class Each:
    """Work to finish on each element of a summed list, where the sum is: ``function(element, argument)``.

    EK-FAC eigendecomposes each of its factor sums so: on a cluster the eigendecompositions run on
    the workers, spread over them, and only their results (float32 eigenbases) reach the client,
    instead of every worker's float64 sums (2.6 GB each on GPT-2-small) and a client that
    decomposes 49 factors one after the other while the workers wait.

    Attributes:
        function: a module-level function (sent by reference) of one summed element (a tensor on
            the CPU, float64 for EK-FAC's sums, which it may change in place) and ``argument``;
            returns a tensor, ``None`` or a tuple of them.
        argument: the same for every element (picklable).
        costs: one number per element of the sum (its length): the relative cost of the work on
            each element, by which the elements are spread over the workers.
    """

    function: Callable[[Tensor, Any], Any]
    argument: Any
    costs: tuple[float, ...]


def finish_each(total: list, each: Each) -> list:
    """``each.function(element, each.argument)`` on each element of ``total`` in order, each element let go
    as its turn comes (``total`` is emptied), so that its memory can be released as the work goes."""
    if len(total) != len(each.costs):
        raise ValueError(f"The sum has {len(total)} elements; Each gave costs for {len(each.costs)}.")
    results = []
    for i in range(len(total)):
        element, total[i] = total[i], None
        results.append(each.function(element, each.argument))
        del element
    return results


def mean_in(total: Tensor, argument: tuple[int, torch.dtype]) -> Tensor:
    """``total / n`` in ``dtype`` (``argument = (n, dtype)``), divided in place: the mean of one summed element,
    finished where the sum is (:class:`Each`; EK-FAC's corrected eigenvalues: on a cluster each worker's
    float64 sums, 1 GB on GPT-2-small, no longer reach the client, only the float32 means)."""
    n, dtype = argument
    return total.div_(n).to(dtype)


class BlockSums(Protocol):
    """The training blocks of one fit, and sums over them.

    Attributes:
        n: the number of training samples.
        sweeps: passes made so far (each one call of ``fn`` per block).
    """

    n: int
    sweeps: int

    def sum(self, fn: BlockFunction, payload: Any = None, each: Each | None = None) -> Any:
        """``sum_b fn(solver, batch_b, start_b, n_b / n, payload)`` over every block, in block
        order (tensors added, lists of tensors added elementwise). With ``each`` (the sum a list):
        the list of ``each.function(element, each.argument)`` over the summed list's elements
        instead, run where the sums are (:class:`Each`)."""
        ...


def add_results(a: Any, b: Any) -> Any:
    """Sum of two per-block results (tensors or arrays, or lists of them added elementwise), added
    into ``a`` where it is a writable array or tensor of the sum's dtype and shape (else a new one).

    ``a`` is a block's or a subtree's own result, used by this one addition: adding in place keeps
    two results in memory instead of three (two blocks of EK-FAC's float64 factor sums on
    GPT-2-small are 2.6 GB each). The same numbers as ``a + b``."""
    if isinstance(a, list):
        return [add_results(u, v) for u, v in zip(a, b)]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.flags.writeable and a.shape == np.broadcast_shapes(a.shape, b.shape) and a.dtype == np.result_type(a, b):
            a += b
            return a
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape == torch.broadcast_shapes(a.shape, b.shape) and a.dtype == torch.result_type(a, b):
            if not a.requires_grad and not a.is_inference():
                return a.add_(b)
    return a + b


class LocalBlocks:
    """The batches of ``data`` as the blocks of a fit, summed in this process in order.

    Args:
        solver: passed to every block function.
        data: the training data, scanned (its ``num_samples`` known).
    """

    def __init__(self, solver: SolverEngine, data: TrainingData):
        self.solver = solver
        self.data = data
        self.n = int(data.num_samples)
        self.sweeps = 0
        self.on_block: Callable[[int], None] | None = None
        """Called with each block's number of samples as it is summed (progress)."""

    def sum(self, fn: BlockFunction, payload: Any = None, each: Each | None = None) -> Any:
        """The sum of ``fn`` over the batches, in order (see :class:`BlockSums`), or ``each`` on its elements."""
        self.sweeps += 1
        total: Any = None
        start = 0
        for batch in self.data.batches():
            size = batches.size(batch)
            total = fn(self.solver, batch, start, size / self.n, payload, out=total)
            start += size
            if self.on_block is not None:
                self.on_block(size)
        if total is None:
            raise ValueError("The training data has no batches; pass at least one sample.")
        return total if each is None else finish_each(list(total), each)


# -- the per-block functions of the curvature -------------------------------------------------
def curvature_block(
    solver: SolverEngine, batch: Any, start: int, weight: float, v: Tensor, out: Tensor | None = None
) -> Tensor:
    """``(n_b / n) * H_b V`` of one block for ``V`` ``(p, k)``: ``(p, k)`` (added into ``out`` if given)."""
    v = v.to(device=solver.device, dtype=solver.dtype)
    result = weight * solver.block_curvature().batch_matmat(batch, v)
    if out is None:
        return result
    out += result
    return out


def dense_block(
    solver: SolverEngine,
    batch: Any,
    start: int,
    weight: float,
    payload: tuple[Sequence[tuple[int, int]], int],
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """``(n_b / n) * H_b`` of one block restricted to each ``(a, b)`` range: ``[(p_r, p_r), ...]``.

    ``payload`` is ``(ranges, column_chunk)``: the ranges' columns are pushed through the
    block's curvature ``column_chunk`` at a time.
    """
    ranges, column_chunk = payload
    result = _ggn_from_jacobians(solver, batch, ranges, weight)
    if result is None:
        result = _dense_from_products(solver, batch, ranges, column_chunk, weight)
    if out is None:
        return result
    for total, matrix in zip(out, result):
        total += matrix
    return out


# the GGN is formed from per-sample Jacobians when the outputs have at most this many entries
JACOBIAN_MAX_OUTPUTS = 64


def _ggn_from_jacobians(
    solver: SolverEngine, batch: Any, ranges: Sequence[tuple[int, int]], weight: float
) -> list[Tensor] | None:
    """``(n_b / n) * GGN_b`` per range from per-sample output Jacobians (``None``: not applicable)."""
    from .operators import Curvature

    if solver.curvature is not Curvature.ggn or solver.objective.outputs is None:
        return None
    theta = solver.block_curvature().theta
    sums = solver._functions.ggn_dense_sum(theta, batch, ranges, max_outputs=JACOBIAN_MAX_OUTPUTS)
    if sums is None:
        return None
    scale = weight / batches.size(batch)  # the block's share of the mean loss, per sample
    return [scale * total for total in sums]


def _dense_from_products(
    solver: SolverEngine,
    batch: Any,
    ranges: Sequence[tuple[int, int]],
    column_chunk: int,
    weight: float,
) -> list[Tensor]:
    """``(n_b / n) * H_b`` per range from curvature products with ``column_chunk`` unit vectors at a time."""
    operator = solver.block_curvature()
    p = operator.size
    result = []
    for a, b in ranges:
        matrix = torch.empty(b - a, b - a, dtype=solver.dtype, device=solver.device)
        for c0 in range(0, b - a, column_chunk):
            c1 = min(c0 + column_chunk, b - a)
            eye = torch.zeros(p, c1 - c0, dtype=solver.dtype, device=solver.device)
            eye[torch.arange(a + c0, a + c1), torch.arange(c1 - c0)] = 1
            matrix[:, c0:c1] = (weight * operator.batch_matmat(batch, eye))[a:b]
        result.append(matrix)
    return result


class SummedCurvatureOperator(LinearOperator):
    """``H`` of the mean training loss with every product one pass of block sums.

    ``matmat(V)`` sums :func:`curvature_block` over the blocks; :meth:`dense_blocks` builds
    the diagonal blocks of given ranges (or the whole matrix) in ONE pass of
    :func:`dense_block`.

    Args:
        blocks: the training blocks (in this process or on a cluster).
        theta: the trained parameters ``(p,)``.

    Attributes:
        num_passes: sweeps over the training data made by this operator.
    """

    def __init__(self, blocks: BlockSums, theta: Tensor):
        self.blocks = blocks
        self.size = int(theta.numel())
        self.dtype = theta.dtype
        self.device = theta.device
        self.num_passes = 0

    def matmat(self, v: Tensor) -> Tensor:
        """``H V`` for ``V`` ``(p, k)``: one pass of :func:`curvature_block`."""
        out = self.blocks.sum(curvature_block, v.to(self.dtype))
        self.num_passes += 1
        return finite_curvature(torch.as_tensor(out).to(device=self.device, dtype=self.dtype))

    def dense(self, column_chunk: int = 64) -> Tensor:
        """The whole ``(p, p)`` matrix from one pass."""
        return self.dense_blocks([(0, self.size)], column_chunk)[0]

    def dense_blocks(self, ranges: Sequence[tuple[int, int]], column_chunk: int = 64) -> list[Tensor]:
        """The diagonal blocks ``H[a:b, a:b]`` of each range, symmetrized, from ONE pass."""
        parts = self.blocks.sum(dense_block, (tuple(ranges), int(column_chunk)))
        self.num_passes += 1
        out = []
        for part in parts:
            m = torch.as_tensor(part).to(device=self.device, dtype=self.dtype)
            out.append(finite_curvature(0.5 * (m + m.T)))
        return out


class SummedBlockDiagonalOperator(BlockDiagonalOperator):
    """The per-layer blocks of a :class:`SummedCurvatureOperator`; all dense blocks in one pass."""

    def __init__(self, inner: SummedCurvatureOperator, blocks: list[tuple[int, int]]):
        super().__init__(inner, blocks)
        self._dense: list[Tensor] | None = None

    def block_dense(self, b: int, column_chunk: int = 64) -> Tensor:
        """Block ``b`` ``(p_b, p_b)``; the first call forms every block in one pass."""
        if self._dense is None:
            assert isinstance(self.inner, SummedCurvatureOperator)
            self._dense = self.inner.dense_blocks(self.blocks, column_chunk)
        return self._dense[b]


def summed_operator(blocks: BlockSums, theta: Tensor, layer_slices: Sequence[tuple[int, int]] | None) -> LinearOperator:
    """``H`` over ``blocks``: block-diagonal by the given layer slices, or whole (``None``)."""
    operator = SummedCurvatureOperator(blocks, theta)
    if layer_slices is not None:
        return SummedBlockDiagonalOperator(operator, list(layer_slices))
    return operator
