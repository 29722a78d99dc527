"""The evaluation's statistics against scipy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from dask_influence.evaluate.stats import auc, bootstrap_interval, pearson, pearson_rows, spearman_rows


def test_spearman_with_ties_equals_scipy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(6, 30)).astype(float)  # many ties
    b = a + rng.normal(size=a.shape)
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman_rows(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(pearson_rows(a, b), [stats.pearsonr(x, y).statistic for x, y in zip(a, b)], rtol=1e-12)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a.ravel(), b.ravel()).statistic, rel=1e-12)


def test_constant_rows_have_no_correlation():
    a = np.array([[0.1, 0.1, 0.1], [1.0, 2.0, 3.0]])
    b = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out = spearman_rows(a, b)
    assert np.isnan(out[0]) and out[1] == pytest.approx(-1.0)


def test_auc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=200).astype(float)
    labels = rng.random(200) < 0.2
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    with pytest.raises(ValueError, match="AUC needs positives and negatives"):
        auc(scores, np.zeros(200, dtype=bool))


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(2)
    small = rng.normal(0.5, 0.1, size=20)
    large = rng.normal(0.5, 0.1, size=2000)
    lo, hi = bootstrap_interval(small, seed=0)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_interval(large, seed=0)
    assert hi2 - lo2 < (hi - lo) / 5
    # 1.96 standard errors either side, to bootstrap accuracy
    assert (hi2 - lo2) / 2 == pytest.approx(1.96 * large.std() / np.sqrt(large.size), rel=0.15)
    assert bootstrap_interval([np.nan, 1.0, 1.0], seed=0) == (1.0, 1.0)
