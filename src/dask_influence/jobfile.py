"""The job file's former module: it now lives in the :mod:`dask_influence.job` package
(:mod:`~dask_influence.job.sections`, :mod:`~dask_influence.job.paths`,
:mod:`~dask_influence.job.validate`, :mod:`~dask_influence.job.factory`). This name re-exports its
public API so that ``from dask_influence.jobfile import load_job`` keeps working."""

from __future__ import annotations

from .job import *  # noqa: F403  (the names of job.__all__, each imported on first use there)
from .job import __all__  # noqa: F401
