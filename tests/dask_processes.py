"""Dask schedulers and workers as separate processes on 127.0.0.1, started the way the deployment
files start them (``dask scheduler``, ``dask worker ADDRESS --nthreads 1``), for the tests that need
a real cluster: ``tests/cli/test_run.py`` (plain TCP) and ``tests/security/tls_cluster.py`` (TLS).

Every process is started here and stopped by :func:`stop`, by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_command() -> str:
    """The ``dask`` command of this environment."""
    dask = shutil.which("dask", path=str(BIN)) or shutil.which("dask")
    assert dask, "the `dask` command is not installed"
    return dask


def process_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``DASK_SCHEDULER_ADDRESS``, one thread per BLAS, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def start(command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``command`` in the background, its output in the file ``log`` (run in ``log``'s folder)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env if env is not None else process_env(),
            cwd=log.parent,
            stdin=subprocess.DEVNULL,
        )


def stop(processes: list[subprocess.Popen]) -> None:
    """Stop exactly the processes started here, by pid: workers first (they close their own worker
    subprocess), then the scheduler (the first one); SIGTERM, then SIGKILL after 15 s."""
    for group in (processes[1:], processes[:1]):
        for proc in group:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in group:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def scheduler_command(port: int, *options: str) -> list[str]:
    """``dask scheduler`` on 127.0.0.1:``port`` without a dashboard, with ``options``."""
    return [dask_command(), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", *options]


def worker_command(address: str, name: str, *options: str) -> list[str]:
    """``dask worker ADDRESS --nthreads 1`` named ``name``, without a dashboard, with ``options``."""
    return [dask_command(), "worker", address, "--nthreads", "1", "--no-dashboard", "--name", name, *options]


def start_cluster(
    logs: Path,
    n_workers: int = 2,
    *,
    protocol: str = "tcp",
    scheduler_options: Sequence[str] = (),
    scheduler_env: dict[str, str] | None = None,
    worker_options: Sequence[str] = (),
    security: Any = None,
) -> tuple[str, list[subprocess.Popen]]:
    """A scheduler and ``n_workers`` workers (``w-0``, ``w-1``, ...) on 127.0.0.1, their logs in
    ``logs``; returns the scheduler's address (``protocol://127.0.0.1:PORT``) and the processes
    (for :func:`stop`) once the workers have joined (a client with ``security`` waits for them).
    On a failure the logs' tails are printed and the processes stopped."""
    from distributed import Client

    port = free_port()
    address = f"{protocol}://127.0.0.1:{port}"
    protocol_options = ["--protocol", protocol] if protocol != "tcp" else []
    processes: list[subprocess.Popen] = []
    try:
        processes.append(
            start(
                scheduler_command(port, *protocol_options, *scheduler_options),
                logs / "process-0.log",
                scheduler_env if scheduler_env is not None else process_env(),
            )
        )
        for i in range(n_workers):
            processes.append(start(worker_command(address, f"w-{i}", *worker_options), logs / f"process-{i + 1}.log"))
        with Client(address, security=security, timeout="60s") as client:
            client.wait_for_workers(n_workers, timeout=120)
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        stop(processes)
        raise
    return address, processes
