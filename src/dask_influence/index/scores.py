"""A gradient index as the scores of an evaluation (:class:`~dask_influence.evaluate.scores.ScoreSource`).

``influence[i, j] = f_i . phi_j`` with the test factors ``f`` ``(n_test, k)`` (solved once) and
the index rows ``phi`` ``(n_train, k)``, so every query reads the index once, chunk by chunk,
and never forms the ``(n_test, n_train)`` matrix: a subset's sum of influences is
``f_i . (sum_{j in S} phi_j)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..mapping.plan import ranges_from_sizes
from . import layout


class IndexScores:
    """The influences of an index's training points on a test set, as an evaluation reads them.

    Args:
        index: a :class:`~dask_influence.GradientIndex`.
        factors: the test factors ``(n_test, k)`` float64 (``(C + lambda I)^-1 P grad f(test)``).
        regularization: the ``lambda`` they were solved with (for self-influences).
    """

    store: str | None = None

    def __init__(self, index: Any, factors: np.ndarray, regularization: float):
        self.index = index
        self.factors = np.asarray(factors, dtype=np.float64)
        self.regularization = float(regularization)
        self.n_test, self.n_train = int(self.factors.shape[0]), int(index.n_train)

    def _chunks(self) -> Any:
        """``(start, stop, phi)`` for each index block, ``phi`` ``(n_b, k)`` float64 (every chunk
        verified: a missing or damaged one raises a ``StoreError`` naming it)."""
        for start, stop in ranges_from_sizes(tuple(self.index.attributes["block_sizes"])):
            yield start, stop, layout.read_gradients(self.index.path, (start, stop), self.index.group)

    def subset_sums(self, masks: np.ndarray) -> np.ndarray:
        """``(n_test, M)``: per test point, the sum of its influences over each subset ``(M, n_train)``."""
        masks = np.asarray(masks, dtype=np.float64)
        summed = np.zeros((masks.shape[0], self.factors.shape[1]))
        for start, stop, phi in self._chunks():
            summed += masks[:, start:stop] @ phi
        return self.factors @ summed.T

    def columns(self, indices: np.ndarray) -> np.ndarray:
        """``(n_test, K)``: the influences of the training points ``indices`` ``(K,)``."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.empty((len(indices), self.factors.shape[1]))
        ranges = ranges_from_sizes(tuple(self.index.attributes["block_sizes"]))
        starts = np.array([start for start, _ in ranges])
        blocks = np.searchsorted(starts, indices, side="right") - 1
        for j in np.unique(blocks):  # only the blocks holding the asked points, each read (and verified) once
            start, stop = ranges[int(j)]
            phi = layout.read_gradients(self.index.path, (start, stop), self.index.group)
            chosen = blocks == j
            rows[chosen] = phi[indices[chosen] - start]
        return self.factors @ rows.T

    def mean_influence(self) -> np.ndarray:
        """``(n_train,)``: the mean influence of each training point over the test points."""
        mean = self.factors.mean(axis=0)
        return np.concatenate([phi @ mean for _, _, phi in self._chunks()])

    def self_influences(self) -> np.ndarray | None:
        """``(n_train,)`` self-influences from the index."""
        return np.asarray(self.index.self_influences(regularization=self.regularization), dtype=np.float64)
