"""Fixtures for the mapping layer: a small fitted solver (the 2-worker cluster is in tests/conftest.py)."""

import pytest
import torch
from torch import nn

import dask_influence as di


def make_problem(n_train=53, n_test=17, n_features=4, n_classes=3, seed=0):
    """A small float64 tanh MLP (fitted loosely) on random classification data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, n_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n_train,), generator=g)
    xt = torch.randn(n_test, n_features, generator=g, dtype=torch.float64)
    yt = torch.randint(0, n_classes, (n_test,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_features, 6), nn.Tanh(), nn.Linear(6, n_classes)).double()
    loss = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    model.eval()
    return model, loss, (x, y), (xt, yt)


@pytest.fixture(scope="session")
def problem():
    model, loss, train, test = make_problem()
    solver = di.DirectInfluence(model, loss, regularization=0.05).fit(train)
    return solver, train, test

