"""A deterministic small problem for the fault-injection tests, importable by worker processes.

Worker processes started by the tests get this directory on their ``PYTHONPATH`` (the
training set is pickled by reference to :class:`SlowDataset`), and ``DI_TEST_BLOCK_DELAY``
in their environment: each block load then sleeps that many seconds, so that a job runs
long enough to be interrupted mid-way. Without the variable (the driver, a clean run in the
test process) nothing sleeps.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

N_TRAIN, N_TEST, N_FEATURES, N_CLASSES = 600, 20, 6, 3
TRAIN_BLOCK, TEST_BLOCK = 20, 10  # 2 x 30 chunks
DELAY_ENV = "DI_TEST_BLOCK_DELAY"


class SlowDataset(Dataset):
    """A TensorDataset whose first item of each block sleeps ``$DI_TEST_BLOCK_DELAY`` seconds."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, block: int):
        self.x, self.y, self.block = x, y, block

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i % self.block == 0:
            delay = float(os.environ.get(DELAY_ENV, "0") or 0)
            if delay:
                time.sleep(delay)
        return self.x[i], self.y[i]


def make_problem(n_train: int = N_TRAIN, n_test: int = N_TEST, block: int = TRAIN_BLOCK) -> dict:
    """An untrained (seeded) float64 tanh MLP with cross entropy; no training, so that every
    process builds bit-identical weights whatever its thread count."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n_train, N_FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n_train,), generator=g)
    xt = torch.randn(n_test, N_FEATURES, generator=g, dtype=torch.float64)
    yt = torch.randint(0, N_CLASSES, (n_test,), generator=g)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.Tanh(), nn.Linear(8, N_CLASSES)).double().eval()
    return {
        "model": model,
        "loss": nn.CrossEntropyLoss(),
        "train": SlowDataset(x, y, block),
        "test": TensorDataset(xt, yt),
    }


def write_job(directory, *, cluster: str, output: str = "") -> str:
    """A job file in ``directory`` running :func:`make_problem` with Direct (GGN), its store
    ``directory/store.zarr``; ``cluster`` and ``output`` are extra lines of those sections."""
    import textwrap
    from pathlib import Path

    here = Path(__file__).resolve().parent
    job = Path(directory) / "job.toml"
    job.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "reliability_problem:make_problem"
        path = "{here}"

        [solver]
        method = "direct"
        regularization = 0.1
        curvature = "ggn"

        [blocks]
        test = {TEST_BLOCK}
        train = {TRAIN_BLOCK}

        [output]
        store = "{Path(directory) / "store.zarr"}"
        """)
        + (output + "\n" if output else "")
        + "\n[cluster]\n"
        + cluster
        + "\n"
    )
    return str(job)


def flags_done(store) -> int:
    """How many influence chunks of ``store`` are flagged done by the first fit (0 before it exists)."""
    import numpy as np
    import zarr

    try:
        return int((np.asarray(zarr.open_group(str(store), mode="r")["influences_done"][...]) == 1).sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


TRAIN_DELAY_ENV = "DI_TEST_TRAIN_DELAY"


def slow_train(train_indices, seed):
    """A retraining for evaluation tests (``[evaluate] retrain``): sleeps ``$DI_TEST_TRAIN_DELAY``
    seconds, then returns the problem's (untrained, seeded) model, so that an evaluation lasts
    long enough to be interrupted."""
    delay = float(os.environ.get(TRAIN_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    return make_problem()["model"]
