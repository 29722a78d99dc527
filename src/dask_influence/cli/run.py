"""``dask-influence run JOB.toml``: compute a job's influence matrix into its zarr store.

Steps: read and validate the job file, call its factory (model, loss, train and test
datasets), fit the solver on the train data (over its blocks on the cluster unless
``[solver] distributed_fit = false``; a matching saved fit next to the store is reused, and
a new one is saved there), compute the influences in blocks on Dask and write them to the
store, then check that the store is complete. The exit code is 0 only when it is.
``--fit-only`` stops after the fit. The work is :func:`dask_influence.job.run_job`; this module
parses the options, shows the job's log lines (:mod:`.output`) and prints the summary.

Where the blocks are computed, in this order: ``--scheduler``; ``[cluster] scheduler``;
``DASK_SCHEDULER_ADDRESS`` from the environment; ``[cluster] sequential = true`` (this
process); an embedded ``LocalCluster`` with ``[cluster] workers / threads / memory_limit``.
A ``tls://`` scheduler is reached with the certificates of ``--tls-ca-file/--tls-cert/--tls-key``,
else ``[cluster] security``, else Dask's ``distributed.comm.tls.*`` configuration
(:mod:`dask_influence.mapping.security`); a plain ``tcp://`` scheduler on another host gets
one warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..job.cluster import _CRITICAL_ONLY
from .cluster_options import tls_from_options
from .options import (
    JOB_ON_A_CLUSTER,
    OVERWRITE,
    RESUME,
    STORE_LOCK,
    TRACEBACK,
    quiet_option,
    refuse_resume_and_overwrite,
)
from .output import job_command, one_line, resume_hint, user_errors

__all__ = ["run", "one_line", "user_errors"]  # one_line, user_errors: report imports them from here


@click.command()
@JOB_ON_A_CLUSTER
@RESUME
@click.option(
    "--verify",
    "verify",
    is_flag=True,
    help="With --resume, read and decode every done flag and chunk before trusting them (about one "
    "read of the store); by default only the chunk files are listed (finds deleted chunks).",
)
@OVERWRITE
@STORE_LOCK
@click.option(
    "--wait-for-workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    metavar="N",
    help="With a scheduler: wait until N workers have joined before starting.",
)
@click.option(
    "--timeout",
    "workers_timeout",
    type=click.FloatRange(0),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="How long --wait-for-workers waits.",
)
@click.option(
    "--fit-only",
    is_flag=True,
    help="Fit the solver and save the fit (next to the store, or [solver] fit_file), then exit; "
    "later runs of the job reuse it.",
)
@click.option("--refit", is_flag=True, help="Fit again even if a saved fit exists, and replace it.")
@quiet_option()
@TRACEBACK
def run(
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
    wait_for_workers: int,
    workers_timeout: float,
    fit_only: bool,
    refit: bool,
    quiet: bool,
    traceback: bool,
) -> None:
    """Run the job in JOB.toml: fit its solver, write its influence matrix to zarr.

    Exits with 0 only when the store is complete; after an interruption, rerun with
    --resume to compute the missing chunks. See docs/cli.md for the job file.
    """
    refuse_resume_and_overwrite(resume, overwrite)
    if fit_only and (resume or overwrite or break_lock):
        raise click.UsageError("--fit-only writes no store; drop --resume, --overwrite and --break-lock.")
    from ..job.run import run_job

    if not traceback:  # the Dask client logs a lost scheduler with tracebacks; run says it in one line
        # a filter, not a level: distributed sets its loggers' levels when it is imported, which
        # a job in this process (sequential) never needs to do
        logging.getLogger("distributed.client").addFilter(_CRITICAL_ONLY)
    with job_command(quiet, traceback, resume_hint("run", job_file)):
        result = run_job(
            job_file,
            scheduler=scheduler,
            tls=tls_from_options(tls_ca_file, tls_cert, tls_key),
            resume=resume,
            overwrite=overwrite,
            progress=not quiet,
            break_lock=break_lock,
            fit_only=fit_only,
            refit=refit,
            verify=verify,
            wait_for_lock=wait_for_lock,
            wait_for_workers=wait_for_workers,
            workers_timeout=workers_timeout,
        )
    if not result.complete:
        raise click.ClickException(result.summary)
    if not quiet:
        click.echo(result.summary)
