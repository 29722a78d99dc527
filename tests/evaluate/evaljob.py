"""The job-file side of the CLI test: the factory and the train function of a small logistic regression.

Imported by `dask-influence run` / `evaluate` from the job's directory (a copy of this file
is written next to the job file in the test).
"""

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

N, NT, D, LAM = 60, 8, 3, 0.05
CORRUPTED = [0, 15, 30, 45]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + NT, D, generator=g, dtype=torch.float64)
    y = (x[:, :1] - x[:, 1:2] > 0).double()
    y[CORRUPTED] = 1 - y[CORRUPTED]
    return x[:N], y[:N], x[N:], y[N:]


def train(train_indices, seed, *, steps=40):
    """Newton's method on mean BCE over the subset + (LAM / 2) |theta|^2: the exact optimum."""
    x, y, _, _ = _data()
    idx = torch.as_tensor(np.asarray(train_indices), dtype=torch.long)
    xb = torch.cat([x[idx], torch.ones(len(idx), 1, dtype=torch.float64)], dim=1)
    t = y[idx, 0]
    theta = torch.zeros(D + 1, dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(xb @ theta)
        grad = xb.T @ (p - t) / len(idx) + LAM * theta
        if grad.abs().max() < 1e-13:
            break
        hess = (xb.T * (p * (1 - p))) @ xb / len(idx) + LAM * torch.eye(D + 1, dtype=torch.float64)
        theta = theta - torch.linalg.solve(hess, grad)
    return {"weight": theta[:D].reshape(1, D).clone(), "bias": theta[D:].clone()}


def make_problem():
    x, y, xt, yt = _data()
    model = nn.Linear(D, 1).double()
    model.load_state_dict(train(np.arange(N), 0))
    return {
        "model": model.eval(),
        "loss": nn.BCEWithLogitsLoss(),
        "train": TensorDataset(x, y),
        "test": TensorDataset(xt, yt),
    }
