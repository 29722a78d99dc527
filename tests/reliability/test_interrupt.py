"""Ctrl-C (SIGINT) and SIGTERM end `run` in one line saying how to resume, release the
store's lock, and a `--resume` then completes the store (issue 19)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

import reliability_problem as rp
from dask_influence.mapping.lock import lock_path
from dask_influence.mapping.store import is_complete

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_an_interrupted_run_says_how_to_resume_in_one_line(tmp_path, signum):
    job = rp.write_job(tmp_path, cluster="sequential = true")
    store = tmp_path / "store.zarr"
    # half a second per train block: the signal lands mid-run even when polling the flags is slow
    # (a loaded machine let a 0.1 s run finish before the signal arrived)
    env = {**os.environ, rp.DELAY_ENV: "0.5", "PYTHONPATH": str(HERE)}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    driver = subprocess.Popen(
        [str(BIN / "dask-influence"), "run", str(job), "--quiet"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # a shell that starts this suite in the background (`cmd &` without job control) gives
        # its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 180
        while rp.flags_done(store) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        os.kill(driver.pid, signum)
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    text = out.decode()
    assert driver.returncode == 130, text[-3000:]
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith("Interrupted. The store keeps every chunk written so far")
    assert "--resume" in text.strip().splitlines()[-1]
    assert not os.path.exists(lock_path(store))  # released on the way out
    done = subprocess.run(
        [str(BIN / "dask-influence"), "run", str(job), "--resume", "--quiet"],
        env={**env, rp.DELAY_ENV: "0"},
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    assert is_complete(zarr.open_group(str(store), mode="r"))
