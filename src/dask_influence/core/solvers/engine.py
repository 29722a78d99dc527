"""The engine side of every solver: what the mapping layer and subclasses call.

:class:`~.base.InfluenceModel` (the class users see) derives from :class:`SolverEngine`,
which holds the hooks of the engine and their defaults:

- capabilities the mapping layer reads (``needs_training_data``, ``solves_with_sweeps``,
  ``reports_solves``) and the fitted attributes a save writes;
- shipping to Dask workers: pickling under the forward lock, :meth:`~SolverEngine.shippable`;
- the one fitting path: :meth:`~SolverEngine.fit_blocks` -> ``_fit`` (a subclass's) ->
  :meth:`~SolverEngine.finish_fit`, with the curvature as sums over training blocks;
- solves with their reports, and the scoring hooks a solver may replace (EK-FAC does):
  ``_test_gradients`` (the test side's per-sample gradients, per chunk), ``_up_influences``
  (a batch of training points scored against factors), ``_self_influences``;
- batches prepared and checked as every method reads them (:mod:`.inputs`).

A public method here is an engine hook: its docstring starts with "Engine hook", and the
API reference (docs/api.md) does not list it (docs/architecture.md, "How to add a solver").
"""

from __future__ import annotations

import copy
import copyreg
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self, SupportsIndex

import torch
from torch import Tensor, nn

from ... import progress as _progress
from ...errors import NotFittedError
from .. import batches, factor_columns, memory, pickling
from ..blocks import BlockSums, summed_operator
from ..data import TrainingData
from ..gradients import _FORWARD_LOCK, ModelFunctions, check_finite, flat_params
from ..operators import BlockDiagonalOperator, Curvature, CurvatureOperator, LinearOperator
from . import fit_progress, inputs
from .config import SolverConfig

if TYPE_CHECKING:
    from ..factor_columns import FactorColumns
    from ..task import Task


class SolverEngine(ABC):
    """The engine hooks of a solver and their defaults (see the module's docstring); a solver
    derives from :class:`~.base.InfluenceModel`, never from this class directly."""

    config: SolverConfig
    model: nn.Module
    objective: Task
    _functions: ModelFunctions
    _theta: Tensor | None
    fit_id_: str | None
    n_train_: int | None
    feature_shape_: torch.Size | None
    info_: Any

    if TYPE_CHECKING:  # the user-facing properties, defined by InfluenceModel

        @property
        def curvature(self) -> Curvature: ...  # noqa: D102
        @property
        def blocks(self) -> str: ...  # noqa: D102
        @property
        def num_params(self) -> int: ...  # noqa: D102
        @property
        def dtype(self) -> torch.dtype: ...  # noqa: D102
        @property
        def device(self) -> torch.device: ...  # noqa: D102
        @property
        def is_fitted(self) -> bool: ...  # noqa: D102

    # -- capabilities (read by the mapping layer) ------------------------------------
    needs_training_data: ClassVar[bool] = False
    """True for solvers that apply ``H`` from the training data at solve time (CG, LiSSA):
    :meth:`load` then needs ``train=``."""

    solves_with_sweeps: ClassVar[bool] = False
    """True when every iteration of a solve is one product with ``H`` over ALL the training
    data (CG): the mapping layer may then run the solves on the client, each product one
    distributed sweep (:meth:`attach_curvature`)."""

    reports_solves: ClassVar[bool] = False
    """True for solvers whose solves return a report with an error estimate per right-hand side
    (CG, LiSSA: residuals; Arnoldi, Nystroem: the captured fraction of each right-hand side)."""

    _saved_attributes: ClassVar[tuple[str, ...]] = ("state_",)
    """Fitted attributes written by :meth:`save`."""

    def _validate(self, config: SolverConfig) -> None:
        """Checks of ``config`` that need the model (e.g. ``rank <= p``); raise ``ValueError``."""
        return None

    # -- shipping to workers: pickling -----------------------------------------------
    def __reduce__(self) -> tuple:
        """Pickle a consistent snapshot of the solver, serialized under the forward lock.

        A Dask worker sends its copy of the solver to other workers from its event-loop thread
        while its task thread may be inside a forward, where ``functional_call`` has swapped
        the model's parameters for functorch wrappers: pickled then, the model fails to
        serialize (the transfer, and with it the job, stalls) or would carry the wrong
        tensors. Serializing the whole state while holding the process-wide forward lock of
        :mod:`..gradients` always sees the model's own parameters.
        """
        return self._snapshot(buffered=False)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple:
        """With pickle protocol 5 (Dask's), the snapshot of :meth:`__reduce__` with its large tensors
        as out-of-band buffers (:mod:`..pickling`: no copies on either side; a broadcast EK-FAC fit
        of 0.62 GB peaked 3.4 GB above an idle worker by torch's reduction); lower protocols
        (``copy.deepcopy``) pickle as :meth:`__reduce__` does."""
        return self._snapshot(buffered=int(protocol) >= 5)

    def _snapshot(self, *, buffered: bool) -> tuple:
        """The reduction of :meth:`__reduce__` (``buffered=False``) or :meth:`__reduce_ex__`."""
        active = _PICKLING.__dict__.setdefault("ids", set())
        if id(self) in active:
            # a reference back to this solver from inside its own state (an operator holding
            # one of its methods): pickled by the snapshot's pickler as a plain object, whose
            # memo already holds the state (typeshed's copyreg lacks __newobj__: hence the ignore)
            return (copyreg.__newobj__, (type(self),), self.__dict__)  # type: ignore[attr-defined]
        active.add(id(self))
        try:
            with _FORWARD_LOCK:
                return (_restore_solver, (type(self), *pickling.dump_state(self.__dict__, buffered=buffered)))
        finally:
            active.discard(id(self))

    def __copy__(self) -> Self:
        """A shallow copy (sharing the model and the fitted tensors), as ``copy.copy`` gives
        for plain objects; :meth:`__reduce__` would otherwise make it a deep one."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def shippable(self) -> Self:
        """Engine hook. A shallow copy without the training data and curvature operators it solves with:
        small to send to Dask workers (which compute gradients, never solves with ``H``)."""
        clone = copy.copy(self)
        clone._detach()
        return clone

    def _detach(self) -> None:
        """Drop references to the training data (solvers with ``needs_training_data``)."""
        return None

    # -- the fitting path ------------------------------------------------------------
    def training_data(self, data: Any, batch_size: int | None = None) -> TrainingData:
        """Engine hook. ``data`` as a :class:`~..data.TrainingData` of this solver's batches (not yet scanned)."""
        return TrainingData(
            data,
            dtype=self.dtype,
            device=self.device,
            batch_size=batch_size or self.config.chunk_size,
            perturb=self.objective.perturb,
            pairs=self.objective.pairs,
        )

    def fit_blocks(
        self,
        blocks: BlockSums,
        data: TrainingData | None,
        *,
        feature_shape: Sequence[int],
        float_inputs: bool | None,
        progress: bool | None = None,
    ) -> None:
        """Engine hook. Fit from sums over training blocks: the one fitting path.

        Every pass over the training data is ``blocks.sum(fn, payload)`` (see
        :mod:`..blocks`): :meth:`fit` passes the batches of its data in this process; the
        mapping layer passes the train blocks of a Dask cluster. The inputs are checked by
        the caller (:meth:`check_model_mode`, :meth:`check_loss` on the first block).

        Args:
            blocks: the training blocks.
            data: the same training data in this process, read lazily; solvers that apply
                ``H`` at solve time (``needs_training_data``: CG, LiSSA) keep it. ``None``
                for the others.
            feature_shape: the shape of one sample of the input leaf ``task.perturb`` (the
                ``x`` of pairs; ``()`` without one).
            float_inputs: whether that leaf is floating point (integer inputs are then
                refused with a clear error); ``None`` when there is no such leaf.
            progress: report each pass (see :meth:`fit`).
        """
        with _progress.reporting(progress) as reporter:
            fit_progress.fit_reported(self, blocks, data, feature_shape, float_inputs, reporter)

    def _progress_title(self) -> str:
        """The solver's name in progress lines (``CG``, ``EK-FAC``, ...)."""
        return fit_progress.title(type(self).__name__)

    def _fit_passes(self) -> int | None:
        """The number of passes over the training data a fit makes, where known (progress lines)."""
        return None

    def _pass_name(self, fn: Any, payload: Any) -> str:
        """What a fitting pass of block function ``fn`` computes, for progress lines."""
        return fit_progress.pass_name(fn)

    def finish_fit(
        self,
        theta: Tensor,
        data: TrainingData | None,
        *,
        n: int,
        feature_shape: Sequence[int],
        float_inputs: bool | None,
    ) -> None:
        """Engine hook. Mark the solver fitted at ``theta`` (after :meth:`fit_blocks` or a restored state);
        solvers with ``needs_training_data`` keep an operator over ``data`` for their solves."""
        if self.needs_training_data:
            if data is None:
                raise ValueError(f"{type(self).__name__} solves with the training data; pass it.")
            self._attach(self._operator_for(theta, data), data)
        self._theta = theta
        self.n_train_ = int(n)
        self.feature_shape_ = torch.Size(feature_shape)
        self.fit_id_ = uuid.uuid4().hex  # names this fit: a later fit (or restore) changes it
        if float_inputs is not None:
            self._float_inputs = bool(float_inputs)

    def curvature_over(self, blocks: BlockSums, theta: Tensor) -> LinearOperator:
        """Engine hook. ``H`` of the mean training loss as sums over ``blocks`` (block-diagonal by layer
        with ``blocks="layer"``): what :meth:`_fit` receives."""
        slices = None
        if self.blocks == "layer":
            slices = [(start, stop) for _, start, stop in self._functions.spec.layer_slices()]
        return summed_operator(blocks, theta, slices)

    def block_curvature(self) -> CurvatureOperator:
        """Engine hook. The curvature of the loss at the trained parameters, without data: its
        ``batch_matmat(batch, V)`` is one block's curvature times ``V``."""
        return CurvatureOperator(
            self._functions,
            self.trained_parameters(),
            None,  # type: ignore[arg-type]
            self.curvature,
            memory_room=self._product_room,
        )

    def trained_parameters(self) -> Tensor:
        """Engine hook. The model's trainable parameters as one flat vector ``(p,)`` (checked finite)."""
        theta = flat_params(self.model, self._functions.spec)
        check_finite("The model's trainable parameters", theta, hint="Load a model with finite weights.")
        return theta

    def attach_curvature(self, operator: LinearOperator) -> Self:
        """Engine hook. A shallow copy of this fitted solver that solves with ``operator`` as ``H`` (e.g. sums
        over train blocks on a cluster). Only for solvers with ``needs_training_data``."""
        if not self.needs_training_data:
            raise TypeError(f"{type(self).__name__} does not solve with the curvature operator.")
        clone = copy.copy(self)
        clone._attach(operator, None)
        return clone

    def fitted_state(self) -> dict[str, Any]:
        """Engine hook. The fitted state: ``{attribute: value}`` of :attr:`_saved_attributes` (tensors, state
        dataclasses, preconditioners), what :meth:`save` writes."""
        self._require_fitted()
        return {name: getattr(self, name) for name in self._saved_attributes}

    def _operator_for(self, theta: Tensor, source: TrainingData) -> Any:
        operator: Any = CurvatureOperator(
            self._functions, theta, source, self.curvature, memory_room=self._product_room
        )
        if self.blocks == "layer":
            slices = [(start, stop) for _, start, stop in self._functions.spec.layer_slices()]
            operator = BlockDiagonalOperator(operator, slices)
        return operator

    def _attach(self, operator: Any, data: TrainingData | None) -> None:
        """Re-attach the training data after :meth:`load` (solvers with ``needs_training_data``)."""
        raise NotImplementedError

    @abstractmethod
    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        """Prepare ``_solve`` from the (undamped) curvature of the training data.

        ``operator`` is ``H`` (block-diagonal by layer when ``blocks == "layer"``), each
        product a pass of sums over ``blocks``; a solver that needs other per-block
        quantities sums its own module-level block functions with ``blocks.sum(fn, payload)``.
        """

    # -- solves ----------------------------------------------------------------------
    def influence_factors_with_report(self, *test: Any) -> tuple[Tensor, Any]:
        """Engine hook. :meth:`influence_factors` and the report of its solve (see :meth:`solve`)."""
        theta = self._require_fitted()
        return self._factors_with_report(theta, self._batch(test, ("x_test", "y_test")))

    def _factors_with_report(self, theta: Tensor, batch: Any) -> tuple[Tensor, Any]:
        """The factors ``(n_test, p)`` of a prepared test batch and the report of their solves:
        each chunk of :meth:`_test_gradients` solved on its own (into its rows of one output, see
        :meth:`_solve_into`: never the chunks' solutions and their concatenation at once), the
        reports merged."""
        n, out, done, reports = batches.size(batch), None, 0, []
        for grads in self._test_gradients(theta, batch):
            m = grads.shape[0]
            if out is None and m == n:  # one chunk: its solution is the output
                if self.solves_in_place:  # the gradients are this call's own: solved where they are
                    return grads, self._solve_into(grads, grads)
                solution, report = self._solve_with_report(grads)
                return solution, report
            if out is None:
                out = grads.new_empty(n, grads.shape[1])
            if done + m > n:
                raise RuntimeError(f"The test gradients have more rows than the batch's {n} points.")
            reports.append(self._solve_into(grads, out[done : done + m]))
            done += m
        if out is None or done != n:
            raise RuntimeError(f"The test gradients have {done} rows for a batch of {n} points.")
        return out, _merge_reports(reports)

    solves_in_place = False
    """Whether :meth:`_solve_into` may be given ``out`` that is ``rhs`` itself (EK-FAC: each layer's block is
    read whole before its solution is written back), so that one chunk's factors overwrite its gradients
    instead of a second ``(n, p)`` beside them (1 GB for two GPT-2-small sequences)."""

    def _solve_into(self, rhs: Tensor, out: Tensor) -> Any:
        """Engine hook. Write the solve of ``rhs`` ``(m, p)`` into ``out`` ``(m, p)`` (rows of the factors);
        returns its report. Default: :meth:`_solve_with_report` and a copy; EK-FAC writes its layers'
        solutions in place (also into ``rhs`` itself, :attr:`solves_in_place`)."""
        solution, report = self._solve_with_report(rhs)
        out.copy_(solution)
        return report

    def _test_gradients(self, theta: Tensor, batch: Any) -> Iterator[Tensor]:
        """Engine hook. The per-sample gradients of the measurement of a prepared test batch, in
        chunks ``(m, p)`` that are solved one at a time (in order; together the ``n_test`` rows).

        Default: one chunk of all the rows (a block solver such as CG solves them together).
        EK-FAC assembles them per chunk from its layers' inputs and output gradients.
        """
        yield self._grads(theta, batch, measurement=True)

    def _solve_with_report(self, rhs: Tensor) -> tuple[Tensor, Any]:
        """``(_solve(rhs), report)``; iterative solvers override it and return their report."""
        return self._solve(rhs), None

    def _solved(self, rhs: Tensor) -> Tensor:
        """The solve of the public one-call methods; the report of the last one stays in ``info_``
        for interactive use (code that may share the solver between threads uses :meth:`solve`)."""
        result, report = self._solve_with_report(rhs)
        if report is not None:
            self.info_ = report
        return result

    @abstractmethod
    def _solve(self, rhs: Tensor) -> Tensor:
        """``(H + lambda I)^-1`` applied to each row of ``rhs`` ``(k, p)``; returns ``(k, p)``."""

    # -- scoring ---------------------------------------------------------------------
    def self_influences_with_report(self, *points: Any) -> tuple[Tensor, Any]:
        """Engine hook. :meth:`self_influences` and the report of its solves, one row per point (see :meth:`solve`):
        the error estimates of the training points' own solves."""
        theta = self._require_fitted()
        return self._self_influences(theta, self._batch(points, ("x", "y")))

    def _self_influences(self, theta: Tensor, batch: Any) -> tuple[Tensor, Any]:
        """Engine hook. The self-influences ``(n,)`` of a prepared batch and the report of their
        solves (``None`` without one). Default: per ``chunk_size`` chunk, the per-sample
        gradients ``g`` solved and ``(H + lambda I)^-1 g . g`` summed per row."""
        out, reports = [], []
        n = batches.size(batch)
        meter = _progress.current().meter(f"{self._progress_title()} self-influences", n, "points")
        for start in range(0, n, self.config.chunk_size):
            chunk = batches.slice_rows(batch, start, start + self.config.chunk_size)
            g = self._grads(theta, chunk, offset=start)
            solution, report = self._solve_with_report(g)
            out.append((solution * g).sum(dim=1))
            reports.append(report)
            meter.advance(batches.size(chunk))
        meter.finish()
        return torch.cat(out), _merge_reports(reports)

    def _up_influences(self, theta: Tensor, factors: Tensor, batch: Any) -> Tensor:
        """Engine hook. The up-weighting influences ``factors @ grads(batch).T`` ``(n_test, n)``
        of a prepared batch of training points against checked factors ``(n_test, p)``.

        Default: chunk by chunk into one preallocated result, the ``(n, p)`` gradients never
        held at once, nor copied. EK-FAC contracts the factors with its layers' inputs and
        output gradients instead (on models with many parameters)."""
        n = batches.size(batch)
        out = torch.empty(factors.shape[0], n, dtype=self.dtype, device=self.device)
        for start in range(0, n, self.config.chunk_size):
            stop = min(start + self.config.chunk_size, n)
            parts = self._functions.per_sample_grad_blocks(theta, batches.slice_rows(batch, start, stop))
            # one product per parameter tensor, summed: no (n, p) copy of the gradients
            # (joining them took 46 of 150 ms of scoring 2,000 points of a 1e4-parameter MLP)
            width = parts[0].shape[1]
            block = factors[:, :width] @ parts[0].T
            for part in parts[1:]:
                block.addmm_(factors[:, width : width + part.shape[1]], part.T)
                width += part.shape[1]
            out[:, start:stop] = block
            # a NaN/Inf in a gradient makes its whole column non-finite (the factors are finite)
            inputs.check_grads_fast(block, parts, self._functions.spec, start)
        return out

    def _up_influences_by_columns(self, theta: Tensor, factors: FactorColumns, batch: Any) -> Tensor:
        """Engine hook. The up-weighting influences ``(n_test, n)`` of a prepared batch against factors read
        by columns (:meth:`~.base.InfluenceModel.influences_from_factor_columns`).

        Default: the per-tensor gradient blocks of consecutive chunks held within
        :meth:`held_gradient_bytes`, then each tensor's columns read in slabs and multiplied into the chunks'
        columns of the result. EK-FAC contracts its layers' inputs and output gradients instead."""
        n = batches.size(batch)
        rows = factors.shape[0]
        out = torch.zeros(rows, n, dtype=self.dtype, device=self.device)
        step = self.config.chunk_size
        chunks = (
            (start, self._functions.per_sample_grad_blocks(theta, batches.slice_rows(batch, start, start + step)))
            for start in range(0, n, step)
        )
        for group in factor_columns.held_groups(chunks, factor_columns.tensor_bytes, self.held_gradient_bytes()):
            column = 0
            for k, width in enumerate(part.shape[1] for part in group[0][1]):
                for a, b in factor_columns.slabs(column, column + width, rows, self.dtype.itemsize):
                    slab = factors.columns(a, b).to(device=self.device, dtype=self.dtype)
                    for start, parts in group:
                        block = parts[k][:, a - column : b - column]
                        out[:, start : start + block.shape[0]].addmm_(slab, block.T)
                column += width
            for start, parts in group:
                inputs.check_grads_fast(out[:, start : start + parts[0].shape[0]], parts, self._functions.spec, start)
        return out

    def held_gradient_bytes(self) -> int:
        """Engine hook. Bytes of training gradients a scoring by columns holds for one read of the factors: a
        quarter of the solver's memory budget (its ``memory_budget``, else the device's default)."""
        return memory.budget_of(getattr(self.config, "memory_budget", None), self.device) // 4

    def _perturbation_influences(self, theta: Tensor, factors: Tensor, batch: Any) -> Tensor:
        """The perturbation influences ``(n_test, n, *x.shape[1:])`` of a prepared batch against
        checked factors ``(n_test, p)``: mixed derivatives in the perturbed input, per ``chunk_size``."""
        path = self._perturbed_input(batch)
        parts = []
        n = batches.size(batch)
        for start in range(0, n, self.config.chunk_size):
            chunk = batches.slice_rows(batch, start, start + self.config.chunk_size)
            parts.append(self._functions.contracted_mixed_grads(theta, factors, chunk, path))
        return torch.cat(parts, dim=1)

    def _perturbed_input(self, batch: Any) -> str | int:
        """The path of the floating-point input leaf that perturbations differentiate in."""
        path = self.objective.perturb
        if path is None:
            raise ValueError(
                f"Perturbation influences differentiate in an input, but the task {self.objective.name!r} names "
                "none; pass Task(..., perturb='pixel_values') (the floating-point input to perturb), "
                "or use mode='up'."
            )
        try:
            leaf = batches.get_leaf(batch, path)
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(
                f"The task perturbs the input {path!r}, which the batch ({batches.structure(batch)}) does not have."
            ) from None
        if not leaf.is_floating_point():
            what = "x" if self.objective.pairs else f"the input {path!r}"
            raise TypeError(
                f"Perturbation influences differentiate in the inputs, which must be floating "
                f"point; got {what} of dtype {leaf.dtype}. Use mode='up' for integer inputs such as token ids"
                + (
                    "."
                    if self.objective.pairs
                    else ", or perturb a floating-point input such as the embeddings (a task whose batch "
                    "carries inputs_embeds and perturb='inputs_embeds')."
                )
            )
        return path

    def _grads(self, theta: Tensor, batch: Any, offset: int = 0, *, measurement: bool = False) -> Tensor:
        """Per-sample gradients ``(n, p)`` of the loss (or measurement), ``chunk_size`` samples
        per vmapped call, written into one preallocated tensor (no concatenation copy)."""
        n = batches.size(batch)
        out = torch.empty(n, self.num_params, dtype=self.dtype, device=self.device)
        for start in range(0, n, self.config.chunk_size):
            stop = min(start + self.config.chunk_size, n)
            g = self._functions.per_sample_grads(
                theta, batches.slice_rows(batch, start, stop), out=out[start:stop], measurement=measurement
            )
            inputs.check_grads_fast(g, g, self._functions.spec, offset + start)
        return out

    # -- batches and checks ----------------------------------------------------------
    def _require_fitted(self) -> Tensor:
        if self._theta is None:
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call .fit(train_loader) first.")
        return self._theta

    def prepare_batch(self, batch: Any, *, training: bool = False) -> Any:
        """Engine hook. One batch (a pair ``(x, y)`` with a loss, any structure with a task) as validated
        tensors on the model's device, as every method reads it."""
        names = ("training inputs", "training targets") if training else ("x", "y")
        return self._batch((batch,), names)

    def _batch(self, points: tuple, names: tuple[str, str]) -> Any:
        """The points of a public call as one validated batch on the model's device
        (:func:`.inputs.validated_batch`)."""
        return inputs.validated_batch(self, points, names)

    def _check_factors(self, factors: Any) -> Tensor:
        return inputs.checked_factors(self, factors)

    def check_model_mode(self) -> None:
        """Engine hook. Refuse a model in training mode with dropout or batch norm (per-sample
        gradients would be ill-defined)."""
        inputs.check_model_mode(self.model)

    def check_loss(self, batch: Any) -> None:
        """Engine hook. Check the loss on the first training batch: it evaluates, is a finite scalar and averages
        over the batch (:func:`.inputs.check_loss`); then the memory for batches of its shapes
        (:meth:`memory_estimate`: a one-line refusal before any pass where it cannot fit)."""
        inputs.check_loss(self, batch)
        estimate = self.memory_estimate(batch)
        if estimate is not None:
            budget = memory.budget_of(getattr(self.config, "memory_budget", None), self.device)
            estimate.check(budget, "Pass a larger memory_budget, smaller batches or chunk_size, or another solver.")
            self.estimated_memory_ = estimate
            self._product_room = budget - (estimate.total - estimate.bytes_of(memory.PRODUCT_PIECE))

    # -- memory ----------------------------------------------------------------------
    _product_room: int | None = None
    estimated_memory_: memory.MemoryEstimate | None = None
    """The peak memory estimated by :meth:`check_loss` before the fit's first pass (``None`` before)."""
    """Bytes one piece of a curvature product may hold (set by :meth:`check_loss`); ``None``: unsized."""

    def memory_pieces(self, batch_size: int) -> tuple[list[tuple[str, int]], int] | None:
        """Engine hook. The pieces ``(name, bytes)`` this solver holds at its peak beside a curvature
        product, for training batches of ``batch_size`` samples, and how many vectors its largest
        product pushes at once; ``None`` (default): no estimate (EK-FAC plans its own memory)."""
        return None

    def memory_estimate(self, batch: Any) -> memory.MemoryEstimate | None:
        """Engine hook. The peak memory of this solver for batches shaped as ``batch`` (from the
        model's shapes and one sample's forward, before any pass): :meth:`memory_pieces` plus one
        piece of its largest curvature product, as many samples and vectors as fit the rest of
        ``memory_budget`` (:func:`~..memory.product_piece`; one of each when none fit)."""
        n = batches.size(batch)
        planned = self.memory_pieces(n)
        if planned is None:
            return None
        pieces, vectors = planned
        budget = memory.budget_of(getattr(self.config, "memory_budget", None), self.device)
        theta = self.trained_parameters()
        per = self._functions.activation_bytes(theta, batch)
        room = budget - sum(size for _, size in pieces)
        rows, cols = CurvatureOperator._speed_piece(per, n, min(vectors, 64))
        piece = memory.product_piece(per, rows, cols, room) or (1, 1)
        pieces.append(
            (
                f"{memory.PRODUCT_PIECE} ({piece[0]:,} samples x {piece[1]:,} of {vectors:,} vectors x "
                f"{memory.PRODUCT_COPIES} x {memory.short(per)}, one sample's largest module output)",
                memory.product_bytes(per, *piece),
            )
        )
        return memory.MemoryEstimate.of(f"{type(self).__name__} ({self.dtype}, p = {self.num_params:,})", pieces)


def _merge_reports(reports: list[Any]) -> Any:
    """One report for consecutive solves: ``None`` without reports, the report's class's
    ``concatenate`` when it has one, else the last report."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return None
    merge = getattr(type(reports[0]), "concatenate", None)
    return merge(reports) if merge is not None and len(reports) > 1 else reports[-1]


_PICKLING = threading.local()  # ids of the solvers this thread is pickling (see __reduce__)


def _restore_solver(cls: type[SolverEngine], *state: Any) -> SolverEngine:
    """Rebuild a solver pickled by :meth:`SolverEngine.__reduce__` or ``__reduce_ex__`` (``state``:
    :func:`~..pickling.dump_state`'s arguments)."""
    solver = cls.__new__(cls)
    solver.__dict__.update(pickling.load_state(*state))
    return solver
