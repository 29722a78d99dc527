"""Concurrent writers: the lock ``<store>.lock`` refuses a second job, and never stays stuck.

A job is held mid-run by a training set whose last block waits on an event, so that a
second job meets a live lock deterministically.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch.utils.data import DataLoader, Dataset, TensorDataset

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.mapping import lock as zlock
from dask_influence.mapping.store import ATTR, is_complete

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST = 30, 6


class Gate(Dataset):
    """A dataset whose last item waits for ``open`` (or raises ``fail``) when ``armed``."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.armed = False
        self.open = threading.Event()
        self.reached = threading.Event()
        self.fail = None

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.armed and i == len(self) - 1:
            self.reached.set()
            if self.fail is not None:
                raise self.fail
            assert self.open.wait(60), "the test never opened the gate"
        return self.x[i], self.y[i]


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_TRAIN, 2, generator=g, dtype=torch.float64)
    y = torch.randn(N_TRAIN, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(2, 1).double().eval()
    solver = di.DirectInfluence(model, torch.nn.MSELoss(), regularization=0.1).fit((x, y))
    gate = Gate(x, y)
    test = DataLoader(TensorDataset(x[:N_TEST], y[:N_TEST]), batch_size=3)
    return solver, test, gate


def start_job(solver, test, gate, path, **kw):
    """Run a job in a thread until it waits at the gate (holding the lock); returns the thread."""
    outcome: dict = {}
    calc = di.SequentialInfluenceCalculator(solver, progress=False)

    def job():
        try:
            outcome["group"] = calc.influences_to_zarr(test, DataLoader(gate, batch_size=10), path, **kw)
        except BaseException as err:
            outcome["error"] = err

    gate.armed = True
    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    assert gate.reached.wait(60)
    return thread, outcome, calc


def write_lock(path, **changes):
    info = zlock.LockInfo.new(str(path))
    for k, v in changes.items():
        setattr(info, k, v)
    with open(zlock.lock_path(path), "w") as f:
        f.write(info.to_json())
    return info


def test_second_writer_is_refused_while_the_first_runs(setup, tmp_path):
    solver, test, gate = setup
    path = tmp_path / "store.zarr"
    thread, outcome, _ = start_job(solver, test, gate, path)
    try:
        held = zlock.read_lock(path)
        assert held.pid == os.getpid() and held.hostname == socket.gethostname()
        calc = di.SequentialInfluenceCalculator(solver, progress=False)
        train = DataLoader(TensorDataset(gate.x, gate.y), batch_size=10)
        for kw in ({"resume": True}, {"overwrite": True}, {}):
            with pytest.raises(
                di.StoreError,
                match=(
                    rf"is being written by another job: host {socket.gethostname()}, pid {os.getpid()} \(owner "
                    rf"{held.owner}\), since {re.escape(held.status()['acquired'])}.*\.lock.*pass break_lock=True"
                ),
            ):
                calc.influences_to_zarr(test, train, path, **kw)
        # the command line refuses too, before fitting, and names its flag
        job = tmp_path / "job.toml"
        job.write_text(f'[model]\nfactory = "x:y"\n[solver]\nmethod = "direct"\n[output]\nstore = "{path}"\n')
        from dask_influence.job.run import check_store_early

        with pytest.raises(di.StoreError, match="being written by another job"):
            check_store_early(str(path), resume=True, overwrite=False)
        text = CliRunner().invoke(cli, ["inspect", str(path), "--no-stats"])
        assert f"Lock: held: host {socket.gethostname()}, pid {os.getpid()}" in text.output
        assert zarr.open_group(str(path), mode="r").attrs[ATTR]["complete"] is False
    finally:
        gate.open.set()
        thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert is_complete(outcome["group"]) and not os.path.exists(zlock.lock_path(path))


def test_heartbeat_is_refreshed_while_the_job_runs(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(zlock, "HEARTBEAT_SECONDS", 0.05)
    solver, test, gate = setup
    path = tmp_path / "store.zarr"
    thread, outcome, _ = start_job(solver, test, gate, path)
    try:
        first = zlock.read_lock(path).heartbeat
        deadline = time.time() + 10
        while zlock.read_lock(path).heartbeat == first and time.time() < deadline:
            time.sleep(0.02)
        assert zlock.read_lock(path).heartbeat > first
    finally:
        gate.open.set()
        thread.join(60)
    assert "error" not in outcome and not os.path.exists(zlock.lock_path(path))


def test_lock_is_released_when_the_job_fails(setup, tmp_path):
    solver, test, gate = setup
    gate.fail = OSError("disk on fire")
    path = tmp_path / "store.zarr"
    thread, outcome, _ = start_job(solver, test, gate, path)
    thread.join(60)
    assert isinstance(outcome.get("error"), OSError)
    assert not os.path.exists(zlock.lock_path(path))
    assert not is_complete(zarr.open_group(str(path), mode="r"))


def test_stale_locks_are_taken_over(setup, tmp_path):
    solver, test, gate = setup
    train = DataLoader(TensorDataset(gate.x, gate.y), batch_size=10)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    path = tmp_path / "store.zarr"
    # another host whose heartbeat stopped an hour ago
    write_lock(path, hostname="elsewhere", host_id="elsewhere", pid=12345, heartbeat=time.time() - 3600)
    calc.influences_to_zarr(test, train, path)
    assert "host elsewhere, pid 12345" in calc.last_run_["lock_broken"]
    assert "last heartbeat was 3600 s ago (stale after 60 s)" in calc.last_run_["lock_broken"]
    # this host, a process that has exited (found at once, without waiting for the timeout)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(path, pid=dead.pid, pid_start=None)
    calc.influences_to_zarr(test, train, path, resume=True)
    assert f"its process {dead.pid} on this host" in calc.last_run_["lock_broken"]
    # this host, a live process id that was reused (another start time)
    write_lock(path, pid=os.getpid(), pid_start="1")
    calc.influences_to_zarr(test, train, path, resume=True)
    assert "is gone" in calc.last_run_["lock_broken"]
    # an unreadable lock file (a crash while creating it) is stale once old enough
    with open(zlock.lock_path(path), "w") as f:
        f.write("{")
    with pytest.raises(di.StoreError, match="an unreadable lock file, last modified 0 s ago"):
        calc.influences_to_zarr(test, train, path, resume=True)
    os.utime(zlock.lock_path(path), (time.time() - 120, time.time() - 120))
    calc.influences_to_zarr(test, train, path, resume=True)
    assert "unreadable lock file" in calc.last_run_["lock_broken"]
    assert not os.path.exists(zlock.lock_path(path))


def test_live_lock_of_another_host_needs_break_lock(setup, tmp_path):
    solver, test, gate = setup
    train = DataLoader(TensorDataset(gate.x, gate.y), batch_size=10)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    path = tmp_path / "store.zarr"
    write_lock(path, hostname="elsewhere", host_id="elsewhere", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(di.StoreError, match=r"host elsewhere, pid 1 .*last heartbeat 5 s ago"):
        calc.influences_to_zarr(test, train, path)
    assert not os.path.exists(path)  # refused before anything was created
    calc.influences_to_zarr(test, train, path, break_lock=True)
    assert calc.last_run_["lock_broken"].endswith("break_lock=True")
    with pytest.raises(TypeError, match="break_lock must be True or False"):
        calc.influences_to_zarr(test, train, path, resume=True, break_lock="yes")


def test_a_job_whose_lock_was_taken_does_not_mark_the_store_complete(setup, tmp_path):
    solver, test, gate = setup
    path = tmp_path / "store.zarr"
    thread, outcome, _ = start_job(solver, test, gate, path)
    write_lock(path, hostname="elsewhere", host_id="elsewhere", pid=7)  # another job broke it
    gate.open.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), di.StoreError)
    assert "was taken from this job while it ran (now held by host elsewhere, pid 7" in str(outcome["error"])
    assert not is_complete(zarr.open_group(str(path), mode="r"))
    assert json.loads(open(zlock.lock_path(path)).read())["hostname"] == "elsewhere"  # not removed


def test_cli_break_lock(tmp_path, monkeypatch):
    """`run --break-lock`, and the refusal without it naming the flag."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "batch_job"
    store = tmp_path / "out.zarr"
    job = tmp_path / "job.toml"
    job.write_text(
        f'[model]\nfactory = "factory:make_problem"\npath = "{example}"\n'
        'options = { n_train = 30, n_test = 4 }\n[solver]\nmethod = "direct"\nregularization = 1e-3\n'
        f'[blocks]\ntest = 4\ntrain = 10\n[output]\nstore = "{store}"\n[cluster]\nsequential = true\n'
    )
    write_lock(store, hostname="elsewhere", host_id="elsewhere", pid=1)
    path, had = list(sys.path), sys.modules.get("factory")
    try:
        refused = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
        assert refused.exit_code == 1 and "being written by another job" in refused.output
        assert "pass --break-lock" in refused.output and "break_lock=True" not in refused.output
        result = CliRunner().invoke(cli, ["run", str(job), "--break-lock"])
        assert result.exit_code == 0, result.output
        assert "Removed the lock of" in result.output and "host elsewhere, pid 1" in result.output
        assert is_complete(zarr.open_group(str(store), mode="r"))
        assert np.isfinite(zarr.open_group(str(store), mode="r")["influences"][...]).all()
    finally:
        sys.path[:] = path
        if had is None:
            sys.modules.pop("factory", None)
        else:
            sys.modules["factory"] = had
