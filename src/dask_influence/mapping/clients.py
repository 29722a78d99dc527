"""Which Dask client a job runs on: a given one, else the current one, else an embedded
``LocalCluster`` started for the job and closed afterwards.

``distributed`` is imported only here, when a cluster is needed (``dask-influence inspect``
and the package import stay free of it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def dask_client(client: Any = None, n_workers: int | None = None) -> Iterator[Any]:
    """``client`` itself when given, else ``distributed.get_client()``, else a client of an
    embedded ``LocalCluster`` (``n_workers`` single-threaded worker processes, default one per
    core) that is closed when the block ends."""
    if client is not None:
        yield client
        return
    from distributed import get_client

    try:
        current = get_client()
    except ValueError:
        current = None
    if current is not None:
        yield current
        return
    with local_cluster(n_workers or os.cpu_count() or 1) as embedded:
        yield embedded


@contextmanager
def local_cluster(n_workers: int, *, threads: int = 1, **kwargs: Any) -> Iterator[Any]:
    """A client of a new ``LocalCluster`` of ``n_workers`` worker processes with ``threads``
    threads each and no dashboard (``kwargs``: further ``LocalCluster`` settings, e.g.
    ``memory_limit``, ``resources``, ``host``); the cluster is closed when the block ends."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=None, **kwargs
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextmanager
def job_cluster(section: Any, *, gpu: bool = False) -> Iterator[tuple[Any, str]]:
    """The embedded ``LocalCluster`` of a job's ``[cluster]`` section (``section.workers``,
    default one per core, or one with ``section.gpu``; ``threads``, default 1;
    ``memory_limit``), on ``127.0.0.1``, with the resource ``GPU=1`` per worker when ``gpu``.

    Yields ``(client, where)``, ``where`` a phrase such as ``"on an embedded LocalCluster
    (2 workers x 1 thread)"``."""
    workers = section.workers or (1 if section.gpu else (os.cpu_count() or 1))
    threads = section.threads or 1
    kwargs: dict[str, Any] = {"host": "127.0.0.1"}
    if section.memory_limit is not None:
        kwargs["memory_limit"] = section.memory_limit
    if gpu:
        kwargs["resources"] = {"GPU": 1}
    where = (
        f"on an embedded LocalCluster ({workers} worker{'s' if workers != 1 else ''} x {threads} "
        f"thread{'s' if threads != 1 else ''})"
    )
    with local_cluster(workers, threads=threads, **kwargs) as client:
        yield client, where
