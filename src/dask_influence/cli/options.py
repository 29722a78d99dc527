"""The options several commands share, written once: the job file argument, ``--traceback``,
``--wait-for-lock`` and ``--break-lock`` (a store's lock), ``--scheduler`` (short form; ``run``
has its own longer help)."""

from __future__ import annotations

from pathlib import Path

import click

JOB_ARGUMENT = click.argument("job_file", metavar="JOB.toml", type=click.Path(path_type=Path))

SCHEDULER = click.option("--scheduler", default=None, metavar="ADDRESS", help="Address of a running Dask scheduler.")

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
    help="Take the store's lock even if another job seems to hold it (only when that job is "
    "gone; a stale lock is taken without this flag).",
)
