"""Which Dask client a job runs on: a given one, else the current one, else an embedded
``LocalCluster`` started for the job and closed afterwards.

``distributed`` is imported only here, when a cluster is needed (``dask-influence inspect``
and the package import stay free of it).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .security import TlsFiles, connection_error, scheme_of, warn_if_unencrypted

logger = logging.getLogger("dask_influence")


@contextmanager
def dask_client(client: Any = None, n_workers: int | None = None) -> Iterator[Any]:
    """``client`` itself when given, else ``distributed.get_client()``, else a client of an
    embedded ``LocalCluster`` (``n_workers`` single-threaded worker processes, default one per
    core) that is closed when the block ends.

    A given or current client whose scheduler is on another host and reached without TLS
    raises an :class:`~dask_influence.mapping.security.UnencryptedSchedulerWarning` (a client
    secured with ``Client(address, security=Security(...))`` on ``tls://`` does not)."""
    found = given_or_current(client)
    if found is not None:
        warn_if_unencrypted(found)
        yield found
        return
    with local_cluster(n_workers or os.cpu_count() or 1) as embedded:
        yield embedded


def given_or_current(client: Any = None) -> Any:
    """``client`` itself when given, else ``distributed.get_client()``, else ``None`` (no current client)."""
    if client is not None:
        return client
    from distributed import get_client

    try:
        return get_client()
    except ValueError:
        return None


WORKER_EXIT_SECONDS = 60.0
"""How long the worker processes of an embedded cluster get to exit when it closes.

A worker process that has imported torch spends seconds in the interpreter's finalization after
its worker closed (measured on the loaded 2-core machine: 1-5 s with no Python frame left,
torch's and its extensions' teardown). Dask's nanny waits 4 s (``Nanny.close``'s default
``timeout=5`` times 0.8) before it kills the process with the warning "Worker process still
alive after 4.0 seconds, killing", once per worker, at the end of every run. The workers are
therefore closed here, after the client, with this much time; they exit on their own."""


@contextmanager
def local_cluster(n_workers: int, *, threads: int = 1, **kwargs: Any) -> Iterator[Any]:
    """A client of a new ``LocalCluster`` of ``n_workers`` worker processes with ``threads``
    threads each and no dashboard (``kwargs``: further ``LocalCluster`` settings, e.g.
    ``memory_limit``, ``resources``, ``host``); the cluster is closed when the block ends: the
    client first, then the workers (each given :data:`WORKER_EXIT_SECONDS` to exit), then the
    scheduler."""
    from distributed import Client, LocalCluster

    with (
        glibc_dynamic_malloc(),
        LocalCluster(
            n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=None, **kwargs
        ) as cluster,
    ):
        try:
            with Client(cluster) as client:
                yield client
        finally:
            _close_workers(cluster, WORKER_EXIT_SECONDS)


DASK_MALLOC_TRIM = 65536
"""Dask's own ``distributed.nanny.pre-spawn-environ`` value of glibc's ``MALLOC_TRIM_THRESHOLD_``."""


@contextmanager
def glibc_dynamic_malloc() -> Iterator[None]:
    """While the block runs, new nannies start their workers without Dask's ``MALLOC_TRIM_THRESHOLD_=65536``.

    Setting any of glibc's malloc thresholds turns off its dynamic mmap threshold: every
    allocation above 128 KiB (a layer's activations, a chunk's gradients) is then mapped afresh and
    unmapped when freed, its pages faulted and zeroed again by the next one. Without the setting
    glibc keeps freed blocks up to 32 MiB for reuse. Measured on a 2 x 768 GPT-2 (V = 50,257, one
    worker): EK-FAC's fit blocks took 15.7 s instead of 17.8 s, the same as in one process. Memory
    is returned to the system a little later (glibc's dynamic trim threshold is at most 64 MiB per
    arena). A value the user configured (other than Dask's 65,536) is kept, and so is a
    ``MALLOC_TRIM_THRESHOLD_`` in this process's own environment.
    """
    import dask
    import distributed  # noqa: F401  (its configuration's defaults)

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    if str(environ.get("MALLOC_TRIM_THRESHOLD_")) != str(DASK_MALLOC_TRIM):
        yield
        return
    del environ["MALLOC_TRIM_THRESHOLD_"]
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        yield


def trim_memory() -> int:
    """Return this process's free heap memory to the system (glibc's ``malloc_trim(0)``); 1 if some was
    returned, 0 if none or not glibc.

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB each with the dynamic thresholds,
    :func:`glibc_dynamic_malloc`) for reuse: after a pass over GPT-2-small's data a worker held 1.5-2 GB
    of freed activations and logits, which the next job's allocations do not always reuse."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return 0
    try:
        return int(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return 0


def trim_workers(client: Any) -> None:
    """:func:`trim_memory` on every worker of ``client`` (after a job: its freed memory goes back to the
    system before the next one's). Failures are ignored: trimming only returns free memory."""
    try:
        client.run(trim_memory)
    except Exception:  # a worker gone or a client closing: nothing to return
        logger.debug("trimming the workers' memory failed", exc_info=True)


def direct_to_workers(client: Any) -> bool:
    """Whether the client can send data to the workers itself, not through the scheduler: its scheduler is
    on the loopback (an embedded or local cluster, whose workers are local too). Sent through a scheduler
    in the client's own process (an embedded ``LocalCluster``), a broadcast GPT-2-small fit cost a copy in
    the client and ten times the time (1 GiB: 8.9 s and +1 GB in the client; directly 0.8 s, no copy)."""
    try:
        address = str(client.scheduler.address)
    except AttributeError:
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _close_workers(cluster: Any, timeout: float) -> None:
    """Close the nannies of ``cluster`` (and their worker processes), each allowed ``timeout`` seconds."""
    import asyncio

    async def close() -> None:
        nannies = [w for w in cluster.workers.values() if hasattr(w, "close")]
        await asyncio.gather(*(w.close(timeout=timeout) for w in nannies), return_exceptions=True)

    cluster.sync(close)


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


@contextmanager
def connect(address: str, source: str, tls: TlsFiles | None = None, *, timeout: Any = None) -> Iterator[Any]:
    """A client of the running scheduler at ``address`` (``source``: where the address came from,
    named in errors), secured with ``tls`` (see :mod:`~dask_influence.mapping.security`); closed
    when the block ends.

    Refused in one line (``OSError``; ``ValueError`` for the certificates themselves, checked
    before connecting): a ``tls://`` address without certificates, certificates with a plain
    ``tcp://`` address, and each way the TLS handshake fails (the scheduler's certificate not
    signed by our CA; ours refused by the scheduler; a side that does not speak TLS).
    ``timeout``: of the connection (default Dask's ``distributed.comm.timeouts.connect``).
    """
    from distributed import Client

    scheme = scheme_of(address)
    if tls is not None:
        if scheme not in ("", "tls"):
            raise ValueError(
                f"TLS certificates are given (from {tls.source}) but the Dask scheduler address {address} (from "
                f"{source}) is {scheme}://, which is not encrypted: write it as tls://{address.partition('://')[2]}."
            )
        tls.check()
        if not scheme:
            address = f"tls://{address}"
    elif scheme == "tls":
        raise ValueError(
            f"the Dask scheduler address {address} (from {source}) is tls:// but no TLS certificates are given: pass "
            "--tls-ca-file, --tls-cert and --tls-key (or [cluster] security in the job file, or Dask's "
            "distributed.comm.tls.* configuration)."
        )
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if tls is not None:
        kwargs["security"] = tls.security()
    failed = None
    try:
        client = Client(address, **kwargs)
    except (OSError, TimeoutError, TypeError, ValueError, RuntimeError) as exc:  # ssl.SSLError is an OSError
        failed = connection_error(exc, address, source, tls)
    if failed is not None:
        # The Client that failed in its __init__ is closed by its __del__, which stops the shared
        # event-loop thread: collected later, inside the next Client's start, it deadlocks on the
        # loop's lock. Collect it now, while no client is starting (the traceback is gone).
        gc.collect()
        raise OSError(failed)
    try:
        yield client
    finally:
        client.close()
