"""Faults through the CLI's other commands (issue 31, items 14 and 17): `index`, `query` and
`evaluate` get `run`'s restart handling, and `query` refuses an existing store before anything
runs.

- SIGTERM ends `index` like Ctrl-C: exit code 130, one line saying how to resume, the lock
  released; the rerun completes the index.
- A driver restarted in a new process namespace (a Kubernetes pod) finds the killed driver's
  lock with a fresh heartbeat: it is refused in one line naming the command's own
  `--wait-for-lock SECONDS` and `--break-lock`, and with `--wait-for-lock` it takes the lock
  once the heartbeat is stale.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import reliability_problem as rp
from dask_influence.cli.main import cli
from dask_influence.storage import lock as zlock

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _job(directory: Path, *, evaluate: bool = False) -> str:
    """The reliability problem's job with an [index] (and an [evaluate]) section."""
    path = Path(rp.write_job(directory, cluster="sequential = true"))
    extra = f'[index]\nstore = "{directory / "index.zarr"}"\nprojection_dim = 8\ndtype = "float64"\n\n'
    if evaluate:
        extra += '[evaluate]\nretrain = "reliability_problem:slow_train"\nmethods = ["lds"]\nn_subsets = 8\n\n'
    path.write_text(path.read_text().replace("[cluster]", extra + "[cluster]"))
    return str(path)


def _foreign_lock(store: Path) -> None:
    """The lock of a killed driver in another pid namespace: pid 1 there, a fresh heartbeat."""
    now = time.time()
    info = zlock.LockInfo(
        owner="old-pod:1:abc",
        hostname="old-pod",
        pid=1,
        pid_start=None,
        host_id="another-namespace",
        acquired=now,
        heartbeat=now,
        store=str(store),
    )
    assert zlock._Files(zlock.lock_path(str(store))).create(info.to_json())


def _refusal(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["index", "query", "evaluate"])
def test_a_restarted_driver_is_told_this_commands_options_and_waits_for_the_stale_lock(tmp_path, monkeypatch, command):
    job = _job(tmp_path, evaluate=command == "evaluate")
    runner = CliRunner()
    if command != "index":
        assert runner.invoke(cli, ["index", job, "--quiet"]).exit_code == 0
    if command == "evaluate":  # a complete store to evaluate
        assert runner.invoke(cli, ["run", job, "--quiet"]).exit_code == 0
    store = tmp_path / ("index.zarr" if command == "index" else "store.zarr")
    _foreign_lock(store)
    line = _refusal(runner.invoke(cli, [command, job, "--quiet"]))
    assert line.startswith(f"Error: The store '{store}' is being written by another job: host old-pod, pid 1")
    assert (
        "Wait for that job to finish (--wait-for-lock SECONDS waits for it), or, if it is gone, pass --break-lock."
        in line
    )
    assert "dask-influence run" not in line and "wait_for_lock" not in line and "break_lock" not in line
    if command == "evaluate":
        return  # its retraining takes long; the wait itself is the same code as index's and query's
    monkeypatch.setattr(zlock, "STALE_SECONDS", 2.0)
    monkeypatch.setattr(zlock, "POLL_SECONDS", 0.2)
    began = time.monotonic()
    extra = ["--resume"] if command == "query" else []
    result = runner.invoke(cli, [command, job, "--quiet", "--wait-for-lock", "60", *extra])
    assert result.exit_code == 0, result.output
    assert 1.0 < time.monotonic() - began < 60
    assert zlock.read_lock(store) is None


def test_query_refuses_an_existing_store_before_the_factory_and_the_cluster(tmp_path, monkeypatch):
    """Was refused only after the cluster had started, behind a 40-line Dask traceback."""
    job = _job(tmp_path)
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "store.zarr" / "zarr.json").write_text("{}")
    called = []
    monkeypatch.setattr(rp, "make_problem", lambda *a, **k: called.append(1))
    started = []
    monkeypatch.setattr("dask_influence.job.index.job_client", lambda *a, **k: started.append(1))
    line = _refusal(CliRunner().invoke(cli, ["query", job]))
    assert line == (
        f"Error: The output store '{tmp_path / 'store.zarr'}' already exists; pass --resume to complete it or "
        "--overwrite to replace it."
    )
    assert called == [] and started == []


def _sigterm_while_running(command: str, job: str, store: Path, env: dict[str, str], after: float) -> str:
    """``dask-influence COMMAND JOB --quiet`` in a child process, sent SIGTERM ``after`` seconds
    once it holds the lock of ``store``; its last line, checked to be a clean interruption
    (exit code 130, no traceback, the lock released)."""
    env = {**os.environ, **env, "PYTHONPATH": str(HERE)}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    driver = subprocess.Popen(
        [str(BIN / "dask-influence"), command, job, "--quiet"],
        env=env,
        cwd=Path(job).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(zlock.lock_path(str(store))) and time.monotonic() < deadline:
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            time.sleep(0.1)
        time.sleep(after)
        assert driver.poll() is None
        os.kill(driver.pid, signal.SIGTERM)
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    text = out.decode()
    assert driver.returncode == 130, text[-3000:]  # was -15: killed at once, the lock left
    assert "Traceback" not in text
    assert not os.path.exists(zlock.lock_path(str(store)))  # released on the way out
    return text.strip().splitlines()[-1]


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_ends_index_with_the_resume_line_and_releases_the_lock(tmp_path):
    job = _job(tmp_path)
    last = _sigterm_while_running("index", job, tmp_path / "index.zarr", {rp.DELAY_ENV: "0.5"}, after=2.0)
    assert last == (  # some blocks written (0.5 s per block)
        "Interrupted. The index keeps every block written so far: rerun "
        f"(dask-influence index {job}; it resumes by default) to compute only the missing ones."
    )
    result = CliRunner().invoke(cli, ["index", job])
    assert result.exit_code == 0, result.output
    found = re.search(r"; (\d+) blocks written, (\d+) already done\)", result.output)
    assert found, result.output
    written, skipped = int(found.group(1)), int(found.group(2))
    assert skipped > 0 and written + skipped == rp.N_TRAIN // rp.TRAIN_BLOCK  # 30 blocks, none twice


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_ends_evaluate_with_the_resume_line_and_releases_the_lock(tmp_path):
    job = _job(tmp_path, evaluate=True)
    assert CliRunner().invoke(cli, ["run", job, "--quiet"]).exit_code == 0  # the store to evaluate
    store = tmp_path / "store.zarr"
    # 8 subsets + base at 1 s each: a retraining or two recorded after 2.5 s
    last = _sigterm_while_running("evaluate", job, store, {rp.TRAIN_DELAY_ENV: "1.0"}, after=2.5)
    assert last == (
        "Interrupted. Every finished retraining is recorded in the store: rerun "
        f"(dask-influence evaluate {job}) to retrain only the missing runs."
    )
