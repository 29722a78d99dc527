"""Fixtures for the mapping layer: a small fitted solver (the 2-worker cluster is in tests/conftest.py)."""

import pytest

import dask_influence as di
from cases import mapping_problem


@pytest.fixture(scope="session")
def problem():
    model, loss, train, test = mapping_problem()
    solver = di.DirectInfluence(model, loss, regularization=0.05).fit(train)
    return solver, train, test
