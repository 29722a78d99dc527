"""The job file's former module: it now lives in the :mod:`dask_influence.job` package
(:mod:`~dask_influence.job.sections`, :mod:`~dask_influence.job.paths`,
:mod:`~dask_influence.job.validate`, :mod:`~dask_influence.job.factory`). This name re-exports its
public API so that ``from dask_influence.jobfile import load_job`` keeps working."""

from __future__ import annotations

from .job import (  # noqa: F401
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
    Problem,
    SolverSection,
    TaskSection,
    __all__,
    load_factory,
    load_job,
    load_problem,
    load_task,
    make_solver,
    parse_job,
    resolve_path,
    solver_parameters,
)
