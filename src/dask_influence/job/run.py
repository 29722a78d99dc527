"""Run a job: fit its solver and write its influence matrix to its zarr store (``dask-influence
run``, or :func:`run_job` from Python).

Steps: read and validate the job (a file, a dict of its sections, or a :class:`~.sections.Job`),
call its factory (model, loss, train and test datasets), fit the solver on the train data (over
its blocks on the cluster unless ``[solver] distributed_fit = false``; a matching saved fit next
to the store is reused, and a new one is saved there), compute the influences in blocks and write
them to the store, then check that the store is complete. Where the blocks are computed:
:mod:`.cluster`.

Nothing here prints: what the job does is logged to ``dask_influence.job.run`` (INFO; the
unencrypted-scheduler warning at WARNING), the passes and chunks to ``dask_influence.progress``;
the command line shows both (``dask_influence.cli.output``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import StoreError
from .cluster import job_client, job_model
from .sections import Job

log = logging.getLogger(__name__)

JobSource: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any] | Job"
"""What the runners take: a job file's path, its parsed sections (a dict, as ``tomllib`` reads
the file), or a validated :class:`~.sections.Job`."""


@dataclass(frozen=True)
class RunResult:
    """What :func:`run_job` did.

    Attributes:
        complete: the store is complete (always true for ``fit_only``).
        summary: one line saying what was done (the command prints it), or, when the store is
            incomplete, what is missing and how to complete it.
        store: the ``[output] store`` (an absolute path or a URL).
        fit_file: where the fit was saved (or found).
        chunks: ``{array: (done, total)}`` of the store at the end (empty for ``fit_only``).
    """

    complete: bool
    summary: str
    store: str
    fit_file: str
    chunks: dict[str, tuple[int, int]]


def open_job(source: JobSource, base_dir: str | os.PathLike[str] | None = None) -> tuple[Job, str]:
    """The validated job of ``source`` (see :data:`JobSource`) and the name messages give it (the
    path as given, else the job's file, else ``"(dict)"``). ``base_dir``: what a dict's relative
    paths are relative to (default: the current directory).

    Raises:
        JobFileError: the job breaks the schema (every problem, one per line).
    """
    from .validate import load_job, parse_job

    if isinstance(source, Job):
        return source, str(source.path) if source.path is not None else "(dict)"
    if isinstance(source, Mapping):
        return parse_job(source, base_dir=base_dir), "(dict)"
    return load_job(source), str(source)


def run_job(
    job: JobSource,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    tls: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    break_lock: bool = False,
    fit_only: bool = False,
    refit: bool = False,
    verify: bool = False,
    wait_for_lock: float = 0.0,
    wait_for_workers: int = 1,
    workers_timeout: float = 300.0,
    progress: bool = True,
) -> RunResult:
    """Run a job from Python as ``dask-influence run`` does; errors propagate.

    Example::

        from dask_influence.job import run_job

        result = run_job("examples/batch_job/job.toml", overwrite=True)
        result.complete, result.store    # True, '/.../influences.zarr'

    Args:
        job: a job file's path, its sections as a dict (``{"model": {...}, "solver": {...},
            "output": {...}}``, relative paths against ``base_dir``), or a loaded
            :class:`~dask_influence.job.Job`.
        base_dir: for a dict, the directory its relative paths are relative to (default: the
            current directory).
        scheduler: a Dask scheduler's address; wins over ``[cluster]`` (see :mod:`.cluster`).
        tls: certificates for a ``tls://`` scheduler
            (:class:`~dask_influence.mapping.security.TlsFiles`) winning over ``[cluster] security``.
        resume: complete an existing store of the same job (only its missing chunks);
            ``overwrite``: replace it. An existing local store needs one of the two.
        break_lock: take the store's lock even if another job seems to hold it;
            ``wait_for_lock``: seconds to wait for a live job's lock.
        fit_only: fit (or find the saved fit), save it and stop.
        refit: fit even if a saved fit exists; with ``resume``, chunks of earlier fits are
            recomputed.
        verify: with ``resume``, read and decode every done flag and chunk before trusting them
            (else the chunk files are only listed), and check the training data against a
            saved fit.
        wait_for_workers, workers_timeout: with a scheduler, wait up to ``workers_timeout``
            seconds for that many workers.
        progress: report every pass and the chunks where the library reports
            (:mod:`dask_influence.progress`: a terminal, a notebook, INFO logging); ``False``: silent.

    Returns:
        A :class:`RunResult`. An incomplete store is not an error: ``complete`` is false and
        ``summary`` says how to complete it.

    Raises:
        JobFileError: the job breaks the schema or its factory cannot be imported or called.
        StoreError: the store exists (without ``resume``/``overwrite``), is locked, or cannot
            be written.
    """
    from torch.utils.data import DataLoader

    from ..storage.store import is_complete, load_state
    from .factory import load_problem, make_solver

    start = time.perf_counter()
    loaded, name = open_job(job, base_dir)
    if not fit_only:
        check_store_early(
            loaded.output.store, resume=resume, overwrite=overwrite, break_lock=break_lock, wait=wait_for_lock
        )
    section = loaded.need_solver()
    log.info(f"Job {name}: {section.class_name} ({section.method}), store {loaded.output.store}")
    problem = load_problem(loaded)
    model = job_model(loaded, problem)
    solver = make_solver(loaded, model, problem.loss)
    train = DataLoader(problem.train, batch_size=loaded.blocks.train, shuffle=False)
    test = DataLoader(problem.test, batch_size=loaded.blocks.test, shuffle=False)
    n_train, n_test = len(problem.train), len(problem.test)
    distributed = section.distributed_fit
    if distributed is None:  # default: over the blocks on the cluster, when there is one
        distributed = bool(scheduler or loaded.cluster.scheduler) or not loaded.cluster.sequential
    store = loaded.output.store

    with ExitStack() as stack:
        calc, where = (
            (None, "")
            if fit_only and not distributed
            else _calculator(
                loaded,
                solver,
                scheduler,
                stack,
                wait_for_workers=wait_for_workers,
                timeout=workers_timeout,
                tls=tls,
                progress=progress,
            )
        )
        fit_path = fit(
            loaded,
            solver,
            train,
            calc if distributed else None,
            where,
            refit=refit,
            progress=progress,
            verify_data=verify or not resume,  # a resume reuses its fit without a pass over the data
        )
        if fit_only:
            summary = f"Fitted: {fit_path} in {time.perf_counter() - start:.1f} s; runs of this job reuse it."
            return RunResult(True, summary, store, fit_path, {})
        assert calc is not None  # _calculator() made one: influences are computed
        log.info(
            f"Computing influences of {n_train:,} training points on {n_test:,} test points "
            f"(blocks of {loaded.blocks.test:,} x {loaded.blocks.train:,}) {where}..."
        )
        calc.influences_to_zarr(
            test,
            train,
            store,
            mode=loaded.output.mode,
            resume=resume,
            overwrite=overwrite,
            top_k=loaded.output.top_k,
            self_influences=loaded.output.self_influences,
            break_lock=break_lock,
            wait_for_lock=wait_for_lock,
            verify="full" if verify else "exists",
            refit=refit,
        )
    run_info = calc.last_run_
    if run_info.get("lock_broken"):
        log.info(f"Removed the lock of {store} held by {run_info['lock_broken']}.")
    import zarr

    group = zarr.open_group(store, mode="r")
    done = run_info.get("completion_counts") or load_state(group).counts()  # the job's own counts at its end
    chunks_done, chunks_total = done.get("influences", (0, 0))
    if is_complete(group):  # the store's own say (one listing of the flags)
        computed = run_info.get("chunks_computed", 0)
        skipped = run_info.get("chunks_skipped", 0)
        repaired = run_info.get("chunks_repaired", 0)
        repaired_text = f" ({repaired} damaged, recomputed)" if repaired else ""
        if run_info.get("new_fit"):
            repaired_text += f" (new fit, generation {run_info['fit_generation']}: chunks of earlier fits recomputed)"
        summary = (
            f"Complete: {store} ({chunks_done}/{chunks_total} chunks; {computed} computed"
            f"{repaired_text}, {skipped} already done) in {time.perf_counter() - start:.1f} s."
        )
        return RunResult(True, summary, store, fit_path, dict(done))
    missing = ", ".join(f"{kind} {d}/{t}" for kind, (d, t) in done.items())
    summary = f"The store {store} is incomplete ({missing} done); rerun with --resume to compute the missing chunks."
    return RunResult(False, summary, store, fit_path, dict(done))


def fit(
    job: Job,
    solver: Any,
    train: Any,
    calc: Any,
    where: str,
    *,
    refit: bool,
    progress: bool = True,
    verify_data: bool = True,
) -> str:
    """Fit the solver over the train blocks with ``calc`` (``None``: in this process), or reuse
    the saved fit; save it. Returns the fit file.

    ``verify_data=False`` (a resume without verification): a saved fit is reused without
    reading the training data (its model weights, solver and the data's size, blocks and
    feature shape are checked, not its contents; see ``calc.fit``)."""
    import dask_influence as di

    from ..mapping.fitting import fit_path_for

    path = job.need_solver().fit_file or fit_path_for(job.output.store)
    fitter = calc if calc is not None else di.SequentialInfluenceCalculator(solver, progress=progress)
    place = f"over its blocks {where}" if calc is not None else "in this process"
    log.info(
        f"Fitting {type(solver).__name__} ({solver.num_params:,} parameters) on {len(train.dataset):,} "
        f"training points in blocks of {job.blocks.train:,} {place}..."
    )
    fitter.fit(train, path=path, refit=refit, verify_data=verify_data)
    info = fitter.last_fit_
    if info["reused"]:
        checked = (
            "training data"
            if info.get("data_checked", True)
            else "size and blocks of the training data; --verify also checks its contents"
        )
        log.info(f"Reusing the saved fit {path} (same solver, model weights and {checked}).")
    else:
        log.info(
            f"Fitted in {info['seconds']:.1f} s ({info['sweeps']} passes over {info['blocks']} blocks); "
            f"saved to {path}."
        )
    return path


def check_store_early(
    store: str, *, resume: bool, overwrite: bool, break_lock: bool = False, wait: float = 0.0
) -> None:
    """Refuse an unusable store before the (possibly long) fit; the library checks again.

    Raises:
        StoreError: a path that is a file or cannot be written, a store locked by a live job
            (after waiting ``wait`` seconds), or an existing local store without ``resume`` or
            ``overwrite``.
    """
    from ..storage.lock import check_lock
    from ..storage.store import check_path
    from ..storage.urls import is_url

    check_path(store)
    check_lock(store, break_lock=break_lock, wait_seconds=wait)
    if resume or overwrite or is_url(store):
        return
    if os.path.isdir(store) and os.listdir(store):
        raise StoreError(
            f"The output store {store!r} already exists; pass resume=True to complete it or overwrite=True "
            "to replace it."
        )


def _calculator(
    job: Job,
    solver: Any,
    scheduler: str | None,
    stack: ExitStack,
    *,
    wait_for_workers: int = 1,
    timeout: float = 300.0,
    tls: Any = None,
    progress: bool = True,
) -> tuple[Any, str]:
    """The calculator and where it computes, per :mod:`.cluster`'s resolution order."""
    import dask_influence as di

    client, where = job_client(
        job,
        scheduler,
        stack,
        say=log.info,
        warn=log.warning,
        wait_for_workers=wait_for_workers,
        timeout=timeout,
        gpu=solver.device.type == "cuda",
        tls=tls,
    )
    if client is None:
        return di.SequentialInfluenceCalculator(solver, progress=progress), where
    return di.DaskInfluenceCalculator(solver, client, progress=progress), where
