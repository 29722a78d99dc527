"""The old spelling train= of di.evaluate.lds/loo's retrain= still works for one release, with a
warning that names the new spelling; both at once, or neither, are refused in one line."""

import numpy as np
import pytest

import dask_influence as di
from dask_influence.errors import RenamedWarning
from eval_problem import LAMBDA, fitted_problem


@pytest.fixture(scope="module")
def eval_problem():
    model, loss, train, test, trainer = fitted_problem("mean")
    scores = di.DirectInfluence(model, loss, regularization=LAMBDA).fit(train).influences(*test, *train)
    return scores, trainer, test, loss


def test_train_keyword_still_works_with_a_warning_naming_retrain(eval_problem):
    scores, trainer, test, loss = eval_problem
    new = di.evaluate.lds(scores, retrain=trainer, test=test, task=loss, n_subsets=4, seed=1)
    with pytest.warns(RenamedWarning, match=r"di\.evaluate\.lds: train= is now spelled retrain="):
        old = di.evaluate.lds(scores, train=trainer, test=test, task=loss, n_subsets=4, seed=1)
    np.testing.assert_array_equal(old.per_test, new.per_test)
    with pytest.warns(RenamedWarning, match=r"di\.evaluate\.loo: train= is now spelled retrain="):
        di.evaluate.loo(scores, train=trainer, test=test, task=loss, points=[0, 1])


def test_both_or_neither_spelling_is_refused(eval_problem):
    scores, trainer, test, loss = eval_problem
    with pytest.raises(TypeError, match=r"di\.evaluate\.lds: pass retrain= only \(train= is its old spelling\)"):
        di.evaluate.lds(scores, retrain=trainer, train=trainer, test=test, task=loss, n_subsets=4)
    with pytest.raises(
        TypeError, match=r"di\.evaluate\.loo\(\) needs retrain=, the function retrain\(train_indices, seed\)"
    ):
        di.evaluate.loo(scores, test=test, task=loss, points=[0])
