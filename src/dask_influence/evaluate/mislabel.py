"""Mislabel detection: how well do influences find training points known to be corrupted?

Two rankings of the training points, each scored by the area under the ROC curve (AUC: 1.0
ranks every corrupted point first, 0.5 is chance) against the given corrupted indices:

- **self-influence** ``grad L(z_j)^T (H + lambda I)^-1 grad L(z_j)``, highest first: a mislabeled
  point is hard to fit, so the model's fit bends the most towards it;
- **mean influence** over the test points, lowest first: with the loss as the measurement a
  negative influence is harmful (removing the point would lower the test loss), and
  mislabeled points tend to harm clean test points.

No retraining is involved.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .scores import as_scores
from .stats import auc


def mislabel_auc(values: Any, corrupted: Any, *, higher_is_suspicious: bool = True) -> float:
    """AUC of finding the ``corrupted`` indices by ``values`` ``(n_train,)``.

    Args:
        values: one score per training point (torch or numpy).
        corrupted: the indices of the corrupted points.
        higher_is_suspicious: ``True`` for self-influences, ``False`` for mean influences.
    """
    array = _vector(values)
    positives = corrupted_mask(corrupted, array.size)
    return auc(array if higher_is_suspicious else -array, positives)


def mislabel_detection(corrupted: Any, *, scores: Any = None, self_influences: Any = None) -> dict[str, float]:
    """The AUC of each ranking the inputs allow.

    Args:
        corrupted: the indices of the corrupted training points.
        scores: influences ``(n_test, n_train)`` (a matrix, a store path, a
            :class:`~dask_influence.evaluate.scores.ScoreSource`): gives ``"mean_influence"``,
            and ``"self_influence"`` when the source holds self-influences (a store written
            with ``self_influences=True``).
        self_influences: ``(n_train,)``, e.g. ``solver.self_influences(x, y)``: gives ``"self_influence"``.

    Returns:
        ``{"mean_influence": auc, "self_influence": auc}`` (the keys the inputs allow).
    """
    out: dict[str, float] = {}
    if scores is not None:
        source = as_scores(scores)
        out["mean_influence"] = mislabel_auc(source.mean_influence(), corrupted, higher_is_suspicious=False)
        if self_influences is None:
            self_influences = source.self_influences()
    if self_influences is not None:
        out["self_influence"] = mislabel_auc(self_influences, corrupted, higher_is_suspicious=True)
    if not out:
        raise ValueError("Pass scores= (influences) or self_influences= to rank the training points.")
    return out


def corrupted_mask(corrupted: Any, n_train: int) -> np.ndarray:
    """``(n_train,)`` booleans, True at the ``corrupted`` indices (checked)."""
    indices = np.asarray(corrupted).reshape(-1)
    if indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError("corrupted must be the indices of the corrupted training points (a non-empty list of ints).")
    bad = indices[(indices < 0) | (indices >= n_train)]
    if bad.size:
        raise ValueError(f"corrupted indices must be from 0 to {n_train - 1}; got {int(bad[0])}.")
    mask = np.zeros(n_train, dtype=bool)
    mask[indices] = True
    return mask


def _vector(values: Any) -> np.ndarray:
    import torch

    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be one score per training point (n_train,); got shape {array.shape}.")
    return array
