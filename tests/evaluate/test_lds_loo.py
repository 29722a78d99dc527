"""LDS and leave-one-out against exact retraining of L2-regularized logistic regression.

The problem (``eval_problem.py``) is convex and retrained by Newton's method to float64
rounding, so retraining is deterministic and the first-order influence of the exact solver
is the right prediction up to second-order terms. The train function takes the mean loss
over the subset (as people train); the sign-flip, resume and reproducibility tests use it too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import dask_influence as di
from dask_influence.errors import StoreError
from eval_problem import LAMBDA, N_TEST, N_TRAIN, NewtonTrainer, data, fitted_problem


@pytest.fixture(scope="module")
def problem():
    model, loss, train, test, trainer = fitted_problem("mean")
    solver = di.DirectInfluence(model, loss, regularization=LAMBDA).fit(train)
    scores = solver.influences(*test, *train)
    return model, loss, train, test, trainer, scores


def test_direct_lds_is_high_and_flips_with_the_sign(problem):
    model, loss, _, test, trainer, scores = problem
    r = di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=30, fraction=0.5, seed=3)
    print(f"LDS of Direct: {r.mean:.4f} [{r.interval[0]:.4f}, {r.interval[1]:.4f}]")
    assert r.mean >= 0.9
    assert r.interval[0] <= r.mean <= r.interval[1]
    assert r.per_test.shape == (N_TEST,) and np.isfinite(r.per_test).all()
    assert r.predictions.shape == r.measurements.shape == (30, N_TEST)
    assert r.subsets.shape == (30, N_TRAIN) and (r.subsets.sum(axis=1) == N_TRAIN // 2).all()
    assert r.retrained == 30 and r.skipped == 0
    flipped = di.evaluate.lds(-scores, retrain=trainer, test=test, task=loss, n_subsets=30, fraction=0.5, seed=3)
    np.testing.assert_allclose(flipped.per_test, -r.per_test, atol=1e-12)
    assert flipped.mean <= -0.9


def test_prediction_is_the_sum_over_the_removed_points(problem):
    """The documented convention: prediction = (1/n) sum_{j not in S} influence[i, j]."""
    *_, scores = problem
    masks = di.evaluate.draw_subsets(N_TRAIN, 4, 0.25, seed=1)
    out = di.evaluate.lds_from(scores, masks, np.random.default_rng(0).normal(size=(4, N_TEST)))
    expected = np.stack([scores.numpy()[:, ~m].sum(axis=1) / N_TRAIN for m in masks])
    np.testing.assert_allclose(out["predictions"], expected, rtol=1e-12)


def test_loo_pearson_against_retraining(problem):
    model, loss, train, test, trainer, scores = problem
    points = di.evaluate.random_points(N_TRAIN, 16, seed=0)
    r = di.evaluate.loo(scores, retrain=trainer, test=test, task=loss, points=points)
    print(f"LOO Pearson of Direct: {r.pearson:.5f} (per test point {np.nanmean(r.per_test):.5f})")
    assert r.pearson >= 0.99
    assert np.nanmin(r.per_test) >= 0.99
    assert r.retrained == 17  # the base and one per point
    # the base retraining reproduces the trained model (deterministic Newton)
    np.testing.assert_allclose(r.base, di.evaluate.measure(model, di.core.task.as_task(loss), test), rtol=1e-10)
    # the predicted change is influence / n, with the sign of the convention
    np.testing.assert_allclose(r.predicted, scores.numpy()[:, points] / N_TRAIN, rtol=1e-12)


def test_loo_of_top_points_with_state_dicts_and_warm_start(problem):
    model, loss, train, test, trainer, scores = problem
    returns_state = NewtonTrainer(*train, weighting="full", as_state_dict=True)
    points = di.evaluate.top_points(scores, 0, 4)
    assert points.size == 8
    assert scores[0, points[0]] == scores[0].max() and scores[0, points[4]] == scores[0].min()
    r = di.evaluate.loo(
        scores, retrain=returns_state, test=test, task=loss, points=points, model=model, warm_start=True
    )
    print(f"LOO Pearson, top-4 of test point 0, warm start: {r.pearson:.5f}")
    assert r.pearson >= 0.99
    with pytest.raises(ValueError, match="warm_start=True .* pass model="):
        di.evaluate.loo(scores, retrain=returns_state, test=test, task=loss, points=points, warm_start=True)
    with pytest.raises(TypeError, match="returned a state dict; pass model="):
        di.evaluate.loo(scores, retrain=returns_state, test=test, task=loss, points=points[:2])


def test_subsets_are_reproducible_from_the_recorded_seed(problem, tmp_path):
    model, loss, train, test, trainer, scores = problem
    store = str(tmp_path / "eval.zarr")
    r = di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=5, seed=11, store=store)
    group = zarr.open_group(store, mode="r")["evaluation/lds"]
    config = group.attrs["dask_influence_evaluation"]["config"]
    again = di.evaluate.draw_subsets(config["n_train"], config["n_subsets"], config["fraction"], config["seed"])
    np.testing.assert_array_equal(again, np.asarray(group["subsets"][...]))
    np.testing.assert_array_equal(again, r.subsets)
    for m in range(5):
        np.testing.assert_array_equal(np.nonzero(again[m])[0], di.evaluate.draw_subset(N_TRAIN, 0.5, 11, m))
    assert config["training_seeds"] == di.evaluate.training_seeds(11, 1) == r.training_seeds
    other = di.evaluate.draw_subsets(N_TRAIN, 5, 0.5, seed=12)
    assert not np.array_equal(other, again)


def test_interrupted_evaluation_resumes_with_only_the_missing_runs(problem, tmp_path):
    model, loss, train, test, _, scores = problem
    store = str(tmp_path / "eval.zarr")
    counter = str(tmp_path / "calls.txt")
    # in this process (client=False), even when the session's cluster is the current client
    kwargs = dict(test=test, task=loss, n_subsets=8, seeds=2, seed=5, store=store, client=False)
    failing = NewtonTrainer(*train, weighting="mean", count_file=counter, fail_after=6)
    with pytest.raises(RuntimeError, match="simulated failure after 6"):
        di.evaluate.lds(scores, retrain=failing, **kwargs)
    flags = np.asarray(zarr.open_group(store, mode="r")["evaluation/lds/measurements_done"][...])
    assert flags.sum() == 6
    resumed = di.evaluate.lds(scores, retrain=NewtonTrainer(*train, weighting="mean", count_file=counter), **kwargs)
    assert (resumed.retrained, resumed.skipped) == (10, 6)
    with open(counter) as fh:
        assert sum(1 for _ in fh) == 16  # every run trained exactly once
    fresh = di.evaluate.lds(scores, retrain=NewtonTrainer(*train, weighting="mean"), **{**kwargs, "store": None})
    np.testing.assert_allclose(resumed.measurements, fresh.measurements, rtol=1e-12)
    np.testing.assert_array_equal(resumed.per_test, fresh.per_test)
    # a third call finds everything done
    done = di.evaluate.lds(scores, retrain=NewtonTrainer(*train, weighting="mean", count_file=counter), **kwargs)
    assert (done.retrained, done.skipped) == (0, 16)
    result = zarr.open_group(store, mode="r")["evaluation/lds"].attrs["dask_influence_evaluation"]["result"]
    assert result["lds_mean"] == pytest.approx(fresh.mean)


def test_another_configuration_under_the_same_name_is_refused(problem, tmp_path):
    model, loss, train, test, trainer, scores = problem
    store = str(tmp_path / "eval.zarr")
    di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=3, store=store)
    with pytest.raises(StoreError, match="n_subsets 3 -> 4.*overwrite=True"):
        di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=4, store=store)
    r = di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=4, store=store, overwrite=True)
    assert r.retrained == 4
    r2 = di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=3, store=store, name="lds_small")
    assert r2.retrained == 3
    assert set(di.evaluate.read_evaluations(zarr.open_group(store, mode="r"))) == {"lds", "lds_small"}


def test_scores_from_a_store_and_a_task(problem, tmp_path):
    """A store written by influences_to_zarr is scored in place; a Task measures like its pair loss."""
    model, loss, train, test, trainer, scores = problem
    solver = di.DirectInfluence(model, loss, regularization=LAMBDA).fit(train)
    store = str(tmp_path / "scores.zarr")
    di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
        test, train, store, test_block_size=5, train_block_size=32
    )
    source = di.evaluate.as_scores(store)
    masks = di.evaluate.draw_subsets(N_TRAIN, 3, 0.5, seed=0)
    np.testing.assert_allclose(source.subset_sums(masks), scores.numpy() @ masks.T, rtol=1e-10)
    np.testing.assert_allclose(source.columns(np.array([3, 40, 79])), scores.numpy()[:, [3, 40, 79]], rtol=1e-12)
    np.testing.assert_array_equal(di.evaluate.top_points(store, 2, 3), di.evaluate.top_points(scores, 2, 3))
    task = di.Task(loss=lambda m, b: torch.nn.functional.binary_cross_entropy_with_logits(m(b["x"]), b["y"]))
    x_test, y_test = test
    from_store = di.evaluate.lds(store, retrain=trainer, test={"x": x_test, "y": y_test}, task=task, n_subsets=6)
    in_memory = di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=6)
    np.testing.assert_allclose(from_store.measurements, in_memory.measurements, rtol=1e-12)
    np.testing.assert_allclose(from_store.per_test, in_memory.per_test, rtol=1e-10)
    assert from_store.store == store
    assert "lds" in zarr.open_group(store, mode="r")["evaluation"]
    # the evaluation group does not disturb a resumed computation of the store
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    calc.influences_to_zarr(test, train, store, test_block_size=5, train_block_size=32, resume=True)
    assert calc.last_run_["chunks_computed"] == 0
    assert "lds" in zarr.open_group(store, mode="r")["evaluation"]


def test_bad_inputs_name_the_fix(problem):
    model, loss, train, test, trainer, scores = problem
    common = dict(retrain=trainer, task=loss)
    with pytest.raises(ValueError, match="test has 5 points but scores have 12 rows"):
        di.evaluate.lds(scores, test=(test[0][:5], test[1][:5]), **common)
    with pytest.raises(ValueError, match="fraction must be a number between 0 and 1"):
        di.evaluate.lds(scores, test=test, fraction=1.5, **common)
    with pytest.raises(ValueError, match="n_subsets must be an integer of at least 2"):
        di.evaluate.lds(scores, test=test, n_subsets=1, **common)
    with pytest.raises(ValueError, match="points must be training indices from 0 to 79"):
        di.evaluate.loo(scores, test=test, points=[3, 80], **common)
    with pytest.raises(TypeError, match="scores must be an influence matrix"):
        di.evaluate.lds({"a": 1}, test=test, **common)
    with pytest.raises(StoreError, match="No store at"):
        di.evaluate.lds("/nonexistent/scores.zarr", test=test, **common)


def test_mislabel_detection_auc():
    """Flipped labels are found by self-influence and by mean influence (no retraining)."""
    x, _, xt, _ = data(seed=1)
    y = (x[:, :1] + x[:, 1:2] > 0).double()  # a clean linear rule, then 8 labels flipped
    yt = (xt[:, :1] + xt[:, 1:2] > 0).double()
    flipped = np.arange(0, 80, 10)
    y[flipped] = 1 - y[flipped]
    trainer = NewtonTrainer(x, y, weighting="mean")
    model = trainer(np.arange(N_TRAIN), 0)
    solver = di.DirectInfluence(model, torch.nn.BCEWithLogitsLoss(), regularization=LAMBDA).fit((x, y))
    aucs = di.evaluate.mislabel_detection(
        flipped, scores=solver.influences(xt, yt, x, y), self_influences=solver.self_influences(x, y)
    )
    print(f"mislabel AUCs: {aucs}")
    assert aucs["self_influence"] >= 0.85
    assert aucs["mean_influence"] >= 0.85
    assert di.evaluate.mislabel_auc([3.0, 1.0, 2.0, 0.0], [0, 2]) == 1.0
    assert di.evaluate.mislabel_auc([3.0, 1.0, 2.0, 0.0], [0, 2], higher_is_suspicious=False) == 0.0


def test_an_evaluation_takes_the_store_lock(problem, tmp_path):
    """While another job holds the store's lock (a `run --resume`), an evaluation into that store is
    refused before it retrains; the lock is released after an evaluation, so the next one runs."""
    from dask_influence.storage.lock import StoreLock

    model, loss, train, test, trainer, scores = problem
    store = str(tmp_path / "eval.zarr")
    with StoreLock(store), pytest.raises(StoreError, match="lock"):
        di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=3, store=store)
    first = di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=3, store=store)
    again = di.evaluate.loo(scores, retrain=trainer, test=test, task=loss, points=[0, 1], store=store)
    assert first.retrained == 3 and again.retrained > 0
