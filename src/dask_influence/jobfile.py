"""The job file of ``dask-influence run``: a TOML file, its schema and its validation.

A job file names a Python factory that returns the model, the loss and the data, the solver
and its parameters, the block sizes, the output store and the cluster::

    [model]
    factory = "factory:make_problem"   # "module:function"
    path = "."                         # search path(s) for the module, relative to this file

    [task]                             # optional: batches of any structure (dicts), a measurement
    name = "causal_lm"                 # classification, regression, causal_lm (dask_influence.tasks)
    options = { measurement = "loss" } # their keyword arguments
    # factory = "tasks:make_task"      # or a "module:function" returning a dask_influence.Task

    [solver]
    method = "cg"                      # direct, cg, lissa, arnoldi, nystroem, ekfac
    regularization = 1e-3              # any other keyword of the solver class
    distributed_fit = true             # fit over the train blocks on the cluster (default with one)

    [blocks]
    test = 100                         # test points per block (rows of a zarr chunk)
    train = 10000                      # training points per block (columns of a chunk)

    [output]
    store = "influences.zarr"          # path (relative to this file) or URL
    mode = "up"                        # or "perturbation"
    top_k = 10
    self_influences = true

    [cluster]
    scheduler = "tls://scheduler:8786" # or local settings: workers, threads, memory_limit
    security = { ca_file = "ca.pem", cert = "client.pem", key = "client-key.pem" }  # TLS
    gpu = false

    [index]                            # optional: `dask-influence index` / `query` (a gradient index)
    store = "index.zarr"               # the index ([solver] is then optional)
    projection_dim = 1024

    [evaluate]                         # optional: `dask-influence evaluate` (retraining on the cluster)
    retrain = "retrain:train"          # "module:function": retrain(train_indices, seed) -> model
    methods = ["lds", "loo"]           # and "mislabel" (with corrupted = [...])
    n_subsets = 50

:func:`load_job` reads and validates the file; every problem found is reported at once in
one :class:`~dask_influence.errors.JobFileError`, one per line, with its section and, for
an unknown key, the closest valid one. This module is pure (no click, no cluster); it
imports the user's factory only when :func:`load_problem` is called. ``docs/cli.md``
documents every key.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.solvers.registry import SOLVERS, load_plugins, solver_class
from .errors import JobFileError
from .mapping.security import JOB_SOURCE, TlsFiles
from .storage.urls import is_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from .core.solvers.base import InfluenceModel

__all__ = [
    "Job",
    "ModelSection",
    "TaskSection",
    "SolverSection",
    "BlocksSection",
    "OutputSection",
    "ClusterSection",
    "EvaluateSection",
    "IndexSection",
    "Problem",
    "SOLVER_METHODS",
    "load_job",
    "parse_job",
    "load_problem",
    "load_task",
    "make_solver",
]

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

# keys of each section (the [solver] keys besides `method` come from the solver class)
SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("factory", "path", "options"),
    "task": ("name", "factory", "options"),
    "solver": ("method",),
    "blocks": ("test", "train"),
    "output": ("store", "mode", "top_k", "self_influences"),
    "cluster": ("scheduler", "security", "workers", "threads", "memory_limit", "gpu", "sequential"),
    "index": (
        "store",
        "projection_dim",
        "projection",
        "seed",
        "dtype",
        "preconditioner",
        "curvature",
        "regularization",
        "layers",
    ),
    "evaluate": (
        "retrain",
        "options",
        "store",
        "methods",
        "n_subsets",
        "fraction",
        "seeds",
        "seed",
        "points",
        "warm_start",
        "corrupted",
        "confidence",
        "n_bootstrap",
    ),
}
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
    (:class:`~dask_influence.GradientIndex`; the keys are its ``build`` arguments).

    Attributes:
        store: the index's path (absolute) or URL.
        regularization: a number, or ``"auto"``.
        layers: with ``projection = "kronecker"``, the layers to project (``None``: all).
    """

    store: str
    projection_dim: int = 1024
    projection: str = "sjlt"
    seed: int = 0
    dtype: str = "float32"
    preconditioner: str = "curvature"
    curvature: str = "ggn"
    regularization: float | str = "auto"
    layers: tuple[str, ...] | None = None

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
    n_subsets: int = 50
    fraction: float = 0.5
    seeds: int = 1
    seed: int = 0
    points: int | tuple[int, ...] = 20
    warm_start: bool = False
    corrupted: tuple[int, ...] = ()
    confidence: float = 0.95
    n_bootstrap: int = 1000


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


# -- loading and validation ------------------------------------------------------------------


def load_job(path: str | os.PathLike) -> Job:
    """Read and validate a job file.

    Relative paths in the file (``[model] path``, ``[output] store``) are relative to the
    file's directory.

    Raises:
        JobFileError: the file is missing, is not valid TOML, or breaks the schema; the
            message lists every problem, one per line.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise JobFileError(f"the job file {str(path)!r} {what}; pass the path of a TOML job file.")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"not valid TOML: {exc}", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise JobFileError(f"not valid TOML (not UTF-8 text): {exc}", path=str(path)) from None
    return parse_job(data, base_dir=path.resolve().parent, path=path)


def parse_job(
    data: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None
) -> Job:
    """Validate the parsed TOML ``data`` of a job file; see :func:`load_job`.

    Args:
        base_dir: directory that relative paths are resolved against (default: the
            current directory).
        path: the file the data came from, for messages.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems: list[str] = []
    tables: dict[str, dict] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if isinstance(value, Mapping):
                tables[key] = dict(value)
            else:
                problems.append(f"[{key}] must be a table (a [{key}] section); got {_describe(value)}.")
        else:
            problems.append(f"unknown section [{key}]{_suggest(key, SECTIONS, brackets=True)}")
    for name in REQUIRED_SECTIONS:
        if name == "solver" and "index" in data:
            continue  # an index job: `index` and `query` need no solver
        if name not in tables and name not in data:
            problems.append(f"[{name}] section is missing; {_REQUIRED_HINTS[name]}")

    model = _model(tables.get("model"), base, problems)
    task = _task(tables.get("task"), problems)
    solver = _solver(tables.get("solver"), base, problems)
    blocks = _blocks(tables.get("blocks", {}), problems)
    output = _output(tables.get("output"), base, problems)
    cluster = _cluster(tables.get("cluster", {}), problems, base)
    evaluate = _evaluate(tables.get("evaluate"), base, problems)
    index = _index(tables.get("index"), base, problems)
    if problems:
        raise JobFileError(problems, path=None if path is None else str(path))
    assert model and output  # for type checkers: no problems means all parsed
    return Job(
        model=model,
        solver=solver,
        output=output,
        blocks=blocks,
        cluster=cluster,
        path=None if path is None else Path(path),
        task=task,
        evaluate=evaluate,
        index=index,
    )


_REQUIRED_HINTS = {
    "model": 'it names the factory: [model] factory = "module:function".',
    "solver": 'it names the method: [solver] method = "cg" (or direct, lissa, arnoldi, nystroem, ekfac).',
    "output": 'it names the store: [output] store = "influences.zarr".',
}


def _model(table: dict | None, base: Path, problems: list[str]) -> ModelSection | None:
    if table is None:
        return None
    _unknown("model", table, SECTIONS["model"], problems)
    factory = table.get("factory")
    ok = True
    if factory is None:
        problems.append('[model] factory is required: the Python factory as "module:function".')
        ok = False
    elif not isinstance(factory, str):
        problems.append(f'[model] factory must be a string "module:function"; got {_describe(factory)}.')
        ok = False
    elif not _FACTORY.match(factory.strip()):
        problems.append(f'[model] factory must be "module:function" (e.g. "factory:make_problem"); got {factory!r}.')
        ok = False
    paths: list[str] = []
    raw = table.get("path", ".")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        problems.append(f"[model] path must be a directory or a list of directories; got {_describe(raw)}.")
        ok = False
    else:
        paths = [str((base / p).resolve()) if not os.path.isabs(p) else p for p in items]
    options = table.get("options", {})
    if not isinstance(options, Mapping):
        problems.append(
            f"[model] options must be a table of keyword arguments for the factory; got {_describe(options)}."
        )
        ok = False
    if not ok:
        return None
    assert isinstance(factory, str)  # checked above
    return ModelSection(factory=factory.strip(), path=tuple(paths), options=dict(options))


def _task(table: dict | None, problems: list[str]) -> TaskSection | None:
    if table is None:
        return None
    _unknown("task", table, SECTIONS["task"], problems)
    name, factory, options = table.get("name"), table.get("factory"), table.get("options", {})
    n_before = len(problems)
    if (name is None) == (factory is None):
        problems.append(
            '[task] needs either name (a ready-made task: "' + '", "'.join(TASK_NAMES) + '") or '
            'factory ("module:function" returning a dask_influence.Task), not '
            + ("both." if name is not None else "neither.")
        )
    elif name is not None and name not in TASK_NAMES:
        problems.append(
            f"[task] name must be one of {', '.join(TASK_NAMES)}; got {name!r}{_suggest(str(name), TASK_NAMES)}"
        )
    elif factory is not None and (not isinstance(factory, str) or not _FACTORY.match(factory.strip())):
        problems.append(f'[task] factory must be "module:function" (e.g. "tasks:make_task"); got {_describe(factory)}.')
    if not isinstance(options, Mapping):
        problems.append(f"[task] options must be a table of keyword arguments; got {_describe(options)}.")
    if len(problems) != n_before:
        return None
    return TaskSection(name=name, factory=None if factory is None else factory.strip(), options=dict(options))


def _solver(table: dict | None, base: Path, problems: list[str]) -> SolverSection | None:
    if table is None:
        return None
    method = table.get("method")
    params = {k: v for k, v in table.items() if k != "method" and k not in FIT_KEYS}
    fit = _fit_keys(table, base, problems)
    if method is None:
        problems.append(f"[solver] method is required; one of {', '.join(SOLVER_METHODS)}.")
        return None
    if not isinstance(method, str):
        problems.append(
            f"[solver] method must be a string, one of {', '.join(SOLVER_METHODS)}; got {_describe(method)}."
        )
        return None
    key = method.strip().lower()
    if key not in SOLVER_METHODS:
        load_plugins()  # solvers of other installed packages (entry points)
    if key not in SOLVER_METHODS:
        close = difflib.get_close_matches(key, list(SOLVER_METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        problems.append(f"[solver] unknown method {method!r}; choose one of {', '.join(SOLVER_METHODS)}{hint}")
        return None
    section = SolverSection(method=key, params=params, **fit)
    n_before = len(problems)
    _check_solver_params(section, problems)
    return section if len(problems) == n_before else None


#: ``[solver]`` keys about the fit itself rather than the solver class.
FIT_KEYS = ("distributed_fit", "fit_file")


def _fit_keys(table: dict, base: Path, problems: list[str]) -> dict[str, Any]:
    """``distributed_fit`` and ``fit_file`` of ``[solver]``, checked."""
    out: dict[str, Any] = {}
    if "distributed_fit" in table:
        value = table["distributed_fit"]
        if isinstance(value, bool):
            out["distributed_fit"] = value
        else:
            problems.append(f"[solver] distributed_fit must be true or false; got {_describe(value)}.")
    if "fit_file" in table:
        value = table["fit_file"]
        if not isinstance(value, str) or not value.strip():
            problems.append(f"[solver] fit_file must be a path or URL; got {_describe(value)}.")
        else:
            value = value.strip()
            if not is_url(value):
                value = os.path.expanduser(value)
                value = value if os.path.isabs(value) else str(base / value)
            out["fit_file"] = value
    return out


def solver_parameters(method: str) -> dict[str, Any]:
    """The keys a job file may give for ``method``: ``{name: type}`` of its configuration's fields."""
    return solver_class(method).config_class.types()


def _check_solver_params(section: SolverSection, problems: list[str]) -> None:
    """The keys, types and values of ``[solver]`` against the solver's configuration class."""
    n_before = len(problems)
    config_class = section.solver_class.config_class
    allowed = config_class.types()
    for name, value in section.params.items():
        if name not in allowed:
            problems.append(
                f"[solver] unknown key {name!r}"
                f"{_suggest(name, ['method', *allowed, *FIT_KEYS], what=f'keys for method {section.method!r}')}"
            )
            continue
        problem = _check_type(value, allowed[name])
        if problem:
            problems.append(f"[solver] {name} {problem}; got {_describe(value)}.")
    for name in config_class.required():
        if name not in section.params:
            problems.append(f"[solver] {name} is required for method {section.method!r}.")
    if len(problems) == n_before:  # the keys and types are right: now the values
        problem = _check_solver_values(config_class, section.params)
        if problem:
            problems.append(problem)


def _check_solver_values(config_class: Any, params: dict[str, Any]) -> str | None:
    """``None`` if ``params`` (keys and types checked) make a ``config_class`` (the solver's
    configuration dataclass, which validates its values without a model), else one line naming
    the key, the value and what is accepted, e.g. ``[solver] rank must be a positive int or 'auto';
    got 'ten'.``"""
    try:
        config_class(**params)
        return None
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
    if any(message.startswith(f"{name} ") for name in params):
        return f"[solver] {message}"
    required = {name: params[name] for name in config_class.required() if name in params}
    for name, value in params.items():  # the key whose value alone is refused
        try:
            config_class(**{**required, name: value})
        except (TypeError, ValueError):
            return f"[solver] {name} = {_describe(value)} is not accepted: {message}"
    return f"[solver] the values are not accepted: {message}"


def _check_type(value: Any, hint: Any) -> str | None:
    """``None`` if a TOML ``value`` fits the annotation ``hint``, else what it must be."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        results = [_check_type(value, a) for a in members]
        if any(r is None for r in results):
            return None
        found = list(dict.fromkeys(r for r in results if r))
        if found and all(r.startswith("must be ") for r in found):
            return "must be " + " or ".join(r.removeprefix("must be ") for r in found)
        return " or ".join(found) or "has an unsupported type"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        inner = args[0] if args else Any
        if isinstance(value, list) and all(_check_type(v, inner) is None for v in value):
            return None
        return "must be a list" + (" of strings" if inner is str else "")
    return "cannot be set in a job file (it needs a Python object)"


def _blocks(table: dict, problems: list[str]) -> BlocksSection:
    _unknown("blocks", table, SECTIONS["blocks"], problems)
    values = {}
    for key in ("test", "train"):
        if key in table:
            value = table[key]
            if _positive_int(value):
                values[key] = value
            else:
                problems.append(f"[blocks] {key} must be a positive integer; got {_describe(value)}.")
    return BlocksSection(**values)


def _output(table: dict | None, base: Path, problems: list[str]) -> OutputSection | None:
    if table is None:
        return None
    _unknown("output", table, SECTIONS["output"], problems)
    ok = True
    store = table.get("store")
    if store is None:
        problems.append('[output] store is required: the path or URL of the zarr store, e.g. "influences.zarr".')
        ok = False
    elif not isinstance(store, str) or not store.strip():
        problems.append(f"[output] store must be a path or URL; got {_describe(store)}.")
        ok = False
    else:
        store = store.strip()
        if not is_url(store) and not os.path.isabs(os.path.expanduser(store)):
            store = str(base / store)
        elif not is_url(store):
            store = os.path.expanduser(store)
    mode = table.get("mode", "up")
    if not isinstance(mode, str) or mode.strip().lower() not in MODES:
        problems.append(f'[output] mode must be "up" or "perturbation"; got {_describe(mode)}.')
        ok = False
    else:
        mode = mode.strip().lower()
    top_k = table.get("top_k")
    if top_k is not None and not _positive_int(top_k):
        problems.append(f"[output] top_k must be a positive integer; got {_describe(top_k)}.")
        ok = False
    elif top_k is not None and mode == "perturbation":
        problems.append(
            '[output] top_k needs mode = "up" (perturbation influences have one value per '
            'feature); remove top_k or set mode = "up".'
        )
        ok = False
    self_influences = table.get("self_influences", False)
    if not isinstance(self_influences, bool):
        problems.append(f"[output] self_influences must be true or false; got {_describe(self_influences)}.")
        ok = False
    if not ok:
        return None
    assert isinstance(store, str)  # checked above
    return OutputSection(store=store, mode=mode, top_k=top_k, self_influences=self_influences)


def _cluster(table: dict, problems: list[str], base: Path | None = None) -> ClusterSection:
    _unknown("cluster", table, SECTIONS["cluster"], problems)
    values: dict[str, Any] = {}
    if "security" in table:
        security = _security(table["security"], base or Path.cwd(), problems)
        if security is not None:
            values["security"] = security
    scheduler = table.get("scheduler")
    if scheduler is not None:
        if isinstance(scheduler, str) and scheduler.strip():
            values["scheduler"] = scheduler.strip()
        else:
            problems.append(
                f'[cluster] scheduler must be an address such as "tcp://scheduler:8786"; got {_describe(scheduler)}.'
            )
    for key in ("workers", "threads"):
        if key in table:
            if _positive_int(table[key]):
                values[key] = table[key]
            else:
                problems.append(f"[cluster] {key} must be a positive integer; got {_describe(table[key])}.")
    if "memory_limit" in table:
        limit = table["memory_limit"]
        if _memory_limit_ok(limit):
            values["memory_limit"] = limit
        else:
            problems.append(
                '[cluster] memory_limit must be a number of bytes, a size such as "4GiB", '
                f'or "auto"; got {_describe(limit)}.'
            )
    for key in ("gpu", "sequential"):
        if key in table:
            if isinstance(table[key], bool):
                values[key] = table[key]
            else:
                problems.append(f"[cluster] {key} must be true or false; got {_describe(table[key])}.")
    local = [k for k in LOCAL_KEYS if k in table]
    if "scheduler" in table and local:
        problems.append(
            f"[cluster] give either scheduler or local settings ({', '.join(local)}), not both: "
            "a running scheduler has its own workers."
        )
    remote = [k for k in ("scheduler", "security") if k in table]
    if table.get("sequential") is True and (remote or local):
        problems.append(f"[cluster] sequential = true computes in this process; remove {', '.join(remote + local)}.")
    return ClusterSection(**values)


SECURITY_KEYS = ("ca_file", "cert", "key")


def _security(table: Any, base: Path, problems: list[str]) -> TlsFiles | None:
    """``[cluster] security``: the TLS files of the client, as paths relative to the job file."""
    if not isinstance(table, dict):
        problems.append(
            '[cluster] security must be a table such as { ca_file = "ca.pem", cert = "client.pem", '
            f'key = "client-key.pem" }}; got {_describe(table)}.'
        )
        return None
    _unknown("cluster.security", table, SECURITY_KEYS, problems)
    values: dict[str, str] = {}
    for key in SECURITY_KEYS:
        if key not in table:
            continue
        value = table[key]
        if isinstance(value, str) and value.strip():
            value = value.strip()
            values[key] = value if os.path.isabs(value) else str(base / value)
        else:
            problems.append(f"[cluster] security {key} must be the path of a PEM file; got {_describe(value)}.")
    missing = [k for k in ("ca_file", "cert") if k not in table]
    if missing:
        problems.append(
            f"[cluster] security needs ca_file (the cluster's CA certificate) and cert (this client's certificate; "
            f"key: its private key, unless the cert file holds it); {' and '.join(missing)} missing."
        )
        return None
    return TlsFiles(**values, source=JOB_SOURCE) if values else None


def _index(table: dict | None, base: Path, problems: list[str]) -> IndexSection | None:
    if table is None:
        return None
    _unknown("index", table, SECTIONS["index"], problems)
    n_before = len(problems)
    values: dict[str, Any] = {}
    store = table.get("store")
    if not isinstance(store, str) or not store.strip():
        problems.append(f'[index] store is required: the index\'s path, e.g. "index.zarr"; got {_describe(store)}.')
    else:
        values["store"] = store if is_url(store) else str((base / store).resolve())
    choices = {
        "projection": ("sjlt", "gaussian", "orthogonal", "kronecker"),
        "dtype": ("float16", "float32", "float64"),
        "preconditioner": ("curvature", "fisher", "none"),
        "curvature": ("ggn", "hessian"),
    }
    for key, allowed in choices.items():
        if key in table:
            if table[key] in allowed:
                values[key] = table[key]
            else:
                problems.append(f"[index] {key} must be one of {', '.join(allowed)}; got {_describe(table[key])}.")
    for key in ("projection_dim", "seed"):
        if key in table:
            ok = _positive_int(table[key]) or (key == "seed" and type(table[key]) is int and table[key] == 0)
            if ok:
                values[key] = table[key]
            else:
                problems.append(f"[index] {key} must be a positive integer; got {_describe(table[key])}.")
    if "regularization" in table:
        lam = table["regularization"]
        if lam == "auto" or (type(lam) in (int, float) and lam >= 0):
            values["regularization"] = lam
        else:
            problems.append(f'[index] regularization must be a number >= 0 or "auto"; got {_describe(lam)}.')
    if "layers" in table:
        layers = table["layers"]
        if isinstance(layers, list) and all(isinstance(x, str) for x in layers):
            values["layers"] = tuple(layers)
        else:
            problems.append(f"[index] layers must be a list of module names; got {_describe(layers)}.")
    return IndexSection(**values) if len(problems) == n_before else None


def _evaluate(table: dict | None, base: Path, problems: list[str]) -> EvaluateSection | None:
    if table is None:
        return None
    table = _renamed_keys("evaluate", table, problems)
    _unknown("evaluate", table, SECTIONS["evaluate"], problems)
    n_before = len(problems)
    values: dict[str, Any] = {}
    retrain = table.get("retrain")
    if retrain is None:
        problems.append('[evaluate] retrain is required: the retraining function as "module:function".')
    elif not isinstance(retrain, str) or not _FACTORY.match(retrain.strip()):
        problems.append(
            f'[evaluate] retrain must be "module:function" (e.g. "retrain:train"); got {_describe(retrain)}.'
        )
    else:
        values["retrain"] = retrain.strip()
    options = table.get("options", {})
    if isinstance(options, Mapping):
        values["options"] = dict(options)
    else:
        problems.append(f"[evaluate] options must be a table of keyword arguments; got {_describe(options)}.")
    if "store" in table:
        store = table["store"]
        if not isinstance(store, str) or not store.strip():
            problems.append(f"[evaluate] store must be a path or URL; got {_describe(store)}.")
        else:
            store = store.strip()
            if not is_url(store):
                store = os.path.expanduser(store)
                store = store if os.path.isabs(store) else str(base / store)
            values["store"] = store
    methods = table.get("methods", ["lds"])
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods or not all(m in EVALUATE_METHODS for m in methods):
        problems.append(
            f"[evaluate] methods must be a list of {', '.join(repr(m) for m in EVALUATE_METHODS)}; "
            f"got {_describe(methods)}."
        )
    else:
        values["methods"] = tuple(dict.fromkeys(methods))
    for key, minimum in (("n_subsets", 2), ("seeds", 1), ("n_bootstrap", 1)):
        if key in table:
            value = table[key]
            if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
                values[key] = value
            else:
                problems.append(f"[evaluate] {key} must be an integer of at least {minimum}; got {_describe(value)}.")
    if "seed" in table:
        value = table["seed"]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            values["seed"] = value
        else:
            problems.append(f"[evaluate] seed must be a non-negative integer; got {_describe(value)}.")
    for key, example in (("fraction", "0.5"), ("confidence", "0.95")):
        if key in table:
            value = table[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
                values[key] = float(value)
            else:
                problems.append(
                    f"[evaluate] {key} must be a number between 0 and 1 (e.g. {example}); got {_describe(value)}."
                )
    if "points" in table:
        value = table["points"]
        if _positive_int(value):
            values["points"] = value
        elif _index_list(value):
            values["points"] = tuple(value)
        else:
            problems.append(
                "[evaluate] points must be a number of random training points or a list of training "
                f"indices; got {_describe(value)}."
            )
    if "warm_start" in table:
        if isinstance(table["warm_start"], bool):
            values["warm_start"] = table["warm_start"]
        else:
            problems.append(f"[evaluate] warm_start must be true or false; got {_describe(table['warm_start'])}.")
    if "corrupted" in table:
        if _index_list(table["corrupted"]):
            values["corrupted"] = tuple(table["corrupted"])
        else:
            problems.append(
                f"[evaluate] corrupted must be a list of training indices; got {_describe(table['corrupted'])}."
            )
    if "mislabel" in values.get("methods", ()) and not values.get("corrupted"):
        problems.append('[evaluate] methods = ["mislabel"] needs corrupted = [...] (the corrupted training indices).')
    if len(problems) != n_before:
        return None
    return EvaluateSection(**values)


def _renamed_keys(section: str, table: dict, problems: list[str]) -> dict:
    """``table`` with the old spellings of :data:`RENAMED_KEYS` renamed, each with a ``RenamedWarning``;
    a table with both spellings of a key is a problem."""
    renames = {old: new for old, new in RENAMED_KEYS.get(section, {}).items() if old in table}
    if not renames:
        return table
    import warnings

    from .errors import RenamedWarning

    table = dict(table)
    for old, new in renames.items():
        if new in table:
            problems.append(f"[{section}] pass {new} only ({old} is its old spelling).")
            table.pop(old)
            continue
        table[new] = table.pop(old)
        warnings.warn(
            f"[{section}] {old} is now spelled {new}; the old spelling still works in this release and will be "
            "removed in the next.",
            RenamedWarning,
            stacklevel=2,
        )
    return table


def _index_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _memory_limit_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return True
        from dask.utils import parse_bytes

        try:
            return parse_bytes(value) > 0
        except (ValueError, TypeError):
            return False
    return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _unknown(section: str, table: Mapping, valid: Sequence[str], problems: list[str]) -> None:
    for key in table:
        if key not in valid:
            problems.append(f"[{section}] unknown key {key!r}{_suggest(key, valid)}")


def _suggest(key: str, valid: Any, *, brackets: bool = False, what: str | None = None) -> str:
    """``"; did you mean 'x'?"`` for the closest valid key, else the list of valid keys."""
    valid = list(valid)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean [{close[0]}]?" if brackets else f"; did you mean {close[0]!r}?"
    listed = ", ".join(f"[{v}]" if brackets else v for v in valid)
    return f"; valid {what or ('sections' if brackets else 'keys')}: {listed}."


def _describe(value: Any) -> str:
    """A TOML value as a message shows it: ``'big'``, ``-3``, ``a table``, ``a list``."""
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list) and len(repr(value)) > 40:
        return "a list"
    return repr(value)


# -- the factory -----------------------------------------------------------------------------


@dataclass
class Problem:
    """What the factory returned: the model, the loss (or the ``[task]``'s Task) and the two
    map-style datasets."""

    model: Any
    loss: Any
    train: Any
    test: Any


def load_factory(job: Job, factory: str | None = None, section_name: str = "model") -> Callable[..., Any]:
    """Import the ``[model] factory`` function (or another ``"module:function"``), with
    ``[model] path`` in front of ``sys.path``."""
    paths = job.model.path
    factory = factory or job.model.factory
    module_name, function = factory.split(":", 1)
    for directory in reversed(paths):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    _forget_shadowed(module_name, paths)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if _module_found(module_name, exc):  # the module is there: its own imports failed
            missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
            fix = (
                f"install {missing!r} in this environment (and on the workers)"
                if missing
                else "fix that import or install what it needs (here and on the workers)"
            )
            raise JobFileError(
                f"[{section_name}] factory {factory!r}: importing module {module_name!r} "
                f"({_origin(module_name)}) failed: {type(exc).__name__}: {' '.join(str(exc).split())}; {fix}.",
                path=_path(job),
            ) from exc
        searched = ", ".join(paths) or "sys.path"
        raise JobFileError(
            f"[{section_name}] factory {factory!r}: cannot import module {module_name!r} "
            f"({exc}); searched {searched}. Set [model] path to the directory that holds it.",
            path=_path(job),
        ) from None
    except Exception as exc:  # noqa: BLE001 - the module's own code failed while importing
        raise JobFileError(
            f"[{section_name}] factory {factory!r}: importing module {module_name!r} ({_origin(module_name)}) "
            f"raised {type(exc).__name__}: {' '.join(str(exc).split())}; fix the module (--traceback shows "
            "where).",
            path=_path(job),
        ) from exc
    target: Any = module
    for part in function.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise JobFileError(
                f"[{section_name}] factory {factory!r}: module {module_name!r} has no "
                f"{function!r}{_suggest(function, names, what='functions')}",
                path=_path(job),
            )
        target = getattr(target, part)
    if not callable(target):
        raise JobFileError(
            f"[{section_name}] factory {factory!r} is a {type(target).__name__}, not a function.", path=_path(job)
        )
    return target


def _module_found(module_name: str, exc: ImportError) -> bool:
    """Whether ``exc``, raised importing ``module_name``, comes from inside the module (a
    dependency it imports is missing or broken) rather than from not finding it."""
    missing = getattr(exc, "name", None)
    if isinstance(exc, ModuleNotFoundError) and missing is not None:
        # not found: the module itself or one of its parent packages
        return not (module_name == missing or module_name.startswith(missing + "."))
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def _origin(module_name: str) -> str:
    """Where a module that failed while importing lives (its file), for messages."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    return (spec.origin if spec is not None and spec.origin else "found on the path") or module_name


def load_task(job: Job) -> Any:
    """The :class:`~dask_influence.Task` of the ``[task]`` section (``None`` without one).

    Raises:
        JobFileError: the task function rejects its options, or the factory does not
            return a Task.
    """
    from . import tasks
    from .core.task import Task

    section = job.task
    if section is None:
        return None
    if section.name is not None:
        fn: Callable[..., Any] = getattr(tasks, section.name)
        where = f"[task] name {section.name!r}"
    else:
        assert section.factory is not None  # one of the two (checked when parsing)
        fn = load_factory(job, section.factory, "task")
        where = f"[task] factory {section.factory!r}"
    try:
        task = fn(**section.options)
    except TypeError as exc:
        raise JobFileError(f"{where} does not take options {section.options}: {exc}", path=_path(job)) from None
    if not isinstance(task, Task):
        raise JobFileError(f"{where} returned a {type(task).__name__}; return a dask_influence.Task.", path=_path(job))
    return task


def _forget_shadowed(module: str, paths: Sequence[str]) -> None:
    """Drop an imported module of the same name that does not come from the job's ``paths``.

    Two jobs in one process may both have a ``factory.py`` in different directories; the
    second must not get the first one's module from ``sys.modules``.
    """
    from importlib.machinery import PathFinder

    top = module.split(".", 1)[0]
    cached = sys.modules.get(top)
    if cached is None or not paths:
        return
    spec = PathFinder.find_spec(top, list(paths))
    if spec is None or spec.origin is None:
        return
    if os.path.realpath(getattr(cached, "__file__", "") or "") != os.path.realpath(spec.origin):
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def load_problem(job: Job) -> Problem:
    """Call the factory and check what it returns.

    The factory returns a dict (or an object with attributes) with ``model`` (an
    ``nn.Module``), ``loss`` (``loss(outputs, targets)``), ``train`` and ``test`` (map-style
    datasets of ``(x, y)`` pairs); other entries are ignored. With a ``[task]`` section the
    loss is the task (a ``loss`` the factory returns is not used) and the datasets' items may
    be of any structure (dicts, as Hugging Face datasets give them).

    Raises:
        JobFileError: the factory cannot be imported or returns something else.
    """
    import torch
    from torch.utils.data import IterableDataset

    factory = load_factory(job)
    result = factory(**job.model.options)
    name = job.model.factory
    parts: dict[str, Any] = {}
    missing = []
    task = load_task(job)
    for key in ("model", "loss", "train", "test"):
        if key == "loss" and task is not None:
            parts[key] = task
            continue
        if isinstance(result, Mapping):
            present = key in result
            value = result.get(key)
        else:
            present = hasattr(result, key)
            value = getattr(result, key, None)
        if not present:
            missing.append(key)
        parts[key] = value
    if task is None and "train" not in missing:
        keys = _dict_item_keys(parts["train"])
        if keys is not None:  # a Hugging Face style dataset: a loss(outputs, targets) cannot take it
            raise JobFileError(
                f"the factory {name!r} returned train items that are dicts (keys {keys}) and the job has no "
                '[task] section; add one to score them, e.g. [task] name = "classification" (cross-entropy on '
                'model(**inputs).logits, labels under "labels"; or "causal_lm", "regression"; see docs/tasks.md).',
                path=_path(job),
            )
    if missing:
        raise JobFileError(
            f"the factory {name!r} returned a {type(result).__name__} without "
            f"{', '.join(missing)}; return a dict with model, {'' if task is not None else 'loss, '}train and test.",
            path=_path(job),
        )
    problems = []
    if not isinstance(parts["model"], torch.nn.Module):
        problems.append(
            f"the factory {name!r} returned a model of type {type(parts['model']).__name__}; return a torch.nn.Module."
        )
    if task is None and not callable(parts["loss"]):
        problems.append(
            f"the factory {name!r} returned a loss of type {type(parts['loss']).__name__}; "
            "return a callable loss(outputs, targets), e.g. torch.nn.CrossEntropyLoss()."
        )
    for key in ("train", "test"):
        data = parts[key]
        if (
            isinstance(data, IterableDataset)
            or not (hasattr(data, "__len__") and hasattr(data, "__getitem__"))
            or isinstance(data, (str, bytes, Mapping))
        ):
            problems.append(
                f"the factory {name!r} returned {key} of type {type(data).__name__}; return a "
                "map-style torch Dataset of (x, y) pairs, e.g. TensorDataset(x, y)"
                + (" (or, with [task], of dicts)." if task is not None else ".")
            )
    if problems:
        raise JobFileError(problems, path=_path(job))
    return Problem(**parts)


def _dict_item_keys(data: Any) -> str | None:
    """The keys of a dataset's first item when it is a dict (``None`` otherwise, or when it cannot
    be read here: the checks of the data then say what is wrong)."""
    try:
        item = data[0] if hasattr(data, "__getitem__") and len(data) else None
    except Exception:  # noqa: BLE001 - a dataset that fails here fails later with its own error
        return None
    return ", ".join(map(str, item)) if isinstance(item, Mapping) else None


def make_solver(job: Job, model: Any, loss: Any) -> Any:
    """The (unfitted) solver of ``[solver]`` for ``model`` and ``loss`` (a loss or a Task)."""
    section = job.need_solver()
    return section.solver_class(model, loss, **section.params)


def _path(job: Job) -> str | None:
    return None if job.path is None else str(job.path)
