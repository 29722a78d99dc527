"""The factory of the batch job: 100,000 synthetic training points and a linear model.

``dask-influence run job.toml`` imports this module (``[model] factory =
"factory:make_problem"``) and calls ``make_problem()``, which returns the model, the loss
and the two datasets. Everything is seeded, so every call returns the same model and data:
``--resume`` relies on that (the store records a fingerprint of the fitted solver).

The data: ``y = x @ w + noise`` with 20 standard-normal features. One percent of the
training points are corrupted: their targets come from ``-w`` instead of ``w``. The model,
``nn.Linear(20, 1)`` in float64, is fitted by closed-form ridge regression (a 21 x 21 solve,
no training loop), so the corrupted points pull it slightly toward ``-w``. Their influence
on the clean test points is negative (harmful): the plot of mean influences shows them as
a separate cluster on the left.

``DASK_INFLUENCE_EXAMPLE_SMALL=1`` shrinks the problem to 2,000 training and 20 test points
(used by the tests). ``python factory.py suspects.txt`` writes the indices of the corrupted
training points, for ``dask-influence plot --suspects suspects.txt``.

The datasets are ``TensorDataset``s and the model and loss are standard torch modules: the
Dask workers unpickle them without importing this file.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

N_TRAIN, N_TEST, N_FEATURES = 100_000, 100, 20
SMALL_N_TRAIN, SMALL_N_TEST = 2_000, 20
CORRUPTED_FRACTION = 0.01
NOISE = 0.1
RIDGE = 1e-3
SEED = 0


def is_small() -> bool:
    """True when ``DASK_INFLUENCE_EXAMPLE_SMALL`` is set to a true value (1, true, yes)."""
    return os.environ.get("DASK_INFLUENCE_EXAMPLE_SMALL", "").strip().lower() in ("1", "true", "yes", "on")


def sizes(n_train: int | None = None, n_test: int | None = None) -> tuple[int, int]:
    small = is_small()
    return (n_train or (SMALL_N_TRAIN if small else N_TRAIN), n_test or (SMALL_N_TEST if small else N_TEST))


def corrupted_indices(n_train: int | None = None, seed: int = SEED) -> np.ndarray:
    """Sorted indices of the corrupted training points (1% of them, seeded)."""
    n_train, _ = sizes(n_train)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=max(1, int(CORRUPTED_FRACTION * n_train)), replace=False))


def make_problem(n_train: int | None = None, n_test: int | None = None, seed: int = SEED) -> dict:
    """The model, loss, train and test datasets of the batch job.

    Args:
        n_train, n_test: sizes (default 100,000 and 100, or 2,000 and 20 with
            ``DASK_INFLUENCE_EXAMPLE_SMALL=1``); settable from the job file through
            ``[model] options``.
        seed: seed of the data.

    Returns:
        ``{"model", "loss", "train", "test", "suspects"}``; ``suspects`` (the corrupted
        indices) is extra and ignored by ``dask-influence run``.
    """
    n_train, n_test = sizes(n_train, n_test)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N_FEATURES, 1, generator=gen, dtype=torch.float64)
    x = torch.randn(n_train + n_test, N_FEATURES, generator=gen, dtype=torch.float64)
    y = x @ w + NOISE * torch.randn(n_train + n_test, 1, generator=gen, dtype=torch.float64)
    suspects = torch.from_numpy(corrupted_indices(n_train, seed))
    y[suspects] = -(x[suspects] @ w) + NOISE * torch.randn(len(suspects), 1, generator=gen, dtype=torch.float64)

    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    model = nn.Linear(N_FEATURES, 1).double()
    _fit_ridge(model, x_train, y_train, RIDGE)
    model.eval()
    return {
        "model": model,
        "loss": nn.MSELoss(),
        "train": TensorDataset(x_train, y_train),
        "test": TensorDataset(x_test, y_test),
        "suspects": suspects.numpy(),
    }


def _fit_ridge(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    """Closed-form minimizer of ``mean((x w + b - y)^2) + ridge * |w|^2``."""
    n = x.shape[0]
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    penalty = ridge * n * torch.eye(design.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0.0  # no penalty on the bias
    coef = torch.linalg.solve(design.T @ design + penalty, design.T @ y)
    with torch.no_grad():
        model.weight.copy_(coef[:-1].T)
        model.bias.copy_(coef[-1])


if __name__ == "__main__":
    # python factory.py [suspects.txt]: write (or print) the corrupted training indices
    lines = "\n".join(str(i) for i in corrupted_indices()) + "\n"
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            fh.write(lines)
        print(f"Wrote {len(corrupted_indices())} corrupted training indices to {sys.argv[1]}.")
    else:
        sys.stdout.write(lines)
