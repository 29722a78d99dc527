"""The evaluation tests' problem: L2-regularized logistic regression, retrained exactly by Newton.

The training objective on a subset ``S`` is

    J_S(theta) = (1 / n_scale) * sum_{j in S} BCE_j(theta) + (lambda / 2) |theta|^2,

with ``n_scale = n_train`` (``weighting="full"``: every other point keeps its weight, what the
influence predicts) or ``n_scale = |S|`` (``weighting="mean"``: the mean over the subset, how
people train). It is strictly convex; Newton's method from zero reaches the optimum to
float64 rounding, so retraining is deterministic (the seed is not used). The solver gets
``regularization = lambda``, so ``H + lambda I`` is the Hessian of ``J`` on all points.

:class:`NewtonTrainer` counts its calls in a file (one line per call) so that tests can count
retrainings across worker processes, and can be told to fail after some calls (an
interrupted evaluation).
"""

from __future__ import annotations

import os

import torch
from torch import nn

N_TRAIN = 80
N_TEST = 12
D = 4
LAMBDA = 0.05


def data(seed: int = 0):
    """``x (N_TRAIN, D)``, ``y (N_TRAIN, 1)`` in {0, 1} and the same for N_TEST test points (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_TEST
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    p = torch.sigmoid(x @ w + 0.3)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < p).double().unsqueeze(1)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


class NewtonTrainer:
    """``train(train_indices, seed) -> nn.Linear``: the exact optimum of ``J_S`` (see the module).

    Args:
        x, y: the whole training set.
        weighting: ``"full"`` or ``"mean"`` (see the module).
        count_file: a file that gets one line per call (``None``: no counting).
        fail_after: raise ``RuntimeError`` once the count file holds this many lines
            (``None``: never), before training.
        as_state_dict: return the state dict instead of the model.
    """

    def __init__(self, x, y, *, weighting="full", count_file=None, fail_after=None, as_state_dict=False, lam=LAMBDA):
        self.x, self.y = x, y
        self.weighting = weighting
        self.count_file = count_file
        self.fail_after = fail_after
        self.as_state_dict = as_state_dict
        self.lam = lam

    def calls(self) -> int:
        if self.count_file is None or not os.path.exists(self.count_file):
            return 0
        with open(self.count_file) as fh:
            return sum(1 for _ in fh)

    def __call__(self, train_indices, seed, init=None):
        if self.fail_after is not None and self.calls() >= self.fail_after:
            raise RuntimeError(f"simulated failure after {self.fail_after} retrainings")
        if self.count_file is not None:
            with open(self.count_file, "a") as fh:
                fh.write(f"{len(train_indices)} {seed}\n")
        idx = torch.as_tensor(train_indices, dtype=torch.long)
        x, y = self.x[idx], self.y[idx]
        scale = self.x.shape[0] if self.weighting == "full" else len(idx)
        xb = torch.cat([x, torch.ones(len(idx), 1, dtype=x.dtype)], dim=1)
        theta = torch.zeros(D + 1, dtype=torch.float64)
        if init is not None:
            theta = torch.cat([init["weight"].reshape(-1), init["bias"].reshape(-1)]).double()
        for _ in range(50):
            p = torch.sigmoid(xb @ theta)
            grad = xb.T @ (p - y[:, 0]) / scale + self.lam * theta
            if grad.abs().max() < 1e-13:
                break
            hess = (xb.T * (p * (1 - p))) @ xb / scale + self.lam * torch.eye(D + 1, dtype=torch.float64)
            theta = theta - torch.linalg.solve(hess, grad)
        model = make_model()
        with torch.no_grad():
            model.weight.copy_(theta[:D].reshape(1, D))
            model.bias.copy_(theta[D:])
        return model.state_dict() if self.as_state_dict else model


def make_model() -> nn.Module:
    return nn.Linear(D, 1).double()


def fitted_problem(weighting="full"):
    """The trained model, the loss, the data and the trainer (no counting)."""
    x, y, xt, yt = data()
    trainer = NewtonTrainer(x, y, weighting=weighting)
    model = trainer(torch.arange(N_TRAIN).numpy(), 0).eval()
    return model, nn.BCEWithLogitsLoss(), (x, y), (xt, yt), trainer
