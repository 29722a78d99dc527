"""Shared tiny seeded fixtures; the problems, references and solver cases live in ``cases.py``."""

from __future__ import annotations

import pytest
import torch

from cases import mlp_classification_problem, mlp_regression_problem

# The suite's models are tiny: intra-op threads only add synchronization (OpenMP workers
# spin-waiting on a shared 2-core machine made the core suite ~5x slower in CPU time).
torch.set_num_threads(1)


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster_client():
    """ONE LocalCluster of 2 single-threaded worker processes on 127.0.0.1 for the whole session.

    Shared by the mapping and fitting tests (one cluster alive at a time, not one per folder)
    and stopped at the end of the session. Tests that kill workers start their own.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def fit_client(cluster_client):
    """The session's 2-worker cluster, under the name the fitting tests use."""
    return cluster_client


@pytest.fixture
def mlp_regression():
    """A 3-6-1 tanh MLP (31 parameters) with MSE on 24 training and 5 test points, float64."""
    return mlp_regression_problem()


@pytest.fixture
def mlp_classification():
    """A 3-5-3 tanh MLP (38 parameters) with cross entropy on 24 training and 5 test points."""
    return mlp_classification_problem()
