"""A 2-worker LocalCluster for the fitting tests (separate worker processes on 127.0.0.1)."""

import pytest


@pytest.fixture(scope="session")
def fit_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client
