"""``dask-influence evaluate JOB.toml``: score a job's influences against retraining.

The work is :func:`dask_influence.job.evaluate.evaluate_job` (the ``[evaluate]`` section: LDS,
LOO, mislabel AUC, every finished retraining recorded in the store, so that running the command
again retrains only the runs that are missing; ``--overwrite`` starts afresh); this module
parses the options and prints the result lines (stdout) and the job's notes (stderr).
"""

from __future__ import annotations

from pathlib import Path

import click

from .cluster_options import tls_from_options
from .options import JOB_ON_A_CLUSTER, STORE_LOCK, TRACEBACK, quiet_option
from .output import job_command


@click.command()
@JOB_ON_A_CLUSTER
@click.option("--overwrite", is_flag=True, help="Discard the recorded retrainings of this evaluation and start afresh.")
@STORE_LOCK
@quiet_option("the results and errors")
@TRACEBACK
def evaluate(
    job_file: Path,
    scheduler: str | None,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    overwrite: bool,
    break_lock: bool,
    wait_for_lock: float,
    quiet: bool,
    traceback: bool,
) -> None:
    """Evaluate the influences of JOB.toml's store against retraining ([evaluate] section).

    Writes the runs and results to the store's evaluation/ group (`inspect` shows them,
    `plot --evaluation lds` draws them); an interrupted evaluation, run again, retrains
    only what is missing (SIGTERM and Ctrl-C end it with one line saying so, exit code 130,
    the store's lock released). See docs/evaluation.md.
    """
    from ..job.evaluate import evaluate_job

    hint = (
        "Every finished retraining is recorded in the store: rerun "
        f"(dask-influence evaluate {job_file}) to retrain only the missing runs."
    )
    with job_command(quiet, traceback, hint):
        lines = evaluate_job(
            job_file,
            scheduler=scheduler,
            overwrite=overwrite,
            break_lock=break_lock,
            wait_for_lock=wait_for_lock,
            tls=tls_from_options(tls_ca_file, tls_cert, tls_key),
        )
    for line in lines:
        click.echo(line)
