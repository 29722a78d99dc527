"""Where a job computes: the Dask client of its ``[cluster]`` (or of ``--scheduler``), the
embedded ``LocalCluster``, or this process, and the job's model on its device.

The resolution order: ``--scheduler``; ``[cluster] scheduler``; ``DASK_SCHEDULER_ADDRESS`` from the
environment; ``[cluster] sequential = true`` (this process); an embedded ``LocalCluster`` with
``[cluster] workers / threads / memory_limit``. A ``tls://`` scheduler is reached with the
certificates of ``--tls-ca-file/--tls-cert/--tls-key``, else ``[cluster] security``, else Dask's
``distributed.comm.tls.*`` configuration (:mod:`dask_influence.mapping.security`). Nothing here
prints: notes and warnings go to the ``say`` and ``warn`` callbacks the CLI passes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


def _silent(message: str) -> None:
    """A ``say``/``warn`` callback that drops the message."""


def job_model(job: Any, problem: Any) -> Any:
    """The factory's model, moved to CUDA with ``[cluster] gpu = true`` (refused without CUDA)."""
    import torch

    if not job.cluster.gpu:
        return problem.model
    if not torch.cuda.is_available():
        raise ValueError(
            "[cluster] gpu = true but CUDA is not available here; set gpu = false or run on a machine with a GPU."
        )
    return problem.model.to("cuda")


def scheduler_address(job: Any, scheduler: str | None) -> tuple[str | None, str]:
    """The scheduler a job uses and where that came from: ``--scheduler``, then ``[cluster]
    scheduler``, then ``$DASK_SCHEDULER_ADDRESS`` (not for a sequential job); ``None``: none."""
    if scheduler:
        return scheduler, "--scheduler"
    if job.cluster.scheduler:
        return job.cluster.scheduler, "[cluster] scheduler"
    if not job.cluster.sequential and os.environ.get(SCHEDULER_ENV, "").strip():
        return os.environ[SCHEDULER_ENV].strip(), SCHEDULER_ENV
    return None, "--scheduler"


def start_embedded_cluster(section: Any, *, gpu: bool, stack: ExitStack) -> tuple[Any, str]:
    """The job's embedded ``LocalCluster`` (:func:`~dask_influence.mapping.clients.job_cluster`),
    closed with ``stack``, started so that it stays out of the command's output:

    - its worker processes ignore SIGINT: Ctrl-C in a terminal reaches the whole process group,
      and a worker's ``KeyboardInterrupt`` traceback would precede the command's own line
      (the driver stops the workers as it closes the cluster);
    - the logs of Dask's scheduler, nannies and workers are shown at CRITICAL only while the
      cluster runs (a failed task's "Compute Failed" block and the teardown's heartbeat and
      connection tracebacks would surround the one-line ``Error:``; ``--traceback`` shows the
      error's full traceback).
    """
    from ..mapping.clients import job_cluster

    stack.enter_context(_quiet_dask_logs())
    with _sigint_ignored():
        found: tuple[Any, str] = stack.enter_context(job_cluster(section, gpu=gpu))
    return found


_DASK_LOG_ENV = "DASK_LOGGING__DISTRIBUTED"


@contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Dask's log lines at CRITICAL only: here (the handlers of the ``distributed`` logger) and in
    the worker processes started meanwhile (their environment: Dask reads its logging levels
    from ``DASK_LOGGING__*`` when it is imported)."""
    import logging

    import distributed  # noqa: F401 - sets up the handlers of the "distributed" logger

    previous_env = os.environ.get(_DASK_LOG_ENV)
    os.environ[_DASK_LOG_ENV] = "critical"
    # a filter, not a level: each nanny sets the handlers' level while it runs (silence_logs)
    handlers = [h for h in logging.getLogger("distributed").handlers if isinstance(h, logging.StreamHandler)]
    for handler in handlers:
        handler.addFilter(_CRITICAL_ONLY)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_CRITICAL_ONLY)
        if previous_env is None:
            os.environ.pop(_DASK_LOG_ENV, None)
        else:
            os.environ[_DASK_LOG_ENV] = previous_env


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while child processes are started (they inherit it; Python then installs
    no ``KeyboardInterrupt`` handler in them); restored after. Off the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _CriticalOnly(logging.Filter):
    """Drops the records of a logger below CRITICAL."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


_CRITICAL_ONLY = _CriticalOnly()


def job_client(
    job: Any,
    scheduler: str | None,
    stack: ExitStack,
    *,
    say: Callable[[str], None] = _silent,
    warn: Callable[[str], None] = _silent,
    wait_for_workers: int = 1,
    timeout: float = 300.0,
    gpu: bool = False,
    tls: Any = None,
) -> tuple[Any, str]:
    """The Dask client a job computes on (``None``: in this process, ``[cluster] sequential``)
    and a phrase saying where, per the resolution order of the module docstring; closed with ``stack``.

    With a scheduler, waits up to ``timeout`` seconds for ``wait_for_workers`` workers (a
    Kubernetes DaskJob starts its job pod and its workers together). ``tls``: the certificates
    of ``--tls-*``, if any (see :func:`connect_scheduler`). ``say``: where a waiting note goes;
    ``warn``: where the warning about an unencrypted remote scheduler goes (the CLI prints them)."""
    address, source = scheduler_address(job, scheduler)
    if address:
        client = connect_scheduler(job, address, source, tls, stack, warn=warn)
        n = len(client.scheduler_info().get("workers", {}))
        if n < wait_for_workers:
            say(f"Waiting up to {timeout:g} s for {wait_for_workers} worker(s) at {address} ({n} now)...")
            try:
                client.wait_for_workers(n_workers=wait_for_workers, timeout=timeout)
            except (TimeoutError, OSError):
                n = len(client.scheduler_info().get("workers", {}))
                raise OSError(
                    f"only {n} of {wait_for_workers} worker(s) joined the Dask scheduler at {address} within "
                    f"{timeout:g} s; start workers, or raise --timeout or lower --wait-for-workers"
                ) from None
            n = len(client.scheduler_info().get("workers", {}))
        return client, f"on the scheduler at {address} ({n} worker{'s' if n != 1 else ''} now)"
    refuse_tls_without_scheduler(job, tls)
    if job.cluster.sequential:
        return None, "in this process (sequential)"
    return start_embedded_cluster(job.cluster, gpu=gpu, stack=stack)


def connect_scheduler(
    job: Any, address: str, source: str, tls: Any, stack: ExitStack, *, warn: Callable[[str], None] = _silent
) -> Any:
    """A client of the scheduler at ``address``, closed with ``stack``, secured with the first
    certificates of ``tls`` (``--tls-*``), ``[cluster] security`` and Dask's configuration (the
    last for a ``tls://`` address only: a ``tcp://`` one then connects without TLS, as in Dask).

    Without certificates, a scheduler on another host reached over plain TCP gets one line
    ``Warning: ...`` through ``warn`` (the library's own warning about it is then silenced)."""
    from ..mapping.clients import connect
    from ..mapping.security import (
        CONFIG_SOURCE,
        UnencryptedSchedulerWarning,
        resolve_tls,
        scheme_of,
        unencrypted_warning,
    )

    tls = resolve_tls(tls, job.cluster.security)
    if tls is not None and tls.source == CONFIG_SOURCE and scheme_of(address) != "tls":
        tls = None  # Dask's own configuration applies to tls:// addresses, as in Dask
    if tls is None:
        message = unencrypted_warning(address)
        if message is not None:
            warn(f"Warning: {message}")
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", UnencryptedSchedulerWarning)
    return stack.enter_context(connect(address, source, tls))


def refuse_tls_without_scheduler(job: Any, tls: Any) -> None:
    """Certificates given on the command line or in the job file, but no scheduler to use them
    with: refused (an embedded LocalCluster or this process uses no TLS)."""
    given = tls if tls is not None and tls.given() else job.cluster.security
    if given is not None:
        raise ValueError(
            f"TLS certificates are given ({given.source}) but no scheduler: the job would run on an embedded "
            "LocalCluster (or in this process), which uses no TLS. Name the scheduler with --scheduler "
            "tls://HOST:PORT (or [cluster] scheduler, or $DASK_SCHEDULER_ADDRESS), or drop the certificates."
        )
