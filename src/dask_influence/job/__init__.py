"""The job file of ``dask-influence run`` (and ``index``, ``query``, ``evaluate``): a TOML file,
its schema, its validation and the user's code it names.

The package: :mod:`.sections` (one frozen dataclass per section, :class:`Job`), :mod:`.paths`
(one rule for every path), :mod:`.validate` (:func:`load_job`, :func:`parse_job`: every
problem at once), :mod:`.factory` (:func:`load_problem`, :func:`load_task`,
:func:`make_solver`: importing the factory), :mod:`.cluster` (where a job computes: the
client of ``--scheduler`` or ``[cluster]``, TLS, the embedded ``LocalCluster``) and the runners
that the commands call: :func:`run_job` (:mod:`.run`: fit, then the influences into the store),
:func:`index_job` and :func:`query_job` (:mod:`.index`), :func:`evaluate_job`
(:mod:`.evaluate`). Each runs from Python as well, given a path, a dict of sections or a
:class:`Job`. Nothing here prints: notes go to the loggers under ``dask_influence.job``
(the commands show them), progress to ``dask_influence.progress``.

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
an unknown key, the closest valid one. The package never imports click or the CLI;
it imports the user's factory only when :func:`load_problem` (or a runner) is called.
``docs/cli.md`` documents every key.
"""

from __future__ import annotations

from importlib import import_module as _import_module
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from .evaluate import evaluate_job
    from .factory import Problem, load_factory, load_problem, load_task, make_solver
    from .index import index_job, query_job
    from .paths import resolve_path
    from .run import RunResult, run_job
    from .sections import (
        DEFAULT_BLOCK_SIZE,
        EVALUATE_METHODS,
        MODES,
        SECTIONS,
        SOLVER_METHODS,
        BlocksSection,
        ClusterSection,
        EvaluateSection,
        IndexSection,
        Job,
        ModelSection,
        OutputSection,
        SolverSection,
        TaskSection,
    )
    from .validate import load_job, parse_job, solver_parameters

# public name -> its module: imported on first use (PEP 562), so that importing a light module of
# this package (``job.cluster`` for the CLI's ``inspect``) does not import the solvers and torch
_WHERE = {
    **dict.fromkeys(("Problem", "load_factory", "load_problem", "load_task", "make_solver"), ".factory"),
    "resolve_path": ".paths",
    **dict.fromkeys(
        (
            "DEFAULT_BLOCK_SIZE",
            "EVALUATE_METHODS",
            "MODES",
            "SECTIONS",
            "SOLVER_METHODS",
            "BlocksSection",
            "ClusterSection",
            "EvaluateSection",
            "IndexSection",
            "Job",
            "ModelSection",
            "OutputSection",
            "SolverSection",
            "TaskSection",
        ),
        ".sections",
    ),
    **dict.fromkeys(("load_job", "parse_job", "solver_parameters"), ".validate"),
    **dict.fromkeys(("run_job", "RunResult"), ".run"),
    **dict.fromkeys(("index_job", "query_job"), ".index"),
    "evaluate_job": ".evaluate",
}


def __getattr__(name: str) -> _Any:
    """Import a public name on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


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
    "SECTIONS",
    "MODES",
    "EVALUATE_METHODS",
    "DEFAULT_BLOCK_SIZE",
    "load_job",
    "parse_job",
    "solver_parameters",
    "resolve_path",
    "load_factory",
    "load_problem",
    "load_task",
    "make_solver",
    "run_job",
    "RunResult",
    "index_job",
    "query_job",
    "evaluate_job",
]
