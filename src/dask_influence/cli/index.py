"""``dask-influence index`` and ``dask-influence query``: a gradient index from a job file.

``index JOB.toml`` projects every training point's gradient into the ``[index] store``
(resuming an interrupted build by default); ``query JOB.toml`` scores the job's test set
against it and writes the ``[output] store`` (with ``top_k`` and ``self_influences`` as
``[output]`` says), which ``inspect``, ``top``, ``rank`` and ``plot`` read like any store. The
cluster is chosen as for ``run`` (``--scheduler``, ``[cluster]``, ``$DASK_SCHEDULER_ADDRESS``,
else an embedded ``LocalCluster``). The work is :func:`dask_influence.job.index.index_job` and
:func:`~dask_influence.job.index.query_job`; this module parses the options and prints.
"""

from __future__ import annotations

from pathlib import Path

import click

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
from .output import job_command, resume_hint


@click.command(name="index")
@JOB_ON_A_CLUSTER
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
@STORE_LOCK
@quiet_option()
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
    from ..job.index import index_job

    hint = (
        "The index keeps every block written so far: rerun "
        f"(dask-influence index {job_file}; it resumes by default) to compute only the missing ones."
    )
    with job_command(quiet, traceback, hint):
        _, summary = index_job(
            job_file,
            scheduler=scheduler,
            tls=tls_from_options(tls_ca_file, tls_cert, tls_key),
            resume=resume,
            verify=verify,
            overwrite=overwrite,
            break_lock=break_lock,
            wait_for_lock=wait_for_lock,
        )
    if not quiet:
        click.echo(summary)


@click.command(name="query")
@JOB_ON_A_CLUSTER
@RESUME
@OVERWRITE
@click.option("--regularization", type=float, default=None, help="Lambda for this query (default: the index's).")
@STORE_LOCK
@quiet_option()
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
    from ..job.index import query_job

    refuse_resume_and_overwrite(resume, overwrite)
    with job_command(quiet, traceback, resume_hint("query", job_file)):
        summary = query_job(
            job_file,
            scheduler=scheduler,
            tls=tls_from_options(tls_ca_file, tls_cert, tls_key),
            resume=resume,
            overwrite=overwrite,
            regularization=regularization,
            break_lock=break_lock,
            wait_for_lock=wait_for_lock,
        )
    if not quiet:
        click.echo(summary)
