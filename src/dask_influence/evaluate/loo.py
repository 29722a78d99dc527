"""Leave-one-out: retrain without each chosen training point and compare with the influence.

For each chosen training point ``j`` (the top-k of a test point, :func:`top_points`, or a
random sample, :func:`random_points`) the model is retrained on every training point but
``j``; the base run retrains on all of them with the same seeds (so the training procedure
itself, not the given model, is the reference). The actual change of test point ``i``'s
measurement is ``f_{-j}(i) - f_full(i)`` (means over the seeds); the predicted change is

    + influence[i, j] / n_train

(``influence = grad f(z_test)^T (H + lambda I)^-1 grad L(z_j)``; with ``f`` the loss, removing a
helpful point, positive influence, raises the test loss). ``warm_start=True`` starts each
retraining from the trained model's weights (``train(indices, seed, init=state_dict)``),
which a convex problem does not need but a network usually does to stay in the same basin.

The prediction matches retraining that keeps every other point's weight ``1 / n_train`` and
the regularizer (``sum_{j in S} L_j / n_train + penalty``). A train function that takes the mean
over the ``n_train - 1`` remaining points adds a change of the same size for every removed
point of a test point (``factor_i . grad penalty / n_train``): the Pearson correlation per test
point does not see it, the pooled one may.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .. import progress as _progress
from .recorded import check_test_count, evaluation_records
from .retrain import make_retraining, retrain_function, run_retrainings
from .scores import StoreScores, as_scores, scores_fingerprint
from .stats import pearson, pearson_rows
from .subsets import check_count, check_seed, training_seeds


@dataclass
class LooResult:
    """Predicted against actual leave-one-out changes.

    Attributes:
        points: ``(K,)`` the training points left out.
        predicted: ``(n_test, K)`` ``influence[i, points[k]] / n_train``.
        actual: ``(n_test, K)`` measurement without the point minus the base measurement.
        base: ``(n_test,)`` the measurement after retraining on every training point.
        pearson: the Pearson correlation of all ``(test, point)`` pairs.
        per_test: ``(n_test,)`` the Pearson correlation over the points, per test point.
        retrained, skipped: runs retrained by this call and runs found done in the store.
        store: where the evaluation is recorded (``None``: in memory only).
        repaired: runs found recorded but unreadable (a missing or damaged chunk), retrained.
        scores: the fingerprint of the scores (:func:`~.scores.scores_fingerprint`).
    """

    points: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    base: np.ndarray
    pearson: float
    per_test: np.ndarray
    retrained: int = 0
    skipped: int = 0
    store: str | None = None
    repaired: list[int] = field(default_factory=list)
    scores: str = ""

    def summary(self) -> dict[str, Any]:
        """The numbers worth printing, as plain data."""
        finite = self.per_test[np.isfinite(self.per_test)]
        return {
            "pearson": self.pearson,
            "pearson_per_test_mean": float(finite.mean()) if finite.size else float("nan"),
            "n_points": int(self.points.size),
            "n_test": int(self.base.size),
            "retrained": self.retrained,
            "skipped": self.skipped,
            "repaired": len(self.repaired),
            "scores": self.scores,
        }


def loo(
    scores: Any,
    *,
    retrain: Callable[..., Any] | None = None,
    test: Any,
    task: Any,
    points: Any,
    model: nn.Module | None = None,
    warm_start: bool = False,
    seeds: int = 1,
    seed: int = 0,
    store: str | None = None,
    name: str = "loo",
    overwrite: bool = False,
    client: Any = None,
    gpu: bool | None = None,
    progress: bool | None = None,
    train: Callable[..., Any] | None = None,
) -> LooResult:
    """Retrain without each of ``points`` and compare with ``scores`` (see the module docstring).

    Args:
        scores, retrain, test, task, model, seed, store, overwrite, client, gpu, progress, train: as
            for :func:`~dask_influence.evaluate.lds`.
        points: the training indices to leave out, one retraining (per seed) each.
        warm_start: call ``retrain(indices, seed, init=state_dict)`` with the weights of ``model``.
        seeds: retrainings per point (and of the base); measurements are averaged.

    Returns:
        a :class:`LooResult`; with a store, its summary is also in the group's attributes,
        with the fingerprint of the scores.

    Raises:
        RetrainingError: the train function failed (naming the left-out point and training seed).
        NonFiniteError: a retrained model measures NaN or Inf (naming the run).
    """
    retrain = retrain_function("di.evaluate.loo", retrain, train)
    source = as_scores(scores)
    check_count("seeds", seeds)
    check_seed(seed)
    chosen = _check_points(points, source.n_train)
    retraining = make_retraining(retrain, test, task, model=model, warm_start=warm_start)
    n_test = check_test_count(retraining.test, source.n_test)
    train_seeds = training_seeds(seed, seeds)
    everything = np.arange(source.n_train, dtype=np.int64)
    runs = [(everything, s) for s in train_seeds]
    runs += [(np.delete(everything, j), s) for j in chosen for s in train_seeds]
    labels = [f"the base run on all {source.n_train} training points, training seed {s}" for s in train_seeds]
    labels += [f"the run leaving out training point {int(j)}, training seed {s}" for j in chosen for s in train_seeds]
    with evaluation_records(
        source,
        retraining,
        runs,
        store=store,
        name=name,
        kind="loo",
        overwrite=overwrite,
        train=retrain,
        seed=seed,
        train_seeds=train_seeds,
        config={"points": chosen.tolist(), "warm_start": bool(warm_start)},
        static={"points": chosen},
        labels=labels,
    ) as records:
        with _progress.reporting(progress):
            report = run_retrainings(
                retraining, runs, records, client=client, gpu=gpu, labels=labels, what="LOO: retraining without points"
            )
        measured = records.read().reshape(1 + chosen.size, seeds, n_test).mean(axis=1)
        base = measured[0]
        actual = (measured[1:] - base).T  # (n_test, K)
        predicted = source.columns(chosen) / source.n_train  # (n_test, K)
        per_test = pearson_rows(predicted, actual) if chosen.size >= 2 else np.full(n_test, np.nan)
        out = LooResult(
            points=chosen,
            predicted=predicted,
            actual=actual,
            base=base,
            pearson=pearson(predicted, actual),
            per_test=per_test,
            retrained=report["retrained"],
            skipped=report["skipped"],
            store=records.store,
            repaired=list(getattr(records, "repaired", [])),
            scores=scores_fingerprint(source, predicted),
        )
        records.save(
            {"predicted": predicted, "actual": actual, "base": base, "pearson_per_test": per_test},
            out.summary(),
            scores=out.scores,
        )
    return out


def top_points(scores: Any, test_index: int, k: int, *, kind: str = "both") -> np.ndarray:
    """Training points with the most extreme influence on test point ``test_index``: ``(<= 2k,)``.

    ``kind``: ``"helpful"`` (the ``k`` highest), ``"harmful"`` (the ``k`` lowest) or ``"both"``
    (both, without repeats). Ties keep the lower index first.
    """
    source = as_scores(scores)
    if (
        isinstance(test_index, bool)
        or not isinstance(test_index, (int, np.integer))
        or not (0 <= test_index < source.n_test)
    ):
        raise ValueError(f"test_index must be a test point from 0 to {source.n_test - 1}; got {test_index!r}.")
    check_count("k", k)
    if kind not in ("helpful", "harmful", "both"):
        raise ValueError(f"kind must be 'helpful', 'harmful' or 'both'; got {kind!r}.")
    if isinstance(source, StoreScores):  # one row, read chunk by chunk (or the stored top-k)
        from ..storage.read import top_of_row

        top = top_of_row(source.group, int(test_index), k)
        kinds = ("helpful", "harmful") if kind == "both" else (kind,)
        return np.array(list(dict.fromkeys(j for name in kinds for j, _ in top[name])), dtype=np.int64)
    row = source.columns(np.arange(source.n_train))[test_index]
    chosen: list[int] = []
    if kind in ("helpful", "both"):
        chosen += np.argsort(-row, kind="stable")[:k].tolist()
    if kind in ("harmful", "both"):
        chosen += np.argsort(row, kind="stable")[:k].tolist()
    return np.array(list(dict.fromkeys(chosen)), dtype=np.int64)


def random_points(n_train: int, k: int, *, seed: int = 0) -> np.ndarray:
    """``k`` distinct training points drawn with ``seed``, sorted: ``(k,)`` int64."""
    check_count("k", k)
    check_seed(seed)
    if k > n_train:
        raise ValueError(f"k must be at most n_train ({n_train}); got {k}.")
    rng = np.random.default_rng([int(seed), 0x100])
    return np.sort(rng.choice(n_train, size=k, replace=False)).astype(np.int64)


def _check_points(points: Any, n_train: int) -> np.ndarray:
    values = np.asarray(points).reshape(-1)
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            "points must be training indices (a non-empty list of integers), e.g. "
            "di.evaluate.random_points(n_train, 20) or di.evaluate.top_points(scores, 0, 10)."
        )
    bad = values[(values < 0) | (values >= n_train)]
    if bad.size:
        raise ValueError(f"points must be training indices from 0 to {n_train - 1}; got {int(bad[0])}.")
    if np.unique(values).size != values.size:
        raise ValueError("points has repeated indices; pass each training point once.")
    return values.astype(np.int64)
