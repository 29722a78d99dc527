"""The influence model interface shared by every solver.

A solver is built from a trained model and its loss, fitted once on the training data
(which computes or prepares the curvature ``H`` of the mean training loss), and then turns
gradients into influences:

- ``influence_factors(x_test, y_test)`` -> ``(n_test, p)``: ``(H + lambda I)^-1 grad f(z_test)``;
- ``influences_from_factors(f, x, y, mode)`` -> ``(n_test, n)`` or ``(n_test, n, *features)``;
- ``influences(x_test, y_test, x, y, mode)``: both steps at once;
- ``self_influences(x, y)`` -> ``(n,)``: ``grad L(z)^T (H + lambda I)^-1 grad L(z)``.

With a loss ``loss(outputs, targets)`` the points are given as two arguments ``x, y`` (or
one pair ``(x, y)``); with a :class:`~..task.Task` as ONE batch of any structure (a dict
of tensors, a tuple): ``influence_factors(test_batch)``, ``influences(test_batch,
train_batch)``, ``self_influences(batch)``. ``f`` is the task's measurement (the loss by
default).

Subclasses implement ``_fit(operator, data)`` and ``_solve(rhs)``; everything else (input
checks, chunked per-sample gradients, modes, dtype and device handling) lives here.
"""

from __future__ import annotations

import copy
import copyreg
import os
import pickle
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, ClassVar, cast

import cloudpickle
import torch
from torch import Tensor, nn

from ... import progress as _progress
from ...errors import NotFittedError, NotPositiveDefiniteError
from .. import batches
from ..blocks import BlockSums, LocalBlocks, summed_operator
from ..data import DICT_BATCHES, TrainingData
from ..gradients import _FORWARD_LOCK, LossFn, ModelFunctions, check_finite, flat_params
from ..modes import InfluenceMode
from ..operators import BlockDiagonalOperator, Curvature, CurvatureOperator, LinearOperator
from ..task import Task, as_task
from . import inputs
from .config import (  # noqa: F401  (re-exported: the solvers' shared checks)
    SolverConfig,
    check_blocks,
    check_nonnegative,
    check_positive_int,
    check_rank,
    check_seed,
)


class InfluenceModel(ABC):
    """Base class of all solvers.

    ``Solver(model, task, **hyperparameters)`` or ``Solver(model, task, config)`` with the
    solver's ``config_class``; the hyperparameters every solver has are those of
    :class:`~.config.SolverConfig` (``regularization``, ``curvature``, ``chunk_size``).

    Args:
        model: a trained ``nn.Module``; influence is taken with respect to its parameters
            with ``requires_grad=True``. Put it in eval mode (dropout and batch norm in
            training mode make per-sample gradients ill-defined).
        task: what is differentiated and measured: a :class:`~..task.Task` (the points are
            batches of any structure), or a loss ``loss(outputs, targets) -> scalar`` with mean
            reduction over the batch (the points are then pairs ``x, y``; it is wrapped as a
            pair task). ``solver.task`` is the Task, ``solver.loss`` what was passed.
        config: the hyperparameters as one ``config_class`` instance (instead of keywords).
        **hyperparameters: the fields of ``config_class``, by name.
    """

    config_class: ClassVar[type[SolverConfig]] = SolverConfig
    """The frozen dataclass of this solver's hyperparameters."""

    method: ClassVar[str] = ""
    """The registered name (``registry.register`` sets it): ``"direct"``, ``"cg"``, ..."""

    needs_training_data: ClassVar[bool] = False
    """True for solvers that apply ``H`` from the training data at solve time (CG, LiSSA):
    :meth:`load` then needs ``train=``."""

    _saved_attributes: ClassVar[tuple[str, ...]] = ("state_",)
    """Fitted attributes written by :meth:`save`."""

    def __init__(
        self, model: nn.Module, task: LossFn | Task, config: SolverConfig | None = None, /, **hyperparameters: Any
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        loss, task = task, as_task(task)  # ``loss``: as given (``self.loss``); ``task``: a Task either way
        self.__dict__["config"] = self._make_config(config, hyperparameters)
        model = inputs.widen_half_precision(model)
        self.model = model
        self.loss = loss
        self.objective = task
        """The :class:`~..task.Task` the solver differentiates (the pair task of a loss function)."""
        self._functions = ModelFunctions(model, task)
        self._theta: Tensor | None = None
        self.fit_id_: str | None = None
        self.n_train_: int | None = None
        self.feature_shape_: torch.Size | None = None
        self._validate(self.config)

    @property
    def task(self) -> Task:
        """The :class:`~..task.Task` the solver differentiates and measures (a loss function
        given at construction is wrapped as its pair task; ``loss`` keeps what was given)."""
        return self.objective

    @classmethod
    def _make_config(cls, config: SolverConfig | None, hyperparameters: dict[str, Any]) -> SolverConfig:
        if config is not None:
            if hyperparameters:
                raise TypeError(
                    f"Pass {cls.__name__} either a {cls.config_class.__name__} or keyword "
                    f"hyperparameters, not both; got both and {', '.join(sorted(hyperparameters))}."
                )
            if not isinstance(config, cls.config_class):
                raise TypeError(f"{cls.__name__} takes a {cls.config_class.__name__}; got {type(config).__name__}.")
            return config
        allowed = cls.config_class.field_names()
        unknown = sorted(set(hyperparameters) - set(allowed))
        if unknown:
            raise TypeError(
                f"{cls.__name__} got unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(allowed)}."
            )
        return cls.config_class(**hyperparameters)

    def _validate(self, config: SolverConfig) -> None:
        """Checks of ``config`` that need the model (e.g. ``rank <= p``); raise ``ValueError``."""
        return None

    # -- hyperparameters ----------------------------------------------------------------------
    config: SolverConfig
    """The solver's hyperparameters (frozen). Assigning a hyperparameter attribute
    (``solver.regularization = 0.1``) replaces it with a validated copy; after fitting only
    the config's ``solve_time`` fields may change (the others need a new fit)."""

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and name in type(config).field_names():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        config = self.__dict__.get("config")
        if name == "config" or (config is not None and name in type(config).field_names()):
            new = value if name == "config" else cast(SolverConfig, config).replace(**{name: value})
            self._change_config(new)
            return
        super().__setattr__(name, value)

    def _change_config(self, new: SolverConfig) -> None:
        if not isinstance(new, self.config_class):
            raise TypeError(
                f"{type(self).__name__}.config must be a {self.config_class.__name__}; got {type(new).__name__}."
            )
        old = self.config
        changed = [k for k in new.field_names() if not _same_value(getattr(new, k), getattr(old, k))]
        refit = [k for k in changed if k not in new.solve_time]
        if refit and self.is_fitted:
            raise ValueError(
                f"Changing {', '.join(refit)} of a fitted {type(self).__name__} needs a new fit; build "
                f"a new solver ({type(self).__name__}(model, loss, ...)) and fit it."
                + (f" ({', '.join(sorted(new.solve_time))} may change without one.)" if new.solve_time else "")
            )
        if not self.is_fitted:  # a fitted solver checks solve-time values when it solves
            self._validate(new)
        self.__dict__["config"] = new

    @property
    def regularization(self) -> float:
        """``lambda`` in ``H + lambda I``."""
        return self.config.regularization

    @regularization.setter
    def regularization(self, value: float) -> None:
        self._change_config(self.config.replace(regularization=value))

    @property
    def curvature(self) -> Curvature:
        """Which curvature ``H`` is: the Hessian or the GGN."""
        return Curvature.parse(self.config.curvature)

    @property
    def blocks(self) -> str:
        """``"layer"`` when each layer's parameters form an independent block of the curvature
        (cross-layer terms dropped), else ``"full"``."""
        return getattr(self.config, "blocks", "full")

    # -- pickling ---------------------------------------------------------------------
    def __reduce__(self) -> tuple:
        """Pickle a consistent snapshot of the solver, serialized under the forward lock.

        A Dask worker sends its copy of the solver to other workers from its event-loop thread
        while its task thread may be inside a forward, where ``functional_call`` has swapped
        the model's parameters for functorch wrappers: pickled then, the model fails to
        serialize (the transfer, and with it the job, stalls) or would carry the wrong
        tensors. Serializing the whole state while holding the process-wide forward lock of
        :mod:`..gradients` always sees the model's own parameters.
        """
        active = _PICKLING.__dict__.setdefault("ids", set())
        if id(self) in active:
            # a reference back to this solver from inside its own state (an operator holding
            # one of its methods): pickled by the snapshot's pickler as a plain object, whose
            # memo already holds the state (typeshed's copyreg lacks __newobj__: hence the ignore)
            return (copyreg.__newobj__, (type(self),), self.__dict__)  # type: ignore[attr-defined]
        active.add(id(self))
        try:
            with _FORWARD_LOCK:
                payload = cloudpickle.dumps(self.__dict__, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            active.discard(id(self))
        return (_restore_solver, (type(self), payload))

    def __copy__(self) -> InfluenceModel:
        """A shallow copy (sharing the model and the fitted tensors), as ``copy.copy`` gives
        for plain objects; :meth:`__reduce__` would otherwise make it a deep one."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    # -- properties -------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """``p``, the number of trainable parameters."""
        return self._functions.spec.num_params

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the trainable parameters (and of every result)."""
        return self._functions.spec.dtype

    @property
    def device(self) -> torch.device:
        """The device of the trainable parameters; inputs are moved there."""
        return self._functions.spec.device

    @property
    def is_fitted(self) -> bool:
        """Whether the solver has been fitted (or restored)."""
        return self._theta is not None

    # -- fitting ----------------------------------------------------------------------
    def fit(self, data: Any, *, progress: bool | None = None) -> InfluenceModel:
        """Fit the solver on the training data; returns ``self``.

        Args:
            data: a DataLoader, any re-iterable of batches, or one batch of whole arrays (a
                pair ``(x, y)``; with a task also a dict of arrays). Batches are pairs
                ``(x, y)`` with a loss, any structure with a task. The curvature is the mean
                over all samples.
            progress: report every pass over the data (its name, samples done of ``n``, rate,
                ETA); ``None``: where a person watches (see :mod:`dask_influence.progress`).
        """
        self.check_model_mode()
        source = self.training_data(data)
        source.scan()
        assert source.feature_shape is not None  # scan() records it (or refuses empty data)
        self.trained_parameters()
        self.check_loss(source.first())
        self.fit_blocks(
            LocalBlocks(self, source),
            source,
            feature_shape=source.feature_shape,
            float_inputs=source.float_inputs,
            progress=progress,
        )
        return self

    def training_data(self, data: Any, batch_size: int | None = None) -> TrainingData:
        """``data`` as a :class:`~..data.TrainingData` of this solver's batches (not yet scanned)."""
        return TrainingData(
            data,
            dtype=self.dtype,
            device=self.device,
            batch_size=batch_size or self.chunk_size,
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
        """Fit from sums over training blocks: the one fitting path.

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
            self._fit_reported(blocks, data, feature_shape, float_inputs, reporter)

    def _fit_reported(
        self,
        blocks: BlockSums,
        data: TrainingData | None,
        feature_shape: Sequence[int],
        float_inputs: bool | None,
        reporter: _progress.Progress,
    ) -> None:
        theta = self.trained_parameters()
        self._theta = None
        reported = _ReportedBlocks(blocks, self, reporter)
        try:
            self._fit(self.curvature_over(reported, theta), reported)
        except NotPositiveDefiniteError as err:
            # A solver whose regularization is a solve-time setting keeps a fit whose state it
            # stored before refusing the regularization: following the advice needs no refit.
            if "regularization" not in self.config.solve_time or getattr(self, "state_", None) is None:
                raise
            self.finish_fit(theta, data, n=blocks.n, feature_shape=feature_shape, float_inputs=float_inputs)
            suggested = err.suggested_regularization
            raise NotPositiveDefiniteError(
                f"{err} The fit is kept: set solver.regularization = {suggested:g} and call the solver "
                "again (no refit needed).",
                smallest_eigenvalue=err.smallest_eigenvalue,
                suggested_regularization=suggested,
            ) from None
        self.finish_fit(theta, data, n=blocks.n, feature_shape=feature_shape, float_inputs=float_inputs)
        reported.done()

    def _progress_title(self) -> str:
        """The solver's name in progress lines (``CG``, ``EK-FAC``, ...)."""
        name = type(self).__name__
        return _TITLES.get(name, name.removesuffix("Influence"))

    def _fit_passes(self) -> int | None:
        """The number of passes over the training data a fit makes, where known (progress lines)."""
        return None

    def _pass_name(self, fn: Any, payload: Any) -> str:
        """What a fitting pass of block function ``fn`` computes, for progress lines."""
        name = getattr(fn, "__name__", "block sums")
        return _PASS_NAMES.get(name, name.removesuffix("_block").replace("_", " "))

    def finish_fit(
        self,
        theta: Tensor,
        data: TrainingData | None,
        *,
        n: int,
        feature_shape: Sequence[int],
        float_inputs: bool | None,
    ) -> None:
        """Mark the solver fitted at ``theta`` (after :meth:`fit_blocks` or a restored state);
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
        """``H`` of the mean training loss as sums over ``blocks`` (block-diagonal by layer
        with ``blocks="layer"``): what :meth:`_fit` receives."""
        slices = None
        if self.blocks == "layer":
            slices = [(start, stop) for _, start, stop in self._functions.spec.layer_slices()]
        return summed_operator(blocks, theta, slices)

    def block_curvature(self) -> CurvatureOperator:
        """The curvature of the loss at the trained parameters, without data: its
        ``batch_matmat(batch, V)`` is one block's curvature times ``V``."""
        return CurvatureOperator(self._functions, self.trained_parameters(), None, self.curvature)  # type: ignore[arg-type]

    def trained_parameters(self) -> Tensor:
        """The model's trainable parameters as one flat vector ``(p,)`` (checked finite)."""
        theta = flat_params(self.model, self._functions.spec)
        check_finite("The model's trainable parameters", theta, hint="Load a model with finite weights.")
        return theta

    def attach_curvature(self, operator: LinearOperator) -> InfluenceModel:
        """A shallow copy of this fitted solver that solves with ``operator`` as ``H`` (e.g. sums
        over train blocks on a cluster). Only for solvers with ``needs_training_data``."""
        if not self.needs_training_data:
            raise TypeError(f"{type(self).__name__} does not solve with the curvature operator.")
        clone = copy.copy(self)
        clone._attach(operator, None)
        return clone

    def fitted_state(self) -> dict[str, Any]:
        """The fitted state: ``{attribute: value}`` of :attr:`_saved_attributes` (tensors, state
        dataclasses, preconditioners), what :meth:`save` writes."""
        self._require_fitted()
        return {name: getattr(self, name) for name in self._saved_attributes}

    def fingerprint(self) -> str:
        """A deterministic hash of this solver: method, hyperparameters, the model's weights and,
        when fitted, the fitted state. Two solvers with the same fingerprint give the same influences."""
        from . import fit_record

        return fit_record.fingerprint(self)

    # -- save and load ------------------------------------------------------------------
    def save(self, path: str | os.PathLike | BinaryIO) -> None:
        """Write the fitted state (hyperparameters and tensors, not the model) to ``path`` (or a binary file).

        The file records a checksum of the trained parameters; :meth:`load` refuses a model
        with other weights. It is plain data (format 2 of :mod:`..serialization`: the
        record ``format``, ``method`` (the registered name), ``class``, ``hyperparameters``
        (``config.to_dict()``), ``params_checksum``, ``num_params``, ``n_train``,
        ``feature_shape``, ``float_inputs`` (optional on load) and ``attributes`` (the fitted
        state of ``_saved_attributes``),
        written with ``torch.save`` and read with ``weights_only=True``): loading it never
        runs code from the file.

        Raises:
            TypeError: a fitted attribute holds an object whose class is not allowed in saved
                files (a custom preconditioner: decorate its class with ``@serializable``).
        """
        from . import fit_record

        file = cast(BinaryIO, path) if hasattr(path, "write") else os.fspath(path)
        fit_record.write(self, self._require_fitted(), file)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: nn.Module,
        task: LossFn | Task | None = None,
        *,
        train: Any = None,
        loss: LossFn | Task | None = None,
    ) -> InfluenceModel:
        """Rebuild a fitted solver from :meth:`save`'s file and the same trained model.

        Args:
            task: the solver's task or loss, as it was built with (``loss=`` is its old
                spelling, with a ``RenamedWarning``).
            train: the training data, for solvers that apply ``H`` at solve time (CG,
                LiSSA); ignored by the others.

        The file is read as data (``torch.load(..., weights_only=True)``, then only the
        allow-listed state classes of :mod:`..serialization` are built): a crafted file cannot
        run code. ``InfluenceModel.load`` (on the base class) loads whichever registered
        solver the file holds.

        Raises:
            ValueError: the file is not one :meth:`save` wrote (naming it: unreadable, not
                plain data, an old format that cannot be read safely, an unknown type), holds
                another solver class, or ``model``'s trainable parameters are not the ones the
                solver was fitted with.
        """
        from ...renamed import renamed
        from . import fit_record

        task = renamed(f"{cls.__name__}.load", "loss", loss, "task", task)
        if task is None:
            raise TypeError(f"{cls.__name__}.load() needs the task (or loss) the solver was built with.")
        return fit_record.load_solver(cls, os.fspath(path), model, task, train)

    def _operator_for(self, theta: Tensor, source: TrainingData) -> Any:
        operator: Any = CurvatureOperator(self._functions, theta, source, self.curvature)
        if self.blocks == "layer":
            slices = [(start, stop) for _, start, stop in self._functions.spec.layer_slices()]
            operator = BlockDiagonalOperator(operator, slices)
        return operator

    def _attach(self, operator: Any, data: TrainingData | None) -> None:
        """Re-attach the training data after :meth:`load` (solvers with ``needs_training_data``)."""
        raise NotImplementedError

    def shippable(self) -> InfluenceModel:
        """A shallow copy without the training data and curvature operators it solves with:
        small to send to Dask workers (which compute gradients, never solves with ``H``)."""
        clone = copy.copy(self)
        clone._detach()
        return clone

    def _detach(self) -> None:
        """Drop references to the training data (solvers with ``needs_training_data``)."""
        return None

    @abstractmethod
    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        """Prepare ``_solve`` from the (undamped) curvature of the training data.

        ``operator`` is ``H`` (block-diagonal by layer when ``blocks == "layer"``), each
        product a pass of sums over ``blocks``; a solver that needs other per-block
        quantities sums its own module-level block functions with ``blocks.sum(fn, payload)``.
        """

    solves_with_sweeps: ClassVar[bool] = False
    """True when every iteration of a solve is one product with ``H`` over ALL the training
    data (CG): the mapping layer may then run the solves on the client, each product one
    distributed sweep (:meth:`attach_curvature`)."""

    reports_solves: ClassVar[bool] = False
    """True for solvers whose solves return a report with an error estimate per right-hand side
    (CG, LiSSA: residuals; Arnoldi, Nystroem: the captured fraction of each right-hand side)."""

    def solve(self, rhs: Tensor) -> tuple[Tensor, Any]:
        """``(H + lambda I)^-1`` applied to each row of ``rhs`` ``(k, p)``, and the solve's report.

        Returns:
            ``(solution (k, p), report)``: the report is the solver's error estimate per row
            (:class:`~.cg.CgInfo`, :class:`~.lissa.LissaInfo`,
            :class:`~dask_influence.core.lowrank.LowRankInfo` for Arnoldi and Nystroem), ``None``
            for the others. Safe to call from several threads: nothing is written to the solver.
        """
        self._require_fitted()
        return self._solve_with_report(self._check_factors(rhs))

    def influence_factors_with_report(self, *test: Any) -> tuple[Tensor, Any]:
        """:meth:`influence_factors` and the report of its solve (see :meth:`solve`)."""
        theta = self._require_fitted()
        return self._factors_with_report(theta, self._batch(test, ("x_test", "y_test")))

    def _factors_with_report(self, theta: Tensor, batch: Any) -> tuple[Tensor, Any]:
        """The factors ``(n_test, p)`` of a prepared test batch and the report of their solves:
        each chunk of :meth:`_test_gradients` solved on its own, the reports merged."""
        parts, reports = [], []
        for grads in self._test_gradients(theta, batch):
            solution, report = self._solve_with_report(grads)
            parts.append(solution)
            reports.append(report)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), _merge_reports(reports)

    def _test_gradients(self, theta: Tensor, batch: Any) -> Iterator[Tensor]:
        """Engine hook: the per-sample gradients of the measurement of a prepared test batch, in
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

    # -- influence ----------------------------------------------------------------------
    def per_sample_grads(self, *points: Any, measurement: bool = False) -> Tensor:
        """Per-sample loss gradients at the trained parameters: ``(n, p)``.

        Args:
            points: ``x, y`` (a loss) or one batch (a task).
            measurement: the gradients of the task's measurement instead of its loss.
        """
        theta = self._require_fitted()
        return self._grads(theta, self._batch(points, ("x", "y")), measurement=measurement)

    def apply_inverse(self, v: Tensor) -> Tensor:
        """``(H + lambda I)^-1`` applied to each row of ``v`` ``(k, p)``; returns ``(k, p)``.

        By linearity, the factor of an aggregate test loss is the inverse applied to its
        gradient: the mean influence over a test set is
        ``influences_from_factors(apply_inverse(per_sample_grads(x_test, y_test).mean(0, keepdim=True)), x, y)``,
        at the cost of one solve instead of ``n_test``.
        """
        self._require_fitted()
        return self._solved(self._check_factors(v))

    def influence_factors(self, *test: Any, progress: bool | None = None) -> Tensor:
        """``(H + lambda I)^-1 grad f(z_test)`` for each test point: ``(n_test, p)``.

        Args:
            test: ``x_test, y_test`` (a loss) or one test batch (a task); ``f`` is the
                task's measurement (the loss by default).
            progress: report the solve (CG iterations, LiSSA steps, right-hand sides done);
                ``None``: see :mod:`dask_influence.progress`.
        """
        theta = self._require_fitted()
        batch = self._batch(test, ("x_test", "y_test"))
        with _progress.reporting(progress):
            factors, report = self._factors_with_report(theta, batch)
        if report is not None:
            self.info_ = report
        return factors

    def influences_from_factors(self, factors: Tensor, *points: Any, mode: str | InfluenceMode = "up") -> Tensor:
        """Influences of the points on the test points behind ``factors``.

        Args:
            factors: ``(n_test, p)`` from :meth:`influence_factors`.
            points: ``n`` training points: ``x, y`` (a loss) or one batch (a task).
            mode: ``"up"`` -> ``(n_test, n)``; ``"perturbation"`` -> ``(n_test, n, *x.shape[1:])``,
                ``x`` the input the task perturbs (the ``x`` of pairs).
        """
        mode = InfluenceMode.parse(mode)
        theta = self._require_fitted()
        factors = self._check_factors(factors)
        batch = self._batch(points, ("x", "y"))
        if mode is InfluenceMode.up:
            return self._up_influences(theta, factors, batch)
        path = self._perturbed_input(batch)
        parts = []
        n = batches.size(batch)
        for start in range(0, n, self.chunk_size):
            chunk = batches.slice_rows(batch, start, start + self.chunk_size)
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

    def influences(
        self, *points: Any, x: Any = None, y: Any = None, mode: str | InfluenceMode = "up", progress: bool | None = None
    ) -> Tensor:
        """Influence of each training point on each test point.

        ``influences(x_test, y_test, x, y)`` with a loss (or pyDVL's keywords,
        ``influences(x_test, y_test, x=x_train, y=y_train)``), ``influences(test_batch,
        train_batch)`` with a task; without the training points, the test points themselves.
        Returns ``(n_test, n)`` in mode ``"up"`` and ``(n_test, n, *x.shape[1:])`` in mode
        ``"perturbation"``. Positive means helpful: removing the point would raise the test
        loss (measurement) by about ``influence / n_train``.
        """
        mode = InfluenceMode.parse(mode)
        with _progress.reporting(progress):
            return self._influences(points, x, y, mode)

    def _influences(self, points: tuple, x: Any, y: Any, mode: InfluenceMode) -> Tensor:
        if x is not None or y is not None:
            return self._keyword_influences(points, x, y, mode)
        if self.objective.pairs and any(isinstance(point, dict) for point in points):
            raise TypeError(f"Got a dict batch: {DICT_BATCHES}.")
        width = 2 if self.objective.pairs and not inputs.is_pair(points[0] if points else None) else 1
        if len(points) not in (width, 2 * width):
            if self.objective.pairs:
                raise ValueError(
                    "Pass both x and y, or neither (to use the test points as training points): "
                    "influences(x_test, y_test[, x, y])."
                )
            raise TypeError(f"influences takes a test batch and optionally a train batch; got {len(points)} arguments.")
        test, train = points[:width], points[width:] or points[:width]
        factors = self.influence_factors(*test)
        return self.influences_from_factors(factors, *train, mode=mode)

    def _keyword_influences(self, test: tuple, x: Any, y: Any, mode: InfluenceMode) -> Tensor:
        """``influences(x_test, y_test, x=..., y=...)``: the training points given as keywords."""
        if not self.objective.pairs:
            raise TypeError(
                "x= and y= name the training inputs and targets of a pair loss; a solver built with a Task "
                "takes influences(test_batch, train_batch)."
            )
        if x is None or y is None:
            given, missing = ("x", "y") if y is None else ("y", "x")
            raise ValueError(
                f"Pass both x= and y= (the training inputs and targets), or neither (to use the test points "
                f"as training points); got {given}= without {missing}=."
            )
        if len(test) == 4 or (len(test) == 2 and inputs.is_pair(test[0])):
            raise TypeError(
                "The training points were given twice, as positional arguments and as x=, y=; pass "
                "influences(x_test, y_test, x=x_train, y=y_train)."
            )
        return self.influences_from_factors(self.influence_factors(*test), x, y, mode=mode)

    def self_influences(self, *points: Any, progress: bool | None = None) -> Tensor:
        """``grad L(z)^T (H + lambda I)^-1 grad L(z)`` for each point: ``(n,)``.

        The report of the solves (one per ``chunk_size`` points, merged) stays in ``info_``.
        ``progress``: report the points done (and each solve); ``None``: see :mod:`dask_influence.progress`."""
        with _progress.reporting(progress):
            values, report = self.self_influences_with_report(*points)
        if report is not None:
            self.info_ = report
        return values

    def self_influences_with_report(self, *points: Any) -> tuple[Tensor, Any]:
        """:meth:`self_influences` and the report of its solves, one row per point (see :meth:`solve`):
        the error estimates of the training points' own solves."""
        theta = self._require_fitted()
        return self._self_influences(theta, self._batch(points, ("x", "y")))

    def _self_influences(self, theta: Tensor, batch: Any) -> tuple[Tensor, Any]:
        """Engine hook: the self-influences ``(n,)`` of a prepared batch and the report of their
        solves (``None`` without one). Default: per ``chunk_size`` chunk, the per-sample
        gradients ``g`` solved and ``(H + lambda I)^-1 g . g`` summed per row."""
        out, reports = [], []
        n = batches.size(batch)
        meter = _progress.current().meter(f"{self._progress_title()} self-influences", n, "points")
        for start in range(0, n, self.chunk_size):
            chunk = batches.slice_rows(batch, start, start + self.chunk_size)
            g = self._grads(theta, chunk, offset=start)
            solution, report = self._solve_with_report(g)
            out.append((solution * g).sum(dim=1))
            reports.append(report)
            meter.advance(batches.size(chunk))
        meter.finish()
        return torch.cat(out), _merge_reports(reports)

    # -- helpers ------------------------------------------------------------------------
    def _require_fitted(self) -> Tensor:
        if self._theta is None:
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call .fit(train_loader) first.")
        return self._theta

    def prepare_batch(self, batch: Any, *, training: bool = False) -> Any:
        """One batch (a pair ``(x, y)`` with a loss, any structure with a task) as validated
        tensors on the model's device, as every method reads it."""
        names = ("training inputs", "training targets") if training else ("x", "y")
        return self._batch((batch,), names)

    def _batch(self, points: tuple, names: tuple[str, str]) -> Any:
        """The points of a public call as one validated batch on the model's device
        (:func:`.inputs.validated_batch`)."""
        return inputs.validated_batch(self, points, names)

    def _grads(self, theta: Tensor, batch: Any, offset: int = 0, *, measurement: bool = False) -> Tensor:
        """Per-sample gradients ``(n, p)`` of the loss (or measurement), ``chunk_size`` samples
        per vmapped call, written into one preallocated tensor (no concatenation copy)."""
        n = batches.size(batch)
        out = torch.empty(n, self.num_params, dtype=self.dtype, device=self.device)
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            g = self._functions.per_sample_grads(
                theta, batches.slice_rows(batch, start, stop), out=out[start:stop], measurement=measurement
            )
            inputs.check_grads_fast(g, g, self._functions.spec, offset + start)
        return out

    def _up_influences(self, theta: Tensor, factors: Tensor, batch: Any) -> Tensor:
        """Engine hook: the up-weighting influences ``factors @ grads(batch).T`` ``(n_test, n)``
        of a prepared batch of training points against checked factors ``(n_test, p)``.

        Default: chunk by chunk into one preallocated result, the ``(n, p)`` gradients never
        held at once, nor copied. EK-FAC contracts the factors with its layers' inputs and
        output gradients instead (on models with many parameters)."""
        n = batches.size(batch)
        out = torch.empty(factors.shape[0], n, dtype=self.dtype, device=self.device)
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
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

    def _check_factors(self, factors: Any) -> Tensor:
        return inputs.checked_factors(self, factors)

    def check_model_mode(self) -> None:
        """Refuse a model in training mode with dropout or batch norm (per-sample gradients would be ill-defined)."""
        inputs.check_model_mode(self.model)

    def check_loss(self, batch: Any) -> None:
        """Check the loss on the first training batch: it evaluates, is a finite scalar and averages
        over the batch (:func:`.inputs.check_loss`)."""
        inputs.check_loss(self, batch)


def _merge_reports(reports: list[Any]) -> Any:
    """One report for consecutive solves: ``None`` without reports, the report's class's
    ``concatenate`` when it has one, else the last report."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return None
    merge = getattr(type(reports[0]), "concatenate", None)
    return merge(reports) if merge is not None and len(reports) > 1 else reports[-1]


_PICKLING = threading.local()  # ids of the solvers this thread is pickling (see __reduce__)


def _restore_solver(cls: type[InfluenceModel], payload: bytes) -> InfluenceModel:
    """Rebuild a solver pickled by :meth:`InfluenceModel.__reduce__`."""
    solver = cls.__new__(cls)
    solver.__dict__.update(cloudpickle.loads(payload))
    return solver


_PASS_NAMES = {"curvature_block": "curvature products", "dense_block": "dense curvature"}
_TITLES = {
    "CgInfluence": "CG",
    "LissaInfluence": "LiSSA",
    "NystroemSketchInfluence": "Nystroem",
    "EkfacInfluence": "EK-FAC",
}


def _title(solver: InfluenceModel) -> str:
    return solver._progress_title()


class _ReportedBlocks:
    """The training blocks of a fit with each pass reported: a :class:`~dask_influence.progress.Meter`
    per pass, counting samples as blocks that say so (``on_block``: the in-process blocks) are
    summed, else at the end of the pass. Everything else is the blocks' own."""

    def __init__(self, blocks: BlockSums, solver: InfluenceModel, reporter: _progress.Progress):
        self._blocks, self._solver, self._reporter = blocks, solver, reporter
        self._passes = 0
        self._started = reporter.clock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blocks, name)

    @property
    def n(self) -> int:
        return self._blocks.n

    @n.setter
    def n(self, value: int) -> None:
        self._blocks.n = value

    @property
    def sweeps(self) -> int:
        return self._blocks.sweeps

    @sweeps.setter
    def sweeps(self, value: int) -> None:
        self._blocks.sweeps = value

    def sum(self, fn: Any, payload: Any = None) -> Any:
        self._passes += 1
        total = self._solver._fit_passes()
        of = f" of {total}" if total and total >= self._passes else ""
        meter = self._reporter.meter(
            f"{_title(self._solver)} fit: pass {self._passes}{of} ({self._solver._pass_name(fn, payload)})",
            self._blocks.n,
            "samples",
            force=bool(total),  # a known, small number of passes: each one's start is said
        )
        hooked = self._reporter.show and hasattr(self._blocks, "on_block")
        if hooked:
            self._blocks.on_block = meter.advance  # type: ignore[attr-defined]
        try:
            result = self._blocks.sum(fn, payload)
        finally:
            if hooked:
                self._blocks.on_block = None  # type: ignore[attr-defined]
        if not hooked:
            meter.advance(self._blocks.n - meter.done)
        meter.finish()
        return result

    def done(self) -> None:
        """Say the end of the fit (after at least one pass)."""
        if not self._passes:
            return
        elapsed = self._reporter.clock() - self._started
        self._reporter.say(
            f"{_title(self._solver)} fit: done, {self._passes} pass{'es' if self._passes != 1 else ''} "
            f"over {_progress.count(self._blocks.n)} samples in {_progress.duration(elapsed)}",
            force=True,
        )


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a is b or a == b
