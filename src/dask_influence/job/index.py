"""A job's gradient index: build its ``[index]`` (``dask-influence index``, :func:`index_job`) and
score its test set against it into the ``[output] store`` (``dask-influence query``,
:func:`query_job`).

The cluster is chosen as for a run (:mod:`.cluster`). Nothing here prints: the notes go to the
``dask_influence.job.index`` logger, the passes and chunks to ``dask_influence.progress``.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from typing import Any

from ..errors import JobFileError
from .cluster import job_client, job_model
from .run import JobSource, check_store_early, open_job
from .sections import Job

log = logging.getLogger(__name__)


def _wait_for_lock(store: str, seconds: float, break_lock: bool) -> None:
    """Wait up to ``seconds`` for a live job's lock of ``store`` (the library then takes it, or
    removes it with ``break_lock``, which waits for nothing)."""
    from ..storage.lock import await_lock

    if not break_lock:
        await_lock(store, wait_seconds=seconds)


def _index_job(source: JobSource, base_dir: str | os.PathLike[str] | None) -> Job:
    """The job, which must have an ``[index]`` section."""
    job, name = open_job(source, base_dir)
    if job.index is None:
        raise JobFileError(
            '[index] section is missing; it names the index: [index] store = "index.zarr" '
            "(and projection_dim, projection, preconditioner: see docs/gradient-index.md).",
            path=None if name == "(dict)" else name,
        )
    return job


def index_job(
    job: JobSource,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    tls: Any = None,
    resume: bool = True,
    verify: bool = False,
    overwrite: bool = False,
    break_lock: bool = False,
    wait_for_lock: float = 0.0,
) -> tuple[Any, str]:
    """Build the job's ``[index]`` from its training data as ``dask-influence index`` does.

    Args:
        job, base_dir, scheduler, tls: as for :func:`~.run.run_job`.
        resume: complete an existing index built the same way (only its missing blocks).
        verify: when resuming, read and decode every written block before trusting it.
        overwrite: replace an existing index.
        break_lock, wait_for_lock: the index's lock, as for :func:`~.run.run_job`.

    Returns:
        The :class:`~dask_influence.GradientIndex` and a one-line summary (``Complete: ...``).
    """
    from torch.utils.data import DataLoader

    import dask_influence as di

    from .factory import load_problem

    start = time.perf_counter()
    loaded = _index_job(job, base_dir)
    section = loaded.index
    assert section is not None
    _wait_for_lock(section.store, wait_for_lock, break_lock)
    problem = load_problem(loaded)
    model = job_model(loaded, problem)
    with ExitStack() as stack:
        client, where = job_client(
            loaded, scheduler, stack, say=log.info, warn=log.warning, gpu=loaded.cluster.gpu, tls=tls
        )
        log.info(
            f"Indexing {len(problem.train):,} training points (k = {section.projection_dim}, "
            f"{section.projection}, {section.preconditioner}) into {section.store} {where}..."
        )
        built = di.GradientIndex.build(
            model,
            problem.loss,
            DataLoader(problem.train, batch_size=loaded.blocks.train, shuffle=False),
            section.store,
            resume=resume,
            overwrite=overwrite,
            verify="full" if verify else "exists",
            break_lock=break_lock,
            client="sync" if client is None else client,
            **section.build_options(),
        )
    run = built.last_run_
    repaired = f", {run['blocks_repaired']} of them repaired" if run.get("blocks_repaired") else ""
    summary = (
        f"Complete: {section.store} ({built.n_train:,} points x {built.dim} dimensions, "
        f"{built.attributes['dtype']}; {run['blocks_written']} blocks written{repaired}, "
        f"{run['blocks_skipped']} already done) in {time.perf_counter() - start:.1f} s."
    )
    return built, summary


def query_job(
    job: JobSource,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    tls: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    regularization: float | None = None,
    break_lock: bool = False,
    wait_for_lock: float = 0.0,
) -> str:
    """Score the job's test set against its ``[index]`` and write the ``[output] store``, as
    ``dask-influence query`` does. An existing store without ``resume`` or ``overwrite`` is refused
    before the factory runs and the cluster starts.

    Args:
        job, base_dir, scheduler, tls, resume, overwrite, break_lock, wait_for_lock: as for
            :func:`~.run.run_job`.
        regularization: lambda for this query (``None``: the index's).

    Returns:
        A one-line summary (``Complete: ...``).
    """
    from torch.utils.data import DataLoader

    import dask_influence as di

    from .factory import load_problem

    start = time.perf_counter()
    loaded = _index_job(job, base_dir)
    section = loaded.index
    assert section is not None
    if loaded.output.mode != "up":
        raise ValueError("[output] mode must be 'up' for a query: an index holds gradients, not their derivatives.")
    check_store_early(
        loaded.output.store, resume=resume, overwrite=overwrite, break_lock=break_lock, wait=wait_for_lock
    )
    _wait_for_lock(loaded.output.store, wait_for_lock, break_lock)
    problem = load_problem(loaded)
    model = job_model(loaded, problem)
    with ExitStack() as stack:
        client, where = job_client(
            loaded, scheduler, stack, say=log.info, warn=log.warning, gpu=loaded.cluster.gpu, tls=tls
        )
        opened = di.GradientIndex.open(section.store, model, problem.loss, client="sync" if client is None else client)
        log.info(
            f"Scoring {len(problem.test):,} test points against {section.store} ({opened.n_train:,} points) {where}..."
        )
        opened.influences_to_zarr(
            DataLoader(problem.test, batch_size=loaded.blocks.test, shuffle=False),
            loaded.output.store,
            top_k=loaded.output.top_k,
            self_influences=loaded.output.self_influences,
            resume=resume,
            overwrite=overwrite,
            regularization=regularization,
            break_lock=break_lock,
        )
    run = opened.last_run_
    return (
        f"Complete: {loaded.output.store} ({run.get('chunks_computed', 0)}/{run.get('chunks_total', 0)} chunks "
        f"computed) in {time.perf_counter() - start:.1f} s."
    )
