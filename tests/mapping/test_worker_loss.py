"""The fitted solver survives the loss of every worker that held it.

The solver is one literal key of the graph, so the scheduler can recompute it. The test
runs a job on a scheduler and ONE worker (separate processes on 127.0.0.1), kills that
worker by its process id after some chunks are written, then starts a fresh worker that
never held the solver: the job completes and equals the in-memory result.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di

DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [DASK, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _done_chunks(path: Path) -> int:
    try:
        return int((np.asarray(zarr.open_group(str(path), mode="r")["influences_done"][...]) == 1).sum())
    except Exception:
        return 0


@pytest.mark.slow
def test_job_survives_loss_of_the_only_worker(tmp_path):
    from distributed import Client

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (3000,), generator=g)
    xt, yt = x[:40], y[:40]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 4)).double().eval()
    solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.5, curvature="ggn").fit(
        (x[:500], y[:500])
    )
    expected = solver.influences(xt, yt, x, y).numpy()
    test = DataLoader(TensorDataset(xt, yt), batch_size=20)
    train = DataLoader(TensorDataset(x, y), batch_size=25)  # 2 x 120 chunks
    path = tmp_path / "out.zarr"

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")]
    try:
        first = _start("worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1")
        procs.append(first)
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            calc = di.DaskInfluenceCalculator(solver, client, progress=False)
            outcome: dict = {}

            def job():
                try:
                    outcome["group"] = calc.influences_to_zarr(test, train, path)
                except BaseException as err:  # reported by the main thread
                    outcome["error"] = err

            thread = threading.Thread(target=job)
            thread.start()
            deadline = time.time() + 120
            while _done_chunks(path) < 5 and time.time() < deadline and thread.is_alive():
                time.sleep(0.05)
            written_before = _done_chunks(path)
            assert 0 < written_before < 240, f"the job must be mid-way when the worker dies ({written_before})"
            os.kill(first.pid, signal.SIGKILL)  # the only worker, holding the solver, is gone
            first.wait(10)
            procs.append(
                _start("worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1")
            )
            thread.join(240)
            assert not thread.is_alive(), "the job did not finish after the new worker joined"
            assert "error" not in outcome, repr(outcome.get("error"))
        group = outcome["group"]
        assert group.attrs["dask_influence"]["complete"] is True
        np.testing.assert_allclose(group["influences"][...], expected, rtol=1e-10, atol=1e-12)
    finally:
        for proc in reversed(procs):
            _stop(proc)
