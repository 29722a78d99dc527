"""The options several commands share, written once: the job file argument, ``--scheduler`` and
the TLS certificates (:data:`JOB_ON_A_CLUSTER`: ``run``, ``index``, ``query``, ``evaluate``),
``--resume``/``--overwrite`` of an output store (``run``, ``query``), ``--break-lock`` and
``--wait-for-lock`` (:data:`STORE_LOCK`), ``--quiet`` and ``--traceback``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cluster_options import tls_options

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def stacked(*decorators: Decorator) -> Decorator:
    """The decorators applied as if written one above the other, in this order (``--help`` lists
    the options in this order)."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


JOB_ARGUMENT = click.argument("job_file", metavar="JOB.toml", type=click.Path(path_type=Path))

SCHEDULER = click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="Address of a running Dask scheduler, e.g. tls://scheduler:8786 (default: [cluster] "
    "scheduler of the job, else $DASK_SCHEDULER_ADDRESS, else an embedded LocalCluster).",
)

JOB_ON_A_CLUSTER = stacked(JOB_ARGUMENT, SCHEDULER, tls_options)
"""``JOB.toml``, ``--scheduler`` and ``--tls-ca-file/--tls-cert/--tls-key``: the head of every
command that runs a job (parameters ``job_file``, ``scheduler``, ``tls_ca_file``, ``tls_cert``,
``tls_key``)."""

RESUME = click.option(
    "--resume",
    is_flag=True,
    help="Complete an existing store of the same job, computing only its missing chunks "
    "(creates the store if there is none).",
)

OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace an existing store.")


def refuse_resume_and_overwrite(resume: bool, overwrite: bool) -> None:
    """``--resume`` and ``--overwrite`` together are a usage error."""
    if resume and overwrite:
        raise click.UsageError("Pass --resume or --overwrite, not both.")


def quiet_option(what: str = "errors") -> Decorator:
    """``--quiet``/``-q``: print nothing but ``what`` (no progress lines)."""
    return click.option("--quiet", "-q", is_flag=True, help=f"Print nothing but {what} (no progress lines).")


TRACEBACK = click.option("--traceback", is_flag=True, help="Show the full traceback of an error.")

WAIT_FOR_LOCK = click.option(
    "--wait-for-lock",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Wait this long for a lock held by a live job before refusing (a restarted driver whose "
    "predecessor was killed takes its lock once the heartbeat is stale, 60 s).",
)

BREAK_LOCK = click.option(
    "--break-lock",
    is_flag=True,
    help="Take the store's (or index's) lock even if another job seems to hold it (only when that "
    "job is gone; a stale lock is taken without this flag).",
)

STORE_LOCK = stacked(BREAK_LOCK, WAIT_FOR_LOCK)
"""``--break-lock`` and ``--wait-for-lock`` (parameters ``break_lock``, ``wait_for_lock``)."""
