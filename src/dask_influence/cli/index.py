"""``dask-influence index`` and ``dask-influence query``: a gradient index from a job file.

``index JOB.toml`` projects every training point's gradient into the ``[index] store``
(resuming an interrupted build by default); ``query JOB.toml`` scores the job's test set
against it and writes the ``[output] store`` (with ``top_k`` and ``self_influences`` as
``[output]`` says), which ``inspect``, ``top``, ``rank`` and ``plot`` read like any store. The
cluster is chosen as for ``run`` (``--scheduler``, ``[cluster]``, ``$DASK_SCHEDULER_ADDRESS``,
else an embedded ``LocalCluster``).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from ..job.cluster import job_client, job_model
from .cluster_options import tls_from_options, tls_options
from .options import JOB_ARGUMENT, SCHEDULER, TRACEBACK, WAIT_FOR_LOCK
from .run import (
    _check_store_early,
    _progress_lines,
    _say,
    _warn,
    interrupts_say_how_to_resume,
    progress_bar,
    user_errors,
)

_QUIET = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")


def _wait_for_lock(store: str, seconds: float, break_lock: bool) -> None:
    """Wait up to ``seconds`` for a live job's lock of ``store`` (the library then takes it, or
    removes it with ``break_lock``, which waits for nothing)."""
    from ..storage.lock import await_lock

    if not break_lock:
        await_lock(store, wait_seconds=seconds)


def _problem(job_file: Path, quiet: bool, before: Any = None) -> tuple[Any, Any, Any]:
    """The job, its model (on CUDA with ``[cluster] gpu``) and the factory's result;
    ``before(job)`` runs before the factory is called (checks of the stores)."""
    from ..errors import JobFileError
    from ..jobfile import load_job, load_problem

    _progress_lines(quiet)
    job = load_job(job_file)
    if job.index is None:
        raise JobFileError(
            '[index] section is missing; it names the index: [index] store = "index.zarr" '
            "(and projection_dim, projection, preconditioner: see docs/gradient-index.md).",
            path=str(job_file),
        )
    if before is not None:
        before(job)
    problem = load_problem(job)
    return job, job_model(job, problem), problem


@click.command(name="index")
@JOB_ARGUMENT
@SCHEDULER
@tls_options
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Complete an existing index built the same way (only its missing blocks).",
)
@click.option(
    "--verify",
    is_flag=True,
    help="When resuming, read and decode every written block (checksums) before trusting it, and "
    "recompute damaged ones; by default only the chunk files are listed (finds deleted blocks).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing index (after projecting a first batch).")
@click.option("--break-lock", is_flag=True, help="Take the index's lock even while another job holds it.")
@WAIT_FOR_LOCK
@_QUIET
@TRACEBACK
def index(
    job_file: Path,
    scheduler: str | None,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    resume: bool,
    verify: bool,
    overwrite: bool,
    break_lock: bool,
    wait_for_lock: float,
    quiet: bool,
    traceback: bool,
) -> None:
    """Build the gradient index of JOB.toml's [index] section from its training data.

    SIGTERM and Ctrl-C end it with one line saying how to resume (exit code 130), the index's
    lock released; every block written so far is kept."""
    from torch.utils.data import DataLoader

    import dask_influence as di

    hint = (
        "The index keeps every block written so far: rerun "
        f"(dask-influence index {job_file}; it resumes by default) to compute only the missing ones."
    )
    with interrupts_say_how_to_resume(hint), user_errors(traceback):
        start = time.perf_counter()
        job, model, problem = _problem(
            job_file, quiet, lambda job: _wait_for_lock(job.index.store, wait_for_lock, break_lock)
        )
        section = job.index
        assert section is not None
        with ExitStack() as stack:
            tls = tls_from_options(tls_ca_file, tls_cert, tls_key)
            client, where = job_client(
                job, scheduler, stack, say=lambda m: _say(quiet, m), warn=_warn, gpu=job.cluster.gpu, tls=tls
            )
            _say(
                quiet,
                f"Indexing {len(problem.train):,} training points (k = {section.projection_dim}, "
                f"{section.projection}, {section.preconditioner}) into {section.store} {where}...",
            )
            with progress_bar(not quiet):
                built = di.GradientIndex.build(
                    model,
                    problem.loss,
                    DataLoader(problem.train, batch_size=job.blocks.train, shuffle=False),
                    section.store,
                    resume=resume,
                    overwrite=overwrite,
                    verify="full" if verify else "exists",
                    break_lock=break_lock,
                    client="sync" if client is None else client,
                    **section.build_options(),
                )
        run = built.last_run_
        if not quiet:
            repaired = f", {run['blocks_repaired']} of them repaired" if run.get("blocks_repaired") else ""
            click.echo(
                f"Complete: {section.store} ({built.n_train:,} points x {built.dim} dimensions, "
                f"{built.attributes['dtype']}; {run['blocks_written']} blocks written{repaired}, "
                f"{run['blocks_skipped']} already done) in {time.perf_counter() - start:.1f} s."
            )


@click.command(name="query")
@JOB_ARGUMENT
@SCHEDULER
@tls_options
@click.option("--resume", is_flag=True, help="Complete an existing output store of the same query.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output store.")
@click.option("--regularization", type=float, default=None, help="Lambda for this query (default: the index's).")
@click.option("--break-lock", is_flag=True, help="Take the store's lock even while another job holds it.")
@WAIT_FOR_LOCK
@_QUIET
@TRACEBACK
def query(
    job_file: Path,
    scheduler: str | None,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    resume: bool,
    overwrite: bool,
    regularization: float | None,
    break_lock: bool,
    wait_for_lock: float,
    quiet: bool,
    traceback: bool,
) -> None:
    """Score JOB.toml's test set against its [index] and write the [output] store.

    An existing [output] store without --resume or --overwrite is refused before the factory
    runs and the cluster starts. SIGTERM and Ctrl-C end it with one line saying how to resume
    (exit code 130), the store's lock released."""
    from torch.utils.data import DataLoader

    import dask_influence as di

    if resume and overwrite:
        raise click.UsageError("Pass --resume or --overwrite, not both.")

    def check_store(job: Any) -> None:
        if job.output.mode != "up":
            raise ValueError("[output] mode must be 'up' for a query: an index holds gradients, not their derivatives.")
        _check_store_early(
            job.output.store, resume=resume, overwrite=overwrite, break_lock=break_lock, wait=wait_for_lock
        )
        _wait_for_lock(job.output.store, wait_for_lock, break_lock)

    hint = (
        "The store keeps every chunk written so far: rerun with --resume "
        f"(dask-influence query {job_file} --resume) to compute only the missing ones."
    )
    with interrupts_say_how_to_resume(hint), user_errors(traceback):
        start = time.perf_counter()
        job, model, problem = _problem(job_file, quiet, check_store)
        section = job.index
        assert section is not None
        if job.output.mode != "up":
            raise ValueError("[output] mode must be 'up' for a query: an index holds gradients, not their derivatives.")
        with ExitStack() as stack:
            tls = tls_from_options(tls_ca_file, tls_cert, tls_key)
            client, where = job_client(
                job, scheduler, stack, say=lambda m: _say(quiet, m), warn=_warn, gpu=job.cluster.gpu, tls=tls
            )
            opened = di.GradientIndex.open(
                section.store, model, problem.loss, client="sync" if client is None else client
            )
            _say(
                quiet,
                f"Scoring {len(problem.test):,} test points against {section.store} "
                f"({opened.n_train:,} points) {where}...",
            )
            with progress_bar(not quiet):
                opened.influences_to_zarr(
                    DataLoader(problem.test, batch_size=job.blocks.test, shuffle=False),
                    job.output.store,
                    top_k=job.output.top_k,
                    self_influences=job.output.self_influences,
                    resume=resume,
                    overwrite=overwrite,
                    regularization=regularization,
                    break_lock=break_lock,
                )
        if not quiet:
            run = opened.last_run_
            click.echo(
                f"Complete: {job.output.store} ({run.get('chunks_computed', 0)}/{run.get('chunks_total', 0)} chunks "
                f"computed) in {time.perf_counter() - start:.1f} s."
            )
