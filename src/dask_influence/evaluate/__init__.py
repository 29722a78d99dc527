"""Evaluation built in: how well do influences predict retraining?

- :func:`lds`: the linear datamodeling score. Random subsets of the training set (seeded,
  recorded), one retraining per (subset, seed), each a task on the Dask cluster; per test
  point the Spearman correlation between the measurements and the influences' predictions,
  its mean and a bootstrap interval.
- :func:`loo`: leave-one-out retraining for chosen training points (:func:`top_points`,
  :func:`random_points`); Pearson between predicted and actual changes.
- :func:`mislabel_detection`: AUC of finding corrupted training points by self-influence or
  by mean influence (no retraining).

Sign convention (the library's): ``influence[i, j] = grad f(z_test_i)^T (H + lambda I)^-1
grad L(z_j)``, positive = helpful when ``f`` is the loss. Removing training point ``j``
changes test point ``i``'s measurement by about ``+influence[i, j] / n_train``; a model trained
on a subset ``S`` measures about ``f_full + (1 / n_train) * sum_{j not in S} influence[i, j]``,
so the prediction monotone in the retrained loss is ``-sum_{j in S} influence[i, j]`` (up to a
constant per test point).

The user's ``train(train_indices, seed) -> model or state_dict`` retrains; each finished run's
measurements (``(n_test,)``) are written to ``<store>/evaluation/<name>`` at once, so an
interrupted evaluation, run again, retrains only what is missing (:mod:`.records`).
``scores`` is a matrix, a store written by ``influences_to_zarr``, or any
:class:`~.scores.ScoreSource` (the extension point for other kinds of scores).
"""

from .lds import LdsResult, lds, lds_from
from .loo import LooResult, loo, random_points, top_points
from .mislabel import mislabel_auc, mislabel_detection
from .records import read_evaluations
from .retrain import Retraining, RetrainingError, measure
from .scores import MatrixScores, ScoreSource, StoreScores, as_scores, scores_fingerprint
from .subsets import draw_subset, draw_subsets, training_seeds

__all__ = [
    "lds",
    "lds_from",
    "LdsResult",
    "loo",
    "LooResult",
    "top_points",
    "random_points",
    "mislabel_auc",
    "mislabel_detection",
    "draw_subset",
    "draw_subsets",
    "training_seeds",
    "measure",
    "Retraining",
    "RetrainingError",
    "ScoreSource",
    "MatrixScores",
    "StoreScores",
    "as_scores",
    "scores_fingerprint",
    "read_evaluations",
]
