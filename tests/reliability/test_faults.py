"""Fault injection on a real cluster: a scheduler and two worker processes started here on
127.0.0.1 (the commands of the deployment manifests), a killed driver, a killed worker.

Every process is started by this module and stopped by its process id. The workers sleep
``DI_TEST_BLOCK_DELAY`` seconds per block load so that a job of 60 chunks lasts long enough
to be interrupted after some chunks are written. The figures these tests measure are
printed on lines starting with ``MEASURED`` (run with ``-s`` to see them); docs/reliability.md
records them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from torch.utils.data import DataLoader

import dask_influence as di
import reliability_problem as rp
from dask_influence.cli.main import cli
from dask_influence.mapping.lock import lock_path, read_lock
from dask_influence.mapping.store import ATTR, is_complete
from dask_processes import free_port, process_env, scheduler_command, start, stop, worker_command

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
N_CHUNKS = (rp.N_TEST // rp.TEST_BLOCK) * (rp.N_TRAIN // rp.TRAIN_BLOCK)  # 60
DELAY = "0.15"  # seconds per block load on the workers: 30 train blocks, ~2.5 s per job on 2 workers

pytestmark = pytest.mark.slow


_flags_done = rp.flags_done


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Cluster:
    """`dask scheduler` and `dask worker --no-nanny` processes on 127.0.0.1, started here."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = process_env(
            PYTHONPATH=os.pathsep.join([str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        )
        self.scheduler = self.start_scheduler("scheduler")
        self.workers: list[subprocess.Popen] = []

    def start_scheduler(self, name: str) -> subprocess.Popen:
        """A scheduler at this cluster's address (again, after one was killed)."""
        return start(scheduler_command(self.port), self.logs / f"{name}.log", self.env)

    def start_worker(self) -> subprocess.Popen:
        name = f"worker-{len(self.workers)}"
        command = worker_command(self.address, name, "--no-nanny", "--host", "127.0.0.1")
        proc = start(command, self.logs / f"{name}.log", {**self.env, rp.DELAY_ENV: DELAY})
        self.workers.append(proc)
        return proc

    def ensure_workers(self, client, n: int) -> None:
        alive = [w for w in self.workers if w.poll() is None]
        for _ in range(n - len(alive)):
            self.start_worker()
        client.wait_for_workers(n, timeout=120)

    def stop(self) -> None:
        stop([self.scheduler, *self.workers])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from distributed import Client

    logs = tmp_path_factory.mktemp("fault-cluster-logs")
    c = Cluster(logs)
    try:
        c.start_worker()
        c.start_worker()
        with Client(c.address, timeout="60s") as client:
            c.ensure_workers(client, 2)
            c.client = client
            yield c
    except Exception:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        c.stop()
        assert all(p.poll() is not None for p in c.workers + [c.scheduler])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean run of the job in this process (no cluster, no faults): the reference store."""
    problem = rp.make_problem()
    solver = di.DirectInfluence(problem["model"], problem["loss"], regularization=0.1, curvature="ggn")
    solver.fit(DataLoader(problem["train"], batch_size=rp.TRAIN_BLOCK))
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
        DataLoader(problem["test"], batch_size=rp.TEST_BLOCK),
        DataLoader(problem["train"], batch_size=rp.TRAIN_BLOCK),
        path,
        top_k=3,
        self_influences=True,
    )
    return {"solver": solver, "problem": problem, "path": path, **_arrays(path)}


def _arrays(path: Path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    names = [
        "influences",
        "self_influences",
        "top_helpful_indices",
        "top_helpful_values",
        "top_harmful_indices",
        "top_harmful_values",
    ]
    return {name: group[name][...] for name in names}


def assert_equals_clean(path: Path, clean: dict) -> bool:
    """The store at ``path`` is complete and holds the clean run's arrays; True if bit-identical."""
    group = zarr.open_group(str(path), mode="r")
    assert is_complete(group) and group.attrs[ATTR]["complete"] is True
    got = _arrays(path)
    identical = True
    for name, value in got.items():
        if "indices" in name:
            np.testing.assert_array_equal(value, clean[name], err_msg=name)
        else:
            # other processes may round differently in the last bits (measured: 1.5e-14 absolute
            # on values up to 7); nothing else may differ
            np.testing.assert_allclose(value, clean[name], rtol=0, atol=1e-12 * np.abs(clean[name]).max(), err_msg=name)
            identical &= bool(np.array_equal(value, clean[name]))
    return identical


def _idle(client) -> bool:
    """No task left on the scheduler and none running on a worker (a dead driver's tasks are
    released; those already running when it died have finished their writes)."""
    if client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
        return False
    return not any(client.run(lambda dask_worker: dask_worker.state.executing_count).values())


def write_job(tmp_path: Path, address: str) -> Path:
    return Path(rp.write_job(tmp_path, cluster=f'scheduler = "{address}"', output="top_k = 3\nself_influences = true"))


# -- 2. a killed driver ----------------------------------------------------------------------


def test_killed_driver_resumes_computing_only_the_missing_chunks(tmp_path, cluster, clean):
    job = write_job(tmp_path, cluster.address)
    store = tmp_path / "store.zarr"
    env = {**cluster.env}
    env.pop(rp.DELAY_ENV, None)
    driver = subprocess.Popen(
        [str(BIN / "dask-influence"), "run", str(job), "--quiet"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: _flags_done(store) >= 6 or driver.poll() is not None, 180, "6 chunks written")
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        held = read_lock(store)
        assert held is not None and held.pid == driver.pid and held.stale_reason() is None
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies mid-run, without cleaning up
        driver.wait(30)
    finally:
        stop([driver])
    # the scheduler releases the dead client's tasks; tasks already running finish their writes
    _wait_for(lambda: _idle(cluster.client), 60, "the scheduler to forget the dead driver's tasks")
    done_before = _flags_done(store)
    assert 0 < done_before < N_CHUNKS, done_before

    # never reported complete: attributes, the Python API, `inspect` (text and JSON)
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs[ATTR]["complete"] is False and not is_complete(group)
    text = CliRunner().invoke(cli, ["inspect", str(store), "--no-stats"])
    assert text.exit_code == 0 and f"Status: INCOMPLETE ({done_before}/{N_CHUNKS} chunks done)" in text.output
    assert "Lock: STALE" in text.output and f"its process {driver.pid} on this host" in text.output
    as_json = json.loads(CliRunner().invoke(cli, ["inspect", str(store), "--json", "--no-stats"]).output)
    assert as_json["complete"] is False and as_json["lock"]["stale"] is True

    # the killed driver's lock is stale (its process is gone): the rerun takes it over
    assert os.path.exists(lock_path(store))
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["run", str(job), "--resume"])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    missing = N_CHUNKS - done_before
    assert f"({N_CHUNKS}/{N_CHUNKS} chunks; {missing} computed, {done_before} already done)" in result.output
    assert f"Removed the lock of {store} held by host" in result.output and "is gone" in result.output
    assert not os.path.exists(lock_path(store))
    identical = assert_equals_clean(store, clean)
    print(
        f"\nMEASURED killed driver: chunks done at kill {done_before}/{N_CHUNKS}; resume computed {missing}, "
        f"skipped {done_before}, recomputed 0 that were done; job completed; equal to clean run "
        f"(bit-identical: {identical}); resume took {seconds:.1f} s"
    )


# -- 1. a lost worker ------------------------------------------------------------------------


def _chunk_files(store: Path) -> dict[str, int]:
    """The inode of every chunk file of ``influences``: zarr writes a chunk to a new file and
    renames it into place, so a chunk written again gets a new inode."""
    root = store / "influences" / "c"
    return {str(p.relative_to(root)): p.stat().st_ino for p in root.rglob("*") if p.is_file()}


def test_lost_worker_job_completes_and_equals_a_clean_run(tmp_path, cluster, clean):
    cluster.ensure_workers(cluster.client, 2)
    client = cluster.client
    problem = clean["problem"]
    calc = di.DaskInfluenceCalculator(clean["solver"], client, progress=False)
    test = DataLoader(problem["test"], batch_size=rp.TEST_BLOCK)
    train = DataLoader(problem["train"], batch_size=rp.TRAIN_BLOCK)
    store = tmp_path / "store.zarr"
    outcome: dict = {}

    def job():
        try:
            outcome["group"] = calc.influences_to_zarr(test, train, store, top_k=3, self_influences=True)
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    victim = next(w for w in cluster.workers if w.poll() is None)
    thread = threading.Thread(target=job)
    thread.start()
    try:
        _wait_for(lambda: _flags_done(store) >= 6 or not thread.is_alive(), 180, "6 chunks written")
        files_before = _chunk_files(store)
        written_before = _flags_done(store)
        assert thread.is_alive() and written_before < N_CHUNKS, "the job must be mid-way when the worker dies"
        os.kill(victim.pid, signal.SIGKILL)  # one of the two workers is gone
        victim.wait(10)
        thread.join(300)
    finally:
        if thread.is_alive():
            cluster.ensure_workers(client, 2)
            thread.join(120)
    assert not thread.is_alive(), "the job did not finish on the remaining worker"
    assert "error" not in outcome, repr(outcome.get("error"))
    assert calc.last_run_["chunks_computed"] == N_CHUNKS
    identical = assert_equals_clean(store, clean)
    files_after = _chunk_files(store)
    rewritten = sum(files_after[name] != inode for name, inode in files_before.items())
    print(
        f"\nMEASURED lost worker: chunks written at kill {len(files_before)} ({written_before} flagged)/{N_CHUNKS}; "
        f"job completed on the remaining worker; chunks written again after the loss {rewritten}; equal to "
        f"clean run (bit-identical: {identical})"
    )


# -- 3. a lost scheduler ---------------------------------------------------------------------


def test_lost_scheduler_ends_the_driver_in_one_line_and_a_restarted_cluster_resumes_exactly(tmp_path, clean):
    """The scheduler is killed mid-job (issue 17, item 2): the driver ends with one line saying
    the store is resumable; the scheduler is restarted at the same address and the workers are
    restarted by the operator (Dask workers shut down when they lose their scheduler, and a
    Kubernetes deployment restarts their pods); `run --resume` then computes only the missing
    chunks and the store equals a clean run."""
    from distributed import Client

    logs = tmp_path / "logs"
    logs.mkdir()
    c = Cluster(logs)
    driver = None
    try:
        c.start_worker()
        c.start_worker()
        with Client(c.address, timeout="60s") as client:
            c.ensure_workers(client, 2)
        job = write_job(tmp_path, c.address)
        store = tmp_path / "store.zarr"
        env = {k: v for k, v in c.env.items() if k != rp.DELAY_ENV}
        driver = subprocess.Popen(
            [str(BIN / "dask-influence"), "run", str(job)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        _wait_for(lambda: _flags_done(store) >= 4 or driver.poll() is not None, 180, "4 chunks written")
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        os.kill(c.scheduler.pid, signal.SIGKILL)
        c.scheduler.wait(30)
        out, _ = driver.communicate(timeout=180)
        text = out.decode()
        assert driver.returncode == 1, text[-3000:]
        errors = [line.split("Error: ", 1)[1] for line in text.splitlines() if "Error: " in line]
        assert len(errors) == 1 and errors[0].startswith("lost the Dask scheduler"), text[-3000:]
        assert "rerun with --resume" in errors[0]
        assert "Traceback" not in text
        done_before = _flags_done(store)
        assert 0 < done_before < N_CHUNKS

        # the operator restarts the scheduler (same address) and the workers
        _wait_for(lambda: all(w.poll() is not None for w in c.workers), 120, "the orphaned workers to exit")
        c.scheduler = c.start_scheduler("scheduler-2")
        c.workers = []
        c.start_worker()
        c.start_worker()
        with Client(c.address, timeout="60s") as client:
            c.ensure_workers(client, 2)
        result = CliRunner().invoke(cli, ["run", str(job), "--resume", "--wait-for-lock", "90"])
        assert result.exit_code == 0, result.output
        missing = N_CHUNKS - done_before
        assert f"({N_CHUNKS}/{N_CHUNKS} chunks; {missing} computed, {done_before} already done)" in result.output
        assert_equals_clean(store, clean)
    finally:
        if driver is not None:
            stop([driver])
        c.stop()
