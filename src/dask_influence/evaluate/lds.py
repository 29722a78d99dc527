"""The linear datamodeling score (LDS): do influences rank retrained subsets correctly?

Draw ``n_subsets`` random subsets ``S_m`` of the training set, each keeping a ``fraction``
of it (:mod:`.subsets`; reproducible from ``seed``), retrain on each with ``seeds``
training seeds, and measure every test point (the task's measurement, the loss by default).

Sign convention. ``influence[i, j] = grad f(z_test_i)^T (H + lambda I)^-1 grad L(z_j)``;
removing training point ``j`` changes the measurement ``f`` of test point ``i`` by about
``+influence[i, j] / n_train`` (with ``f`` the loss, a positive influence is helpful: removing
the point raises the test loss). A model trained on ``S`` (the complement removed) thus has

    f_S(i)  ~  f_full(i) + (1 / n_train) * sum_{j not in S} influence[i, j],

and this predicted change is the ``prediction`` of the subset; equivalently, up to a constant
per test point, ``-(1 / n_train) * sum_{j in S} influence[i, j]``. The LDS of test point ``i`` is
the Spearman correlation, over the subsets, between the prediction and the measurement
(averaged over the seeds). A score matrix with the opposite sign gives the opposite LDS.

The influence predicts retraining that keeps every other point's weight (``1 / n_train``)
and the regularizer. A train function that takes the mean loss over the subset instead gives
the regularizer more weight on every subset alike; Spearman over subsets of one size hardly
sees it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from .. import progress as _progress
from .recorded import check_test_count, evaluation_records
from .records import ZarrRecords
from .retrain import make_retraining, retrain_function, run_retrainings
from .scores import as_scores, scores_fingerprint
from .stats import bootstrap_interval, spearman_rows
from .subsets import check_count, check_seed, draw_subset, draw_subsets, subset_size, training_seeds


@dataclass
class LdsResult:
    """The LDS of an influence matrix against retraining.

    Attributes:
        per_test: ``(n_test,)`` Spearman correlation of each test point (NaN where the
            measurements or predictions do not vary over the subsets).
        mean: the mean of ``per_test`` (NaN left out).
        interval: ``(low, high)`` percentile bootstrap interval of ``mean`` (test points resampled).
        predictions: ``(n_subsets, n_test)`` predicted change of each test point's measurement,
            ``(1 / n_train) * sum_{j not in S_m} influence[i, j]``.
        measurements: ``(n_subsets, n_test)`` measurement after retraining, mean over the seeds.
        subsets: ``(n_subsets, n_train)`` boolean membership.
        seed, fraction, seeds: the parameters that drew the subsets and seeded the training.
        retrained, skipped: runs retrained by this call and runs found done in the store.
        store: where the evaluation is recorded (``None``: in memory only).
        repaired: runs found recorded but unreadable (a missing or damaged chunk), retrained.
        scores: the fingerprint of the scores (:func:`~.scores.scores_fingerprint`), recorded
            with the result.
    """

    per_test: np.ndarray
    mean: float
    interval: tuple[float, float]
    predictions: np.ndarray
    measurements: np.ndarray
    subsets: np.ndarray
    seed: int
    fraction: float
    seeds: int
    retrained: int = 0
    skipped: int = 0
    store: str | None = None
    training_seeds: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)
    scores: str = ""

    def summary(self) -> dict[str, Any]:
        """The numbers worth printing, as plain data."""
        return {
            "lds_mean": self.mean,
            "lds_interval": list(self.interval),
            "n_test": int(self.per_test.size),
            "n_test_defined": int(np.isfinite(self.per_test).sum()),
            "n_subsets": int(self.subsets.shape[0]),
            "fraction": self.fraction,
            "seeds": self.seeds,
            "seed": self.seed,
            "retrained": self.retrained,
            "skipped": self.skipped,
            "repaired": len(self.repaired),
            "scores": self.scores,
        }


def lds(
    scores: Any,
    *,
    retrain: Callable[..., Any] | None = None,
    test: Any,
    task: Any,
    model: nn.Module | None = None,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seeds: int = 1,
    seed: int = 0,
    store: str | None = None,
    name: str = "lds",
    overwrite: bool = False,
    client: Any = None,
    gpu: bool | None = None,
    progress: bool | None = None,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    train: Callable[..., Any] | None = None,
) -> LdsResult:
    """The linear datamodeling score of ``scores`` (see the module docstring for the convention).

    Args:
        scores: the influences ``(n_test, n_train)``: a matrix (numpy, torch), the path or URL
            of a complete store written by ``influences_to_zarr`` (mode ``"up"``), or a
            :class:`~dask_influence.evaluate.scores.ScoreSource`.
        retrain: ``retrain(train_indices, seed) -> model or state_dict``, the training procedure
            run on each subset (see :mod:`.retrain`).
        test: the ``n_test`` test points, the rows of ``scores``, in order: a batch, a
            ``Dataset`` or a non-shuffling ``DataLoader``.
        task: a :class:`~dask_influence.Task` or a pair loss ``loss(outputs, targets)``: what
            is measured on each test point (the task's measurement; the loss by default).
        model: the trained model (needed when ``retrain`` returns state dicts).
        n_subsets: subsets ``M`` (at least 2); ``fraction``: share of the training points each keeps.
        seeds: retrainings per subset (their measurements are averaged); ``seed`` draws the
            subsets and the training seeds.
        store: the zarr store whose ``evaluation/<name>`` group records the runs (default: the
            store of ``scores``; ``None`` with a matrix: memory only, nothing resumes).
        overwrite: discard recorded runs of ``name``. Without it, runs already recorded by an
            evaluation of the same configuration are kept and only the missing ones retrained.
        client: a ``distributed.Client`` (one task per run); ``None``: the current client, else
            this process; ``False``: this process. ``gpu``: the tasks need the Dask resource ``GPU=1`` (``None``: when
            ``model`` is on CUDA).
        progress: report the retraining runs done of those to run (rate, ETA); ``None``: see
            :mod:`dask_influence.progress`.
        confidence, n_bootstrap: the bootstrap interval of the mean.
        train: the old spelling of ``retrain`` (a :class:`~dask_influence.errors.RenamedWarning`).

    Returns:
        an :class:`LdsResult`; with a store, its summary is also in the group's attributes,
        with the fingerprint of the scores (a rerun with other scores reuses the runs and keeps
        each scores' result, see :mod:`.records`).

    Raises:
        ValueError: a ``fraction`` whose subsets are empty or the whole training set (the
            message gives the fractions that work); a shuffling test ``DataLoader``.
        RetrainingError: the train function failed (naming the subset and training seed).
        NonFiniteError: a retrained model measures NaN or Inf (naming the run).

    Warns:
        RuntimeWarning: the LDS is NaN for some test points (their measurements or predictions
            do not vary over the subsets), naming how many and why.
    """
    retrain = retrain_function("di.evaluate.lds", retrain, train)
    source = as_scores(scores)
    check_count("n_subsets", n_subsets, minimum=2)
    check_count("seeds", seeds)
    check_seed(seed)
    k = subset_size(source.n_train, fraction)
    retraining = make_retraining(retrain, test, task, model=model)
    n_test = check_test_count(retraining.test, source.n_test)
    masks = draw_subsets(source.n_train, n_subsets, fraction, seed)
    train_seeds = training_seeds(seed, seeds)
    runs = [(draw_subset(source.n_train, fraction, seed, m), s) for m in range(n_subsets) for s in train_seeds]
    labels = [
        f"subset {m} of {n_subsets} ({k} of {source.n_train} training points, drawn with seed {seed}), "
        f"training seed {s}"
        for m in range(n_subsets)
        for s in train_seeds
    ]
    with evaluation_records(
        source,
        retraining,
        runs,
        store=store,
        name=name,
        kind="lds",
        overwrite=overwrite,
        train=retrain,
        seed=seed,
        train_seeds=train_seeds,
        config={"n_subsets": n_subsets, "fraction": fraction, "subset_size": k},
        static={"subsets": masks},
        labels=labels,
    ) as records:
        if isinstance(records, ZarrRecords):
            recorded = np.asarray(records.group["subsets"][...], dtype=bool)
            if not np.array_equal(recorded, masks):
                raise ValueError(
                    f"The subsets recorded in {records.store!r} differ from those drawn again from seed {seed} "
                    "(another numpy random generator?); pass overwrite=True to start afresh."
                )
        with _progress.reporting(progress):
            report = run_retrainings(
                retraining, runs, records, client=client, gpu=gpu, labels=labels, what="LDS: retraining on subsets"
            )
        measured = records.read().reshape(n_subsets, seeds, n_test).mean(axis=1)
        result = lds_from(source, masks, measured, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
        _warn_undefined(result["per_test"], result["predictions"], measured)
        out = LdsResult(
            per_test=result["per_test"],
            mean=result["mean"],
            interval=result["interval"],
            predictions=result["predictions"],
            measurements=measured,
            subsets=masks,
            seed=seed,
            fraction=fraction,
            seeds=seeds,
            retrained=report["retrained"],
            skipped=report["skipped"],
            store=records.store,
            training_seeds=train_seeds,
            repaired=list(getattr(records, "repaired", [])),
            scores=scores_fingerprint(source, result["predictions"]),
        )
        summary = out.summary()
        summary["confidence"] = confidence
        records.save(
            {"lds": out.per_test, "predictions": out.predictions, "measurements_mean": measured},
            summary,
            scores=out.scores,
        )
    return out


def _warn_undefined(per_test: np.ndarray, predictions: np.ndarray, measurements: np.ndarray) -> None:
    """Warn, naming how many test points and why, where the LDS is NaN (a Spearman correlation
    of a constant: the measurements or predictions do not vary over the subsets)."""
    undefined = np.isnan(per_test)
    if not undefined.any():
        return
    flat_measured = undefined & (np.ptp(measurements, axis=0) == 0)
    flat_predicted = undefined & (np.ptp(predictions, axis=0) == 0)
    causes = []
    if flat_measured.any():
        causes.append(
            f"{int(flat_measured.sum())} measure the same after every retraining (does the train function "
            "use its train_indices?)"
        )
    if flat_predicted.any():
        causes.append(
            f"{int(flat_predicted.sum())} have the same prediction for every subset (their scores are equal, "
            "or zero, on the points the subsets leave out)"
        )
    n, bad = per_test.size, int(undefined.sum())
    rest = f"the mean is over the other {n - bad}" if bad < n else "the mean is NaN"
    warnings.warn(
        f"The LDS is undefined (NaN) for {bad} of {n} test points: {'; '.join(causes) or 'a constant series'}; {rest}.",
        RuntimeWarning,
        stacklevel=3,
    )


def lds_from(
    scores: Any,
    masks: np.ndarray,
    measurements: np.ndarray,
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """LDS from measurements already taken: ``masks`` ``(M, n_train)``, ``measurements`` ``(M, n_test)``.

    Returns ``per_test`` ``(n_test,)``, ``mean``, ``interval`` and ``predictions`` ``(M, n_test)``.
    """
    source = as_scores(scores)
    masks = np.asarray(masks, dtype=bool)
    measurements = np.asarray(measurements, dtype=np.float64)
    if masks.shape[1] != source.n_train or measurements.shape != (masks.shape[0], source.n_test):
        raise ValueError(
            f"masks {masks.shape} and measurements {measurements.shape} do not fit scores of "
            f"shape ({source.n_test}, {source.n_train}): need (M, n_train) and (M, n_test)."
        )
    sums = source.subset_sums(np.vstack([masks, np.ones((1, source.n_train), dtype=bool)]))  # one pass
    removed = sums[:, -1:] - sums[:, :-1]  # (n_test, M): the sum over the points each subset leaves out
    predictions = (removed / source.n_train).T
    per_test = spearman_rows(predictions.T, measurements.T)
    finite = per_test[np.isfinite(per_test)]
    mean = float(finite.mean()) if finite.size else float("nan")
    interval = bootstrap_interval(per_test, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
    return {"per_test": per_test, "mean": mean, "interval": interval, "predictions": predictions}
