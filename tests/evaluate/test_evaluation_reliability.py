"""Evaluations held to the influence store's standard (issue 31, items 8-11).

A shuffling test DataLoader is refused as the calculators refuse it; a fraction whose subsets
are degenerate is refused with the fractions that work, and a NaN LDS comes with a warning;
errors of the train function and NaN retrained models name the run; results record the scores
they belong to and are kept per scores; the evaluation store verifies what it reads (a missing
or damaged chunk is named and a rerun repairs exactly it), and so does reading a scores store.
"""

from __future__ import annotations

import os
import pickle
import warnings

import cloudpickle
import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
import eval_problem
from dask_influence.errors import NonFiniteError, StoreError
from dask_influence.evaluate import RetrainingError
from eval_problem import LAMBDA, N_TRAIN, NewtonTrainer, fitted_problem

cloudpickle.register_pickle_by_value(eval_problem)  # the workers need not import the test folder


@pytest.fixture(scope="module")
def problem():
    model, loss, train, test, trainer = fitted_problem("mean")
    scores = di.DirectInfluence(model, loss, regularization=LAMBDA).fit(train).influences(*test, *train)
    return model, loss, train, test, trainer, scores


# -- item 8: a shuffling test DataLoader ------------------------------------------------------------
def test_a_shuffling_test_loader_is_refused_as_the_calculators_refuse_it(problem):
    model, loss, train, test, trainer, scores = problem
    shuffled = DataLoader(TensorDataset(*test), batch_size=4, shuffle=True)
    common = dict(retrain=trainer, task=loss, test=shuffled)
    message = (
        "The test DataLoader shuffles (shuffle=True), but the rows and columns of the influence matrix follow "
        "the dataset order. Pass DataLoader(dataset, batch_size=4, shuffle=False) instead"
    )
    for call in (
        lambda: di.evaluate.lds(scores, n_subsets=3, **common),
        lambda: di.evaluate.loo(scores, points=[1, 2], **common),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).startswith(message)
    # the same loader without shuffling is the test batch, in order
    ordered = DataLoader(TensorDataset(*test), batch_size=4, shuffle=False)
    a = di.evaluate.lds(scores, retrain=trainer, task=loss, test=ordered, n_subsets=4)
    b = di.evaluate.lds(scores, retrain=trainer, task=loss, test=test, n_subsets=4)
    np.testing.assert_array_equal(a.measurements, b.measurements)


# -- item 9: degenerate subsets ---------------------------------------------------------------------
def test_fractions_giving_degenerate_subsets_are_refused_with_the_fractions_that_work(problem):
    model, loss, train, test, trainer, scores = problem
    common = dict(retrain=trainer, task=loss, test=test, n_subsets=3)
    with pytest.raises(ValueError) as err:
        di.evaluate.lds(scores, fraction=0.995, **common)
    assert str(err.value) == (
        "fraction=0.995 keeps round(0.995 * 80) = 80 of the 80 training points (all 80 training points): every "
        "subset would be the whole training set and the LDS undefined. Pass a fraction from 0.0125 to 0.9875 "
        "(e.g. 0.5)."
    )
    with pytest.raises(ValueError, match=r"round\(0.005 \* 80\) = 0 of the 80 training points \(no training "):
        di.evaluate.lds(scores, fraction=0.005, **common)
    with pytest.raises(ValueError, match="from 0.0125 to 0.9875"):
        di.evaluate.draw_subsets(N_TRAIN, 3, 0.999, seed=0)
    # the ends of the range work: one point kept, one point left out
    assert di.evaluate.draw_subsets(N_TRAIN, 3, 0.0125, seed=0).sum(axis=1).tolist() == [1, 1, 1]
    r = di.evaluate.lds(scores, fraction=0.9875, **common)
    assert r.subsets.sum(axis=1).tolist() == [79, 79, 79] and np.isfinite(r.per_test).all()


def test_a_nan_lds_comes_with_a_warning_that_says_why(problem):
    model, loss, train, test, trainer, scores = problem

    def ignores_its_indices(indices, seed):
        return trainer(np.arange(N_TRAIN), seed)  # always the full training set

    with pytest.warns(RuntimeWarning) as caught:
        r = di.evaluate.lds(scores, retrain=ignores_its_indices, task=loss, test=test, n_subsets=4)
    assert np.isnan(r.mean) and np.isnan(r.per_test).all()
    assert [str(w.message) for w in caught] == [
        "The LDS is undefined (NaN) for 12 of 12 test points: 12 measure the same after every retraining (does "
        "the train function use its train_indices?); the mean is NaN."
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the LDS is defined
        di.evaluate.lds(scores, retrain=trainer, task=loss, test=test, n_subsets=4)


# -- item 10: errors name the run -------------------------------------------------------------------
def test_an_error_of_the_train_function_names_the_subset_and_the_seed(problem):
    model, loss, train, test, trainer, scores = problem
    seed = di.evaluate.training_seeds(0, 2)[1]
    failing_subset = set(di.evaluate.draw_subset(N_TRAIN, 0.5, 0, 2).tolist())

    def fails_on_subset_2(indices, s):
        if set(indices.tolist()) == failing_subset and s == seed:
            raise ValueError("singular matrix in my solver")
        return trainer(indices, s)

    with pytest.raises(RetrainingError) as err:
        di.evaluate.lds(scores, retrain=fails_on_subset_2, task=loss, test=test, n_subsets=4, seeds=2)
    assert str(err.value) == (
        f"The train function failed in subset 2 of 4 (40 of 80 training points, drawn with seed 0), training seed "
        f"{seed}: ValueError: singular matrix in my solver"
    )
    assert isinstance(err.value, RuntimeError) and isinstance(err.value.__cause__, ValueError)
    # it travels from a Dask worker intact
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)


@pytest.mark.cluster
def test_on_a_cluster_the_error_names_the_run_too(problem, cluster_client):
    model, loss, train, test, trainer, scores = problem
    failing_subset = set(di.evaluate.draw_subset(N_TRAIN, 0.5, 0, 1).tolist())

    def fails_on_subset_1(indices, s):
        if set(indices.tolist()) == failing_subset:
            raise ValueError("out of memory on this worker")
        return trainer(indices, s)

    with pytest.raises(RetrainingError, match=r"^The train function failed in subset 1 of 3 \(40 of 80 training "):
        di.evaluate.lds(scores, retrain=fails_on_subset_1, task=loss, test=test, n_subsets=3, client=cluster_client)


def test_a_nan_retrained_model_names_the_left_out_point(problem):
    model, loss, train, test, trainer, scores = problem

    def diverges_without_7(indices, s):
        out = trainer(indices, s)
        if 7 not in indices.tolist():
            with torch.no_grad():
                out.bias.fill_(float("nan"))
        return out

    with pytest.raises(NonFiniteError) as err:
        di.evaluate.loo(scores, retrain=diverges_without_7, task=loss, test=test, points=[3, 7])
    seed = di.evaluate.training_seeds(0, 1)[0]
    assert str(err.value) == (
        f"In the run leaving out training point 7, training seed {seed}, the retrained model's measurement is nan "
        "on test point 0; the retraining diverged: check the train function (learning rate, regularization)."
    )

    def returns_a_string(indices, s):
        return "model.pt"

    with pytest.raises(TypeError, match="^In the base run on all 80 training points, training seed .*, the train "):
        di.evaluate.loo(scores, retrain=returns_a_string, task=loss, test=test, points=[3])


# -- item 11: results record the scores they belong to ----------------------------------------------
def test_rerun_with_other_scores_reuses_the_runs_and_keeps_each_scores_result(problem, tmp_path):
    model, loss, train, test, trainer, scores = problem
    store = str(tmp_path / "e.zarr")
    common = dict(retrain=trainer, task=loss, test=test, n_subsets=6, store=store)
    first = di.evaluate.lds(scores, **common)
    fp_first = di.evaluate.MatrixScores(scores).fingerprint()
    assert first.scores == fp_first and fp_first.startswith("matrix:")
    other = scores.clone()
    other[:, :40] = 0.0  # another method's scores: the same runs, another LDS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # several methods against one set of runs: the intended use
        second = di.evaluate.lds(other, **common)
    assert (second.retrained, second.skipped) == (0, 6)
    assert second.scores != fp_first
    assert not np.allclose(second.per_test, first.per_test)
    group = zarr.open_group(store, mode="r")["evaluation/lds"]
    attrs = group.attrs["dask_influence_evaluation"]
    assert attrs["result"]["scores"] == second.scores
    assert set(attrs["results"]) == {fp_first, second.scores}
    assert attrs["results"][fp_first]["lds_mean"] == pytest.approx(first.mean)
    kept = np.asarray(group[f"results/{fp_first.replace(':', '-')}/lds"][...])
    np.testing.assert_array_equal(kept, first.per_test)
    np.testing.assert_array_equal(np.asarray(group["lds"][...]), second.per_test)  # the latest, at the top
    recorded = di.evaluate.read_evaluations(zarr.open_group(store, mode="r"))["lds"]
    assert set(recorded["results"]) == {fp_first, second.scores}
    # the first scores again: their result back at the top, both kept
    again = di.evaluate.lds(scores, **common)
    np.testing.assert_array_equal(again.per_test, first.per_test)
    attrs = zarr.open_group(store, mode="r")["evaluation/lds"].attrs["dask_influence_evaluation"]
    assert attrs["result"]["scores"] == fp_first and set(attrs["results"]) == {fp_first, second.scores}


def test_a_result_of_an_earlier_version_is_kept_before_other_scores_replace_it(problem, tmp_path):
    model, loss, train, test, trainer, scores = problem
    store = str(tmp_path / "e.zarr")
    common = dict(retrain=trainer, task=loss, test=test, n_subsets=5, store=store)
    first = di.evaluate.lds(scores, **common)
    group = zarr.open_group(store, mode="r+")["evaluation/lds"]
    attrs = dict(group.attrs["dask_influence_evaluation"])
    attrs["result"] = {k: v for k, v in attrs["result"].items() if k not in ("scores", "repaired")}
    del attrs["results"]  # as an earlier version wrote it: no record of the scores
    group.attrs["dask_influence_evaluation"] = attrs
    second = di.evaluate.lds(-scores, **common)
    assert second.retrained == 0
    group = zarr.open_group(store, mode="r")["evaluation/lds"]
    results = group.attrs["dask_influence_evaluation"]["results"]
    assert set(results) == {"unrecorded", second.scores}
    assert results["unrecorded"]["lds_mean"] == pytest.approx(first.mean)
    np.testing.assert_array_equal(np.asarray(group["results/unrecorded/lds"][...]), first.per_test)


# -- the evaluation store verifies what it reads -----------------------------------------------------
def _flip_a_byte(path):
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_a_missing_or_damaged_run_is_named_and_the_rerun_retrains_exactly_it(problem, tmp_path):
    model, loss, train, test, trainer, scores = problem
    store = str(tmp_path / "e.zarr")
    counter = str(tmp_path / "calls.txt")
    clean = di.evaluate.lds(scores, retrain=trainer, task=loss, test=test, n_subsets=6, seed=1)
    counting = NewtonTrainer(*train, weighting="mean", count_file=counter)
    common = dict(retrain=counting, task=loss, test=test, n_subsets=6, seed=1, store=store)
    di.evaluate.lds(scores, **common)
    lds_dir = os.path.join(store, "evaluation", "lds")
    os.remove(os.path.join(lds_dir, "measurements", "c", "3", "0"))  # a run's row deleted
    _flip_a_byte(os.path.join(lds_dir, "measurements", "c", "1", "0"))  # a run's row altered
    with open(os.path.join(lds_dir, "measurements_done", "c", "5"), "r+b") as fh:
        fh.truncate(3)  # a done flag truncated
    _flip_a_byte(os.path.join(lds_dir, "subsets", "c", "2", "0"))  # a recorded subset altered
    with pytest.warns(RuntimeWarning) as caught:
        repaired = di.evaluate.lds(scores, **common)
    messages = [str(w.message) for w in caught]
    seed = di.evaluate.training_seeds(1, 1)[0]
    assert messages[0].startswith(
        f"The evaluation 'evaluation/lds' of {store!r} had 3 recorded run(s) that cannot be read, retrained now: "
        f"subset 1 of 6 (40 of 80 training points, drawn with seed 1), training seed {seed}: its measurements do "
        "not decode: "
    )
    assert (
        f"subset 3 of 6 (40 of 80 training points, drawn with seed 1), training seed {seed}: its measurements "
        "file is missing" in messages[0]
    )
    assert "subset 5 of 6" in messages[0] and "its done flag does not decode" in messages[0]
    assert messages[1] == (
        f"The array 'subsets' of the evaluation 'evaluation/lds' of {store!r} could not be read; rewritten from "
        "the configuration."
    )
    assert (repaired.retrained, repaired.skipped, repaired.repaired) == (3, 3, [1, 3, 5])
    with open(counter) as fh:
        assert sum(1 for _ in fh) == 6 + 3  # exactly the three runs again
    np.testing.assert_allclose(repaired.measurements, clean.measurements, rtol=1e-12)
    np.testing.assert_array_equal(repaired.per_test, clean.per_test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: the next run finds everything intact
        assert di.evaluate.lds(scores, **common).skipped == 6


def test_a_damaged_scores_store_is_named_and_resume_repairs_it(problem, tmp_path):
    model, loss, train, test, trainer, scores = problem
    solver = di.DirectInfluence(model, loss, regularization=LAMBDA).fit(train)
    store = str(tmp_path / "scores.zarr")
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    calc.influences_to_zarr(test, train, store, test_block_size=5, train_block_size=32)
    common = dict(retrain=trainer, task=loss, test=test, n_subsets=4, store=None)
    expected = di.evaluate.lds(scores, **common)
    chunk = os.path.join(store, "influences", "c", "1", "2")
    for damage, reason in [
        (os.remove, "its file is missing"),
        (_flip_a_byte, "Stored and computed checksum do not match"),
    ]:
        damage(chunk)
        with pytest.raises(StoreError) as err:
            di.evaluate.lds(store, **common)
        assert str(err.value).startswith(
            f"The scores store {store!r}: Chunk (1, 2) of 'influences' is marked done but cannot be read ("
        )
        assert reason in str(err.value) and "--resume to recompute it" in str(err.value)
        calc.influences_to_zarr(test, train, store, test_block_size=5, train_block_size=32, resume=True)
        assert calc.last_run_["chunks_computed"] == 1
        np.testing.assert_allclose(di.evaluate.lds(store, **common).per_test, expected.per_test, rtol=1e-10)
