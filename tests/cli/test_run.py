"""`dask-influence run` end to end: on the embedded LocalCluster, on a scheduler and two workers
started here as separate processes (the commands of the deployment manifests), and in this
process. Every store must equal the in-memory result."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

import dask_influence as di
from dask_influence.mapping.store import ATTR, is_complete
from dask_processes import free_port, scheduler_command, start, start_cluster, stop, worker_command
from jobs import invoke, load_example_factory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "batch_job"
BIN = Path(sys.executable).parent
N_TRAIN, N_TEST, TEST_BLOCK, TRAIN_BLOCK = 90, 14, 5, 32  # 3 x 3 chunks, ragged last blocks
N_CHUNKS = 9


def write_job(
    tmp_path, *, cluster="", output="top_k = 4\nself_influences = true", store="influences.zarr", name="job.toml"
):
    path = tmp_path / name
    path.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "factory:make_problem"
        path = "{EXAMPLE}"
        options = {{ n_train = {N_TRAIN}, n_test = {N_TEST} }}

        [solver]
        method = "direct"
        regularization = 1e-3

        [blocks]
        test = {TEST_BLOCK}
        train = {TRAIN_BLOCK}

        [output]
        store = "{store}"
        """)
        + output
        + "\n\n[cluster]\n"
        + cluster
        + "\n"
    )
    return path


@pytest.fixture(scope="module")
def expected():
    """The in-memory result of the job: influences, self-influences and perturbation influences."""
    factory = load_example_factory(EXAMPLE)
    problem = factory.make_problem(n_train=N_TRAIN, n_test=N_TEST)
    solver = di.DirectInfluence(problem["model"], problem["loss"], regularization=1e-3)
    solver.fit(DataLoader(problem["train"], batch_size=TRAIN_BLOCK))
    x, y = problem["train"].tensors
    xt, yt = problem["test"].tensors
    return {
        "up": solver.influences(xt, yt, x, y).numpy(),
        "self": solver.self_influences(x, y).numpy(),
        "perturbation": solver.influences(xt, yt, x, y, mode="perturbation").numpy(),
    }


def assert_store_equals(store, expected, *, top_k=4):
    group = zarr.open_group(str(store), mode="r")
    assert is_complete(group)
    values = group["influences"][...]
    assert values.shape == (N_TEST, N_TRAIN) and group["influences"].chunks == (TEST_BLOCK, TRAIN_BLOCK)
    np.testing.assert_allclose(values, expected["up"], rtol=1e-10, atol=1e-12 * np.abs(expected["up"]).max())
    np.testing.assert_allclose(group["self_influences"][...], expected["self"], rtol=1e-10)
    order = np.argsort(expected["up"], axis=1, kind="stable")
    np.testing.assert_array_equal(group["top_harmful_indices"][...], order[:, :top_k])
    np.testing.assert_array_equal(
        group["top_helpful_indices"][...], np.argsort(-expected["up"], axis=1, kind="stable")[:, :top_k]
    )
    return group


# -- embedded LocalCluster -----------------------------------------------------------------------


def test_run_on_the_embedded_local_cluster(tmp_path, expected, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    job = write_job(tmp_path, cluster='workers = 2\nthreads = 1\nmemory_limit = "1GiB"')
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    assert "on an embedded LocalCluster (2 workers x 1 thread)" in result.output
    assert (
        f"Complete: {tmp_path / 'influences.zarr'} ({N_CHUNKS}/{N_CHUNKS} chunks; {N_CHUNKS} computed" in result.output
    )
    assert_store_equals(tmp_path / "influences.zarr", expected)

    # an existing store is refused before anything is computed, naming both flags
    again = invoke("run", job)
    assert again.exit_code == 1
    assert again.output.strip().splitlines()[-1].startswith("Error: The output store")
    assert "--resume" in again.output and "--overwrite" in again.output


# -- a scheduler and two workers as separate processes ---------------------------------------------


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """`dask scheduler` and two `dask worker --nthreads 1` processes on 127.0.0.1; yields the address."""
    address, processes = start_cluster(tmp_path_factory.mktemp("dask-logs"))
    try:
        yield address
    finally:
        stop(processes)
        assert all(proc.poll() is not None for proc in processes)


def test_run_against_scheduler_processes_with_the_deployment_command(tmp_path, expected, scheduler):
    """`dask-influence run JOB --resume --scheduler ADDRESS`, as the Kubernetes job runs it."""
    job = write_job(tmp_path)
    command = [str(BIN / "dask-influence"), "run", str(job), "--resume", "--scheduler", scheduler]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"on the scheduler at {scheduler} (2 workers now)" in first.stderr
    assert f"({N_CHUNKS}/{N_CHUNKS} chunks; {N_CHUNKS} computed, 0 already done)" in first.stdout
    assert_store_equals(tmp_path / "influences.zarr", expected)

    # the same command again (a restarted job, here in this process) finds everything done
    second = invoke(*command[1:])
    assert second.exit_code == 0, second.output
    assert f"({N_CHUNKS}/{N_CHUNKS} chunks; 0 computed, {N_CHUNKS} already done)" in second.output
    assert invoke(*command[1:], "--quiet").output == ""
    assert_store_equals(tmp_path / "influences.zarr", expected)


def test_resume_computes_exactly_the_missing_chunks(tmp_path, expected, scheduler):
    job = write_job(tmp_path, cluster=f'scheduler = "{scheduler}"')  # the scheduler from the job file
    assert invoke("run", job, "--quiet").exit_code == 0
    store = tmp_path / "influences.zarr"
    # simulate a job killed halfway: three chunks lost, their flags unset, not complete
    group = zarr.open_group(str(store), mode="r+")
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        group["influences"][i * TEST_BLOCK : (i + 1) * TEST_BLOCK, j * TRAIN_BLOCK : (j + 1) * TRAIN_BLOCK] = np.nan
        group["influences_done"][i, j] = 0
    group["topk_done"][1] = 0
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}
    assert not is_complete(zarr.open_group(str(store), mode="r"))

    result = invoke("run", job, "--resume")
    assert result.exit_code == 0, result.output
    assert f"on the scheduler at {scheduler}" in result.output
    assert f"({N_CHUNKS}/{N_CHUNKS} chunks; 3 computed, 6 already done)" in result.output
    assert_store_equals(store, expected)


def test_scheduler_from_the_environment_wins_over_local_settings(tmp_path, expected, scheduler):
    job = write_job(tmp_path, cluster="workers = 7")
    result = invoke("run", job, "--overwrite", env={"DASK_SCHEDULER_ADDRESS": scheduler})
    assert result.exit_code == 0, result.output
    assert f"on the scheduler at {scheduler}" in result.output and "LocalCluster" not in result.output
    assert_store_equals(tmp_path / "influences.zarr", expected)


def test_the_example_job_in_small_mode(tmp_path, scheduler, monkeypatch):
    """examples/batch_job as shipped (copied here so the store lands in tmp_path)."""
    for name in ("job.toml", "factory.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    monkeypatch.setenv("DASK_INFLUENCE_EXAMPLE_SMALL", "1")
    result = invoke("run", tmp_path / "job.toml", "--scheduler", scheduler)
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "influences.zarr"), mode="r")
    assert is_complete(group) and group["influences"].shape == (20, 2000)
    # the corrupted training points are the harmful ones
    suspects = load_example_factory(tmp_path).corrupted_indices()
    mean = group["influences"][...].mean(axis=0)
    assert mean[suspects].mean() < 0 < np.delete(mean, suspects).mean()
    assert len(set(np.argsort(mean)[: len(suspects)]) & set(suspects)) >= len(suspects) // 2


# -- in this process, and errors ----------------------------------------------------------------


def test_sequential_perturbation_run(tmp_path, expected):
    job = write_job(tmp_path, cluster="sequential = true", output='mode = "perturbation"')
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    assert "in this process (sequential)" in result.output
    group = zarr.open_group(str(tmp_path / "influences.zarr"), mode="r")
    assert is_complete(group) and group.attrs[ATTR]["config"]["mode"] == "perturbation"
    np.testing.assert_allclose(
        group["influences"][...],
        expected["perturbation"],
        rtol=1e-10,
        atol=1e-12 * np.abs(expected["perturbation"]).max(),
    )


def test_exit_code_is_nonzero_unless_the_store_is_complete(tmp_path, monkeypatch):
    monkeypatch.setattr("dask_influence.mapping.store.is_complete", lambda group: False)
    result = invoke("run", write_job(tmp_path, cluster="sequential = true"), "--quiet")
    assert result.exit_code == 1
    assert "Error: The store" in result.output and "is incomplete" in result.output
    assert "rerun with --resume" in result.output


def test_errors_are_one_line_messages(tmp_path):
    job = write_job(tmp_path, cluster="sequential = true")
    # a job file with mistakes: every problem, one per line
    bad = tmp_path / "bad.toml"
    bad.write_text(job.read_text().replace("regularization", "regularisation").replace("train = 32", "train = 'x'"))
    result = invoke("run", bad)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {bad}: 2 problems:",
        "[solver] unknown key 'regularisation'; did you mean 'regularization'?",
        "[blocks] train must be a positive integer; got 'x'.",
    ]
    # a value the solver refuses: checked when the job file loads, with the solver's own message
    negative = tmp_path / "negative.toml"
    negative.write_text(job.read_text().replace("regularization = 1e-3", "regularization = -1.0"))
    result = invoke("run", negative, "--quiet")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    expected = f"Error: {negative}: [solver] regularization must be a finite number >= 0; got -1.0"
    assert result.output.startswith(expected)
    # a factory that cannot be imported
    missing = tmp_path / "missing.toml"
    missing.write_text(job.read_text().replace('"factory:make_problem"', '"no_such_module:make"'))
    result = invoke("run", missing, "--quiet")
    assert result.exit_code == 1 and "cannot import module 'no_such_module'" in result.output
    # flags and files
    assert invoke("run", job, "--resume", "--overwrite").exit_code == 2
    result = invoke("run", tmp_path / "nope.toml")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_unreachable_scheduler(tmp_path):
    import dask

    job = write_job(tmp_path)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = invoke("run", job, "--quiet", "--scheduler", f"tcp://127.0.0.1:{free_port()}")
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot connect to the Dask scheduler at tcp://127.0.0.1:")
    assert "(from --scheduler)" in result.output


def test_registered_as_a_dask_subcommand():
    result = subprocess.run(
        [str(BIN / "dask"), "influence", "run", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--scheduler ADDRESS" in result.stdout and "--resume" in result.stdout


# -- restarts as an orchestrator does them (issue 17, item 2) ------------------------------------


def test_a_restarted_driver_waits_for_the_killed_drivers_lock_and_resumes_exactly(tmp_path, expected, monkeypatch):
    """The old driver ran in another pid namespace (a killed pod): its lock cannot be checked by
    process id, only by heartbeat. `--wait-for-lock` takes it once stale and finishes the store."""
    from dask_influence.storage import lock as zlock

    job = write_job(tmp_path, cluster="sequential = true")
    store = tmp_path / "influences.zarr"
    result = invoke("run", job)  # a complete first run, then lose chunks as a killed driver would leave them
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(store), mode="r+")
    group["influences_done"][1, 1] = 0
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}
    now = time.time()
    info = zlock.LockInfo("old-pod", "old-pod", 1, None, "another-namespace", now, now, str(store))
    assert zlock._Files(zlock.lock_path(str(store))).create(info.to_json())
    monkeypatch.setattr(zlock, "STALE_SECONDS", 2.0)
    monkeypatch.setattr(zlock, "POLL_SECONDS", 0.2)
    refused = invoke("run", job, "--resume")
    assert refused.exit_code == 1 and "--wait-for-lock SECONDS" in refused.output
    result = invoke("run", job, "--resume", "--wait-for-lock", 30)
    assert result.exit_code == 0, result.output
    assert "Removed the lock" in result.output and "old-pod" in result.output
    assert_store_equals(store, expected)


def test_run_waits_for_workers_that_are_still_starting(tmp_path, expected):
    """A DaskJob starts its job pod and its workers together: `run --scheduler` waits for them.
    A `dask scheduler` process with no worker; then a `dask worker` process started 2 s into
    the run."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = [start(scheduler_command(port), logs / "s.log")]
    job = write_job(tmp_path)
    try:
        result = invoke("run", job, "--scheduler", address, "--timeout", 2)
        assert result.exit_code == 1, result.output
        assert "Error: only 0 of 1 worker(s) joined the Dask scheduler" in result.output
        assert len(result.output.strip().splitlines()[-1]) < 300  # one line, no traceback
        worker = worker_command(address, "late-worker")
        timer = threading.Timer(2.0, lambda: processes.append(start(worker, logs / "w.log")))
        timer.start()
        try:
            result = invoke("run", job, "--scheduler", address, "--timeout", 120)
        finally:
            timer.cancel()
        assert result.exit_code == 0, result.output
        assert "Waiting up to 120 s for 1 worker(s)" in result.output
        assert_store_equals(tmp_path / "influences.zarr", expected)
    finally:
        stop(processes)
