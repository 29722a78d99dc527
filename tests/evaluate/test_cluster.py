"""Retraining on the Dask cluster: one task per run, written by the worker, resumed after a failure."""

from __future__ import annotations

import time

import cloudpickle
import numpy as np
import pytest
import zarr

import dask_influence as di
import eval_problem
from eval_problem import LAMBDA, NewtonTrainer, fitted_problem

cloudpickle.register_pickle_by_value(eval_problem)  # the workers need not import the test folder


@pytest.fixture(scope="module")
def problem():
    model, loss, train, test, trainer = fitted_problem("mean")
    scores = di.DirectInfluence(model, loss, regularization=LAMBDA).fit(train).influences(*test, *train)
    return model, loss, train, test, scores


def _wait_idle(client, timeout=60.0):
    """Until no task runs on the cluster (a cancelled run still finishes, and writes, on its worker)."""
    deadline = time.monotonic() + timeout
    while any(client.processing().values()):
        assert time.monotonic() < deadline, "the cluster did not become idle"
        time.sleep(0.1)


def test_cluster_runs_equal_the_runs_in_this_process(problem, cluster_client, tmp_path):
    model, loss, train, test, scores = problem
    kwargs = dict(retrain=NewtonTrainer(*train, weighting="mean"), test=test, task=loss, n_subsets=10, seed=2)
    on_cluster = di.evaluate.lds(scores, client=cluster_client, store=str(tmp_path / "e.zarr"), **kwargs)
    in_process = di.evaluate.lds(scores, **kwargs)
    assert on_cluster.retrained == 10
    np.testing.assert_allclose(on_cluster.measurements, in_process.measurements, rtol=1e-12)
    assert on_cluster.mean == pytest.approx(in_process.mean, abs=1e-12)
    assert on_cluster.mean >= 0.9
    # the workers wrote the rows: the store holds them all, flagged
    group = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")["evaluation/lds"]
    assert np.asarray(group["measurements_done"][...]).sum() == 10


def test_cluster_failure_then_resume_retrains_only_the_missing_runs(problem, cluster_client, tmp_path):
    model, loss, train, test, scores = problem
    store = str(tmp_path / "e.zarr")
    counter = str(tmp_path / "calls.txt")
    kwargs = dict(test=test, task=loss, n_subsets=6, seeds=2, seed=4, store=store, client=cluster_client)
    with pytest.raises(RuntimeError, match="simulated failure"):
        di.evaluate.lds(
            scores, retrain=NewtonTrainer(*train, weighting="mean", count_file=counter, fail_after=5), **kwargs
        )
    _wait_idle(cluster_client)
    done_before = int(np.asarray(zarr.open_group(store, mode="r")["evaluation/lds/measurements_done"][...]).sum())
    assert 5 <= done_before < 12
    resumed = di.evaluate.lds(scores, retrain=NewtonTrainer(*train, weighting="mean", count_file=counter), **kwargs)
    assert (resumed.retrained, resumed.skipped) == (12 - done_before, done_before)
    with open(counter) as fh:
        assert sum(1 for _ in fh) == 12  # no run trained twice
    reference = di.evaluate.lds(
        scores, retrain=NewtonTrainer(*train, weighting="mean"), test=test, task=loss, n_subsets=6, seeds=2, seed=4
    )
    np.testing.assert_allclose(resumed.measurements, reference.measurements, rtol=1e-12)
    assert resumed.mean == pytest.approx(reference.mean, abs=1e-12)
