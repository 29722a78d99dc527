"""The statistics of an evaluation: rank and linear correlations, bootstrap intervals, AUC.

Plain numpy (no scipy): ties get average ranks, as in ``scipy.stats.rankdata``; a row whose
values are all equal has no correlation (NaN), and the means skip NaN.
"""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks ``0 .. n-1`` of a 1-D array, ties given the mean of their positions: ``(n,)``."""
    values = np.asarray(values, dtype=np.float64)
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse.reshape(-1)]


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, both ``(r, m)``: ``(r,)``.

    NaN for a row that is constant in ``a`` or ``b``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pearson_rows needs two (rows, values) arrays of one shape; got {a.shape} and {b.shape}.")
    constant = _constant_rows(a) | _constant_rows(b)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    out[constant] = np.nan
    return out


def _constant_rows(a: np.ndarray) -> np.ndarray:
    """Rows whose spread is at the rounding level of their values (or that are empty)."""
    if a.shape[1] == 0:
        return np.ones(a.shape[0], dtype=bool)
    spread = a.max(axis=1) - a.min(axis=1)
    return ~(spread > 1e-13 * np.abs(a).max(axis=1))


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``, ``(r, m)``: ``(r,)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"spearman_rows needs two (rows, values) arrays of one shape; got {a.shape} and {b.shape}.")
    ra = np.stack([average_ranks(row) for row in a]) if len(a) else a
    rb = np.stack([average_ranks(row) for row in b]) if len(b) else b
    return pearson_rows(ra, rb)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of all entries of ``a`` with those of ``b`` (NaN pairs left out)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    return float(pearson_rows(a[keep][None], b[keep][None])[0])


def bootstrap_interval(
    values: np.ndarray, *, confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN left out), resampling entries.

    Returns ``(low, high)``; ``(nan, nan)`` without finite values.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95); got {confidence!r}.")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer (e.g. 1000); got {n_bootstrap!r}.")
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, finite.size, size=(n_bootstrap, finite.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher: more likely positive) for a boolean mask.

    The Mann-Whitney statistic with average ranks for ties: 1.0 ranks every positive above
    every negative, 0.5 is chance. NaN scores are left out.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    if scores.shape != positives.shape:
        raise ValueError(f"auc needs one score per point; got {scores.size} scores for {positives.size} points.")
    keep = np.isfinite(scores)
    scores, positives = scores[keep], positives[keep]
    n_pos = int(positives.sum())
    n_neg = int(positives.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUC needs positives and negatives; got {n_pos} corrupted and {n_neg} clean points with finite scores."
        )
    ranks = average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos - 1) / 2.0) / (n_pos * n_neg))
