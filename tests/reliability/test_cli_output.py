"""What `dask-influence run` prints on an embedded LocalCluster when it fails or is
interrupted (issue 31, items 14 and 18), read from the real stdout and stderr of a child
process (the worker processes write to them too):

- an error of the data is one `Error:` line, on its own line (not after the progress bar's
  erase sequence), without Dask's "Compute Failed" block or the teardown's tracebacks;
- Ctrl-C in a terminal (SIGINT to the whole process group: driver and workers) prints no
  worker `KeyboardInterrupt` traceback before the resume line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import reliability_problem as rp

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.cluster, pytest.mark.subprocess, pytest.mark.slow]

NAN_FACTORY = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    xt = x[:5].clone()
    xt[1, 2] = float("nan")
    return {"model": nn.Linear(4, 3).double().eval(), "loss": nn.CrossEntropyLoss(),
            "train": TensorDataset(x, y), "test": TensorDataset(xt, y[:5])}
"""


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", **extra}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite started in the background ignores it


def test_an_error_on_the_embedded_cluster_is_one_line_of_its_own(tmp_path):
    (tmp_path / "nanfactory.py").write_text(NAN_FACTORY)
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "nanfactory:make"
        path = "{tmp_path}"

        [solver]
        method = "direct"
        regularization = 0.1

        [blocks]
        test = 5
        train = 10

        [output]
        store = "{tmp_path / "out.zarr"}"

        [cluster]
        workers = 2
        """)
    )
    done = subprocess.run(
        [str(BIN / "dask-influence"), "run", str(job)],  # not quiet: with the progress bar
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    text = done.stdout.decode()
    assert done.returncode == 1, text[-3000:]
    assert "Compute Failed" not in text and "Traceback" not in text and "distributed." not in text, text[-3000:]
    lines = text.rstrip("\n").split("\n")
    assert lines[-1] == (
        "Error: x_test contains 1 NaN/Inf value(s) (first at index (1, 2)). Clean or impute the data before "
        "computing influences."
    )
    # the job's progress line (dask_influence.progress), ended before the error
    assert lines[-2] == "  Influences: chunks of 5 test x 30 training points: 0 of 3 chunks"


def test_ctrl_c_on_the_embedded_cluster_prints_no_worker_traceback(tmp_path):
    job = rp.write_job(tmp_path, cluster="workers = 1")
    store = tmp_path / "store.zarr"
    driver = subprocess.Popen(
        [str(BIN / "dask-influence"), "run", job, "--quiet"],
        env=_env(**{rp.DELAY_ENV: "0.5"}),  # the worker sleeps per train block: the run lasts ~15 s
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 300
        while rp.flags_done(store) < 1 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the driver and its worker processes
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text = out.decode()
    assert driver.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("Interrupted. The store keeps every chunk written so far")
