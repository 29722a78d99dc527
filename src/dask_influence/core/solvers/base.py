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

Subclasses implement ``_fit(operator, data)`` and ``_solve(rhs)``. This module holds what
users call (construction, hyperparameters, ``fit``, the influence methods, save and load);
the engine hooks the mapping layer and subclasses call, with their defaults (the fitting
path, solves, chunked per-sample gradients, input checks, pickling), are inherited from
:class:`~.engine.SolverEngine` (:mod:`.engine`).
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, ClassVar, cast

import torch
from torch import Tensor, nn

from ... import progress as _progress
from .. import factor_columns
from ..blocks import LocalBlocks
from ..data import DICT_BATCHES
from ..gradients import LossFn, ModelFunctions
from ..modes import InfluenceMode
from ..operators import Curvature
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
from .engine import SolverEngine


class InfluenceModel(SolverEngine):
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
        hyperparameters = cls.config_class.keywords(cls.__name__, hyperparameters)  # old names: renamed, warned
        allowed = cls.config_class.field_names()
        unknown = sorted(set(hyperparameters) - set(allowed))
        if unknown:
            raise TypeError(
                f"{cls.__name__} got unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(allowed)}."
            )
        return cls.config_class(**hyperparameters)

    # -- hyperparameters ----------------------------------------------------------------------
    config: SolverConfig
    """The solver's hyperparameters (frozen). Assigning a hyperparameter attribute
    (``solver.regularization = 0.1``) replaces it with a validated copy; after fitting only
    the config's ``solve_time`` fields may change (the others need a new fit)."""

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and (name in type(config).field_names() or name in type(config).renamed):
            return getattr(config, name)  # an old name warns (SolverConfig.renamed)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        config = self.__dict__.get("config")
        if config is not None and name in type(config).renamed and not hasattr(type(self), name):
            # an old name (not another attribute, as EK-FAC's task, the objective): warned, then the new one
            name = next(iter(type(config).keywords(type(self).__name__, {name: value})))
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
        return self._perturbation_influences(theta, factors, batch)

    def influences_from_factor_columns(self, factors: Any, *points: Any) -> Tensor:
        """Up-weighting influences ``(n_test, n)`` of the points against factors read a slab of columns at a
        time: the same numbers as :meth:`influences_from_factors` (to float rounding), for factors too large
        to hold, e.g. read back from a store (the calculator's one-pass scoring).

        Args:
            factors: a :class:`~dask_influence.core.factor_columns.FactorColumns` reader of ``(n_test, p)``
                factors (or a tensor). Each slab of at most
                :data:`~dask_influence.core.factor_columns.SLAB_BYTES` is read once per group of chunks of
                the points, the groups' gradients held within a quarter of the solver's memory budget.
            points: ``n`` training points: ``x, y`` (a loss) or one batch (a task).
        """
        theta = self._require_fitted()
        columns = factor_columns.as_columns(factors)
        if isinstance(columns, factor_columns.TensorColumns):
            columns = factor_columns.TensorColumns(self._check_factors(columns.factors))
        elif columns.shape[1] != self.num_params:
            raise ValueError(
                f"factors must have shape (n_test, {self.num_params}) (one column per trainable parameter); "
                f"the reader has {tuple(columns.shape)}."
            )
        return self._up_influences_by_columns(theta, columns, self._batch(points, ("x", "y")))

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


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a is b or a == b
