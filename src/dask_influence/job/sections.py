"""The job file's sections as typed, frozen dataclasses, and the keys each section takes.

:class:`Job` is what :func:`~dask_influence.job.validate.parse_job` returns: one dataclass per
section, paths already resolved (:mod:`.paths`). The ``[solver]`` keys besides ``method`` come
from the solver class's configuration dataclass (the registry); ``[evaluate]``'s are the
keywords of :func:`dask_influence.evaluate.lds` and ``loo``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.solvers.registry import SOLVERS, solver_class
from ..errors import JobFileError
from ..mapping.security import TlsFiles

if TYPE_CHECKING:
    from ..core.solvers.base import InfluenceModel


def api_default(function: Callable[[], Callable[..., Any]], name: str) -> Any:
    """A dataclass field whose default is the default of keyword ``name`` of the API function
    ``function()`` returns (imported when a section is built, not when this module is): the job
    file and the API it configures share one default."""

    def default() -> Any:
        value = inspect.signature(function()).parameters[name].default
        if value is inspect.Parameter.empty:
            raise TypeError(f"{name} has no default in {function().__qualname__}")
        return value

    return field(default_factory=default)


def _build() -> Callable[..., Any]:
    from ..index import GradientIndex

    return GradientIndex.build


def _lds() -> Callable[..., Any]:
    from ..evaluate import lds

    return lds


def _loo() -> Callable[..., Any]:
    from ..evaluate import loo

    return loo


DEFAULT_BLOCK_SIZE = 256
MODES = ("up", "perturbation")


class _MethodNames(Mapping):
    """``[solver] method`` -> name of the solver class: a live view of the solver registry."""

    def __getitem__(self, key: str) -> str:
        return SOLVERS[key].__name__

    def __iter__(self) -> Iterator[str]:
        return iter(SOLVERS)

    def __len__(self) -> int:
        return len(SOLVERS)


#: ``[solver] method`` -> name of the solver class (from :data:`~dask_influence.core.solvers.registry.SOLVERS`).
SOLVER_METHODS: Mapping[str, str] = _MethodNames()

RENAMED_KEYS: dict[str, dict[str, str]] = {
    "evaluate": {"train": "retrain", "loo_points": "points", "bootstrap": "n_bootstrap"}
}
"""``section -> {old key: new key}``: old spellings accepted for one release with a ``RenamedWarning``
(the keys of :func:`dask_influence.evaluate.lds` / ``loo``)."""
REQUIRED_SECTIONS = ("model", "solver", "output")
LOCAL_KEYS = ("workers", "threads", "memory_limit")
TASK_NAMES = ("classification", "regression", "causal_lm")
"""The ready-made tasks of :mod:`dask_influence.tasks` a ``[task]`` section may name."""
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


_REQUIRED_HINTS = {
    "model": 'it names the factory: [model] factory = "module:function".',
    "solver": 'it names the method: [solver] method = "cg" (or direct, lissa, arnoldi, nystroem, ekfac).',
    "output": 'it names the store: [output] store = "influences.zarr".',
}


# -- the parsed job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSection:
    """``[task]``: what is differentiated, for batches of any structure.

    Attributes:
        name: a ready-made task of :mod:`dask_influence.tasks` (:data:`TASK_NAMES`), or
        factory: ``"module:function"`` returning a :class:`~dask_influence.Task` (imported
            with ``[model] path`` in front of ``sys.path``);
        options: keyword arguments for the task function or factory.
    """

    name: str | None = None
    factory: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: where the model, loss and data come from.

    Attributes:
        factory: ``"module:function"``; the function returns the model, the loss, the train
            dataset and the test dataset.
        path: directories put in front of ``sys.path`` before importing the module
            (absolute; default: the job file's directory).
        options: keyword arguments for the factory.
    """

    factory: str
    path: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module part of ``factory``."""
        return self.factory.split(":", 1)[0]

    @property
    def function(self) -> str:
        """The function part of ``factory``."""
        return self.factory.split(":", 1)[1]


@dataclass(frozen=True)
class SolverSection:
    """``[solver]``: the method and the keyword arguments of its class.

    Attributes:
        distributed_fit: fit over the train blocks on the cluster (``None``: yes when a
            cluster is used, no with ``[cluster] sequential``).
        fit_file: where the fitted state is saved and reused (absolute path or URL;
            ``None``: next to the store, ``<store>.fit.pt``).
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    distributed_fit: bool | None = None
    fit_file: str | None = None

    @property
    def class_name(self) -> str:
        """The name of the solver class of ``method``."""
        return self.solver_class.__name__

    @property
    def solver_class(self) -> type[InfluenceModel]:
        """The solver class registered as ``method``."""
        return solver_class(self.method)


@dataclass(frozen=True)
class BlocksSection:
    """``[blocks]``: test and train points per block (one zarr chunk is test x train)."""

    test: int = DEFAULT_BLOCK_SIZE
    train: int = DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class OutputSection:
    """``[output]``: the zarr store and what goes into it.

    Attributes:
        store: an absolute path, or a URL (``s3://...``, anything with ``://``).
        mode: ``"up"`` or ``"perturbation"``.
        top_k: store the ``top_k`` most helpful and most harmful training points of each
            test point (``None``: not stored).
        self_influences: store the self-influence of every training point.
    """

    store: str
    mode: str = "up"
    top_k: int | None = None
    self_influences: bool = False


@dataclass(frozen=True)
class ClusterSection:
    """``[cluster]``: where the blocks are computed.

    Attributes:
        scheduler: address of a running Dask scheduler; ``None``: ``DASK_SCHEDULER_ADDRESS``
            from the environment, else an embedded ``LocalCluster``.
        security: the TLS certificates for a ``tls://`` scheduler (``[cluster] security =
            { ca_file, cert, key }``, paths relative to the job file); ``None``: none given here
            (``--tls-*`` options win over it, Dask's ``distributed.comm.tls.*`` configuration
            comes after it; see :mod:`dask_influence.mapping.security`).
        workers, threads, memory_limit: settings of the embedded ``LocalCluster``
            (``memory_limit`` per worker: bytes or a string such as ``"4GiB"``).
        gpu: put the model on CUDA; its tasks then run with the Dask resource ``GPU=1``.
        sequential: compute in this process, without Dask's distributed scheduler.
    """

    scheduler: str | None = None
    security: TlsFiles | None = None
    workers: int | None = None
    threads: int | None = None
    memory_limit: int | str | None = None
    gpu: bool = False
    sequential: bool = False


@dataclass(frozen=True)
class IndexSection:
    """``[index]``: the gradient index of ``dask-influence index`` and ``query``
    (:class:`~dask_influence.GradientIndex`; the keys are its ``build`` arguments, and their
    defaults are ``build``'s own).

    Attributes:
        store: the index's path (absolute) or URL.
        regularization: a number, or ``"auto"``.
        layers: with ``projection = "kronecker"``, the layers to project (``None``: all).
        storage, factor_rank: ``"factored"`` keeps each layer's Kronecker-projected gradient as
            low-rank factors (``factor_rank``: their number per layer; ``None``: exact); see
            docs/gradient-index.md, "Factored storage".
    """

    store: str
    projection_dim: int = api_default(_build, "projection_dim")
    projection: str = api_default(_build, "projection")
    seed: int = api_default(_build, "seed")
    dtype: str = api_default(_build, "dtype")
    preconditioner: str = api_default(_build, "preconditioner")
    curvature: str = api_default(_build, "curvature")
    regularization: float | str = api_default(_build, "regularization")
    ggn_draws: int | str = api_default(_build, "ggn_draws")
    layers: tuple[str, ...] | None = None
    storage: str = api_default(_build, "storage")
    factor_rank: int | None = None

    def build_options(self) -> dict[str, Any]:
        """The keyword arguments of ``GradientIndex.build`` besides the data and the store."""
        options = {k: getattr(self, k) for k in SECTIONS["index"] if k not in ("store", "layers")}
        options["layers"] = list(self.layers) if self.layers is not None else None
        return options


EVALUATE_METHODS = ("lds", "loo", "mislabel")
"""What ``[evaluate] methods`` may list."""


@dataclass(frozen=True)
class EvaluateSection:
    """``[evaluate]``: what ``dask-influence evaluate`` measures (see :mod:`dask_influence.evaluate`).

    Attributes:
        retrain: ``"module:function"``, ``retrain(train_indices, seed, **options) -> model or
            state_dict`` (imported with ``[model] path`` in front of ``sys.path``; formerly ``train``).
        options: keyword arguments for the train function.
        store: the store whose influences are scored and whose ``evaluation/`` group records the
            runs (absolute path or URL; ``None``: ``[output] store``).
        methods: any of ``"lds"``, ``"loo"``, ``"mislabel"``.
        n_subsets, fraction, seeds, seed: the LDS subsets and the retraining seeds.
        points: leave-one-out points: a number (a random sample of that size, drawn with
            ``seed``) or a list of training indices (formerly ``loo_points``).
        warm_start: leave-one-out retraining starts from the trained weights
            (``train(..., init=state_dict)``).
        corrupted: the corrupted training indices for ``"mislabel"``.
        confidence, n_bootstrap: the bootstrap interval of the mean LDS (formerly ``bootstrap``).
    """

    retrain: str
    options: dict[str, Any] = field(default_factory=dict)
    store: str | None = None
    methods: tuple[str, ...] = ("lds",)
    n_subsets: int = api_default(_lds, "n_subsets")
    fraction: float = api_default(_lds, "fraction")
    seeds: int = api_default(_lds, "seeds")
    seed: int = api_default(_lds, "seed")
    points: int | tuple[int, ...] = 20  # loo takes the points themselves: the job file's default draws 20
    warm_start: bool = api_default(_loo, "warm_start")
    corrupted: tuple[int, ...] = ()
    confidence: float = api_default(_lds, "confidence")
    n_bootstrap: int = api_default(_lds, "n_bootstrap")


def section_keys(cls: type, *, without: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The keys of a section: the fields of its dataclass ``cls`` in declaration order (less
    ``without``: fields that are no key), then ``extra`` (keys that are no field)."""
    return tuple(f.name for f in fields(cls) if f.name not in without) + extra


SECTIONS: dict[str, tuple[str, ...]] = {
    "model": section_keys(ModelSection),
    "task": section_keys(TaskSection),
    # besides these, [solver] takes the fields of the solver class's configuration (the registry)
    "solver": section_keys(SolverSection, without=("params",)),
    "blocks": section_keys(BlocksSection),
    "output": section_keys(OutputSection),
    "cluster": section_keys(ClusterSection),
    "index": section_keys(IndexSection),
    "evaluate": section_keys(EvaluateSection),
}
"""``section -> its keys``, from the section dataclasses' fields (a new field is a key at once). The
old spellings of :data:`RENAMED_KEYS` (and a solver's ``config_class.renamed``) are no keys: they
are renamed, with a ``RenamedWarning``, before the keys are checked."""


@dataclass(frozen=True)
class Job:
    """A validated job file. ``path`` is the file it was read from (``None`` for a dict)."""

    model: ModelSection
    solver: SolverSection | None
    output: OutputSection
    blocks: BlocksSection = field(default_factory=BlocksSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    path: Path | None = None
    task: TaskSection | None = None
    evaluate: EvaluateSection | None = None
    index: IndexSection | None = None

    def need_solver(self) -> SolverSection:
        """The ``[solver]`` section (optional in a job file with an ``[index]`` section).

        Raises:
            JobFileError: the job has none.
        """
        if self.solver is None:
            raise JobFileError(
                "[solver] section is missing; " + _REQUIRED_HINTS["solver"] + " (A job with only an [index] "
                "section runs with `dask-influence index` and `dask-influence query`.)",
                path=None if self.path is None else str(self.path),
            )
        return self.solver
