"""What an evaluation scores: an influence matrix in memory, or a store on disk.

An evaluation reads the scores through the :class:`ScoreSource` protocol, three queries
that never need the whole matrix in memory:

- ``subset_sums(masks)``: ``(n_test, M)``, for each subset ``m`` (a boolean mask
  ``(M, n_train)``) and test point ``i`` the sum of ``influence[i, j]`` over ``j`` in it;
- ``columns(indices)``: ``(n_test, K)``, the influences of the training points ``indices``;
- ``mean_influence()``: ``(n_train,)``, the mean influence of each training point over the
  test points; and ``self_influences()``, ``(n_train,)`` or ``None``.

:func:`as_scores` turns what a user passes into a source: a matrix ``(n_test, n_train)``
(numpy, torch) is a :class:`MatrixScores`; a path or URL of a store written by
``influences_to_zarr`` (a zarr group with an ``influences`` array, mode ``"up"``, complete)
is a :class:`StoreScores`, read one chunk at a time. Any other object that implements
:class:`ScoreSource` is used as it is: this is where a gradient index (top-k scores from a
projected-gradient index) plugs in, by answering the same three queries.

What an evaluation's result was computed from is recorded with it: :func:`scores_fingerprint`
is a sha256 of the matrix (:class:`MatrixScores`), of the store's identity (its configuration,
fit and shape: a store and its resumed or copied twin hold the same values,
:class:`StoreScores`), or the source's own ``fingerprint()`` if it has one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import StoreError


@runtime_checkable
class ScoreSource(Protocol):
    """The scores an evaluation compares with retraining (see the module docstring).

    Attributes:
        n_test: test points (rows).
        n_train: training points (columns).
        store: the store the scores live in (a path or URL), where the evaluation writes its
            results by default; ``None`` for scores in memory.
    """

    n_test: int
    n_train: int
    store: str | None

    def subset_sums(self, masks: np.ndarray) -> np.ndarray:
        """``(n_test, M)``: per test point, the sum of its influences over each subset ``(M, n_train)``."""
        ...

    def columns(self, indices: np.ndarray) -> np.ndarray:
        """``(n_test, K)``: the influences of the training points ``indices`` ``(K,)``."""
        ...

    def mean_influence(self) -> np.ndarray:
        """``(n_train,)``: the mean influence of each training point over the test points."""
        ...

    def self_influences(self) -> np.ndarray | None:
        """``(n_train,)`` self-influences, or ``None`` where the source has none."""
        ...


class MatrixScores:
    """An influence matrix ``(n_test, n_train)`` in memory (float64 copy).

    Args:
        matrix: numpy array or torch tensor ``(n_test, n_train)``.
        self_influences: optional ``(n_train,)``.
    """

    store: str | None = None

    def __init__(self, matrix: Any, self_influences: Any = None):
        values = _as_numpy(matrix)
        if values.ndim != 2:
            raise ValueError(
                f"scores must be an influence matrix (n_test, n_train) of mode 'up'; got shape {values.shape}."
            )
        if not np.isfinite(values).all():
            raise ValueError("scores hold NaN or Inf; pass the influence matrix of a finished computation.")
        self.matrix = values
        self.n_test, self.n_train = values.shape
        self._self = None if self_influences is None else _as_numpy(self_influences).reshape(-1)
        if self._self is not None and self._self.shape != (self.n_train,):
            raise ValueError(f"self_influences must have shape ({self.n_train},); got {self._self.shape}.")

    def subset_sums(self, masks: np.ndarray) -> np.ndarray:
        """See :class:`ScoreSource`."""
        return self.matrix @ np.asarray(masks, dtype=np.float64).T

    def columns(self, indices: np.ndarray) -> np.ndarray:
        """See :class:`ScoreSource`."""
        return self.matrix[:, np.asarray(indices, dtype=np.int64)]

    def mean_influence(self) -> np.ndarray:
        """See :class:`ScoreSource`."""
        return self.matrix.mean(axis=0)

    def self_influences(self) -> np.ndarray | None:
        """See :class:`ScoreSource`."""
        return self._self

    def fingerprint(self) -> str:
        """``"matrix:<sha256 of the float64 matrix, 16 hex digits>"``."""
        digest = hashlib.sha256(str(self.matrix.shape).encode())
        digest.update(np.ascontiguousarray(self.matrix).tobytes())
        return "matrix:" + digest.hexdigest()[:16]


class StoreScores:
    """The ``influences`` of a complete store of mode ``"up"``, read one chunk at a time.

    Args:
        path: the store (a local path or a URL).

    Raises:
        StoreError: no such store, another mode, or chunks still missing.
    """

    def __init__(self, path: str | os.PathLike):
        from ..storage.completion import completion
        from ..storage.read import open_store, require_up_mode

        self.store = os.fspath(path)
        self.group = open_store(self.store)
        require_up_mode(self.group, "evaluate")
        done, total = completion(self.group).get("influences", (0, 0))
        if done != total:
            raise StoreError(
                f"The store {self.store!r} has {done}/{total} influence chunks computed; finish it first "
                "(`dask-influence run JOB.toml --resume`, or influences_to_zarr(..., resume=True))."
            )
        self.n_test, self.n_train = (int(v) for v in self.group["influences"].shape[:2])

    def _chunks(self) -> Any:
        """``((r0, r1), (c0, c1), block)`` of every chunk, each read once and checked: a chunk whose
        file is missing or does not decode (CRC32C) raises :class:`StoreError` naming it and the
        repair (``run --resume`` recomputes it), never NaN or zarr's bare checksum error."""
        from ..storage.read import done_blocks

        try:
            for (r0, c0), block in done_blocks(self.group):
                block = np.asarray(block, dtype=np.float64)
                yield (r0, r0 + block.shape[0]), (c0, c0 + block.shape[1]), block
        except StoreError as err:
            raise StoreError(f"The scores store {self.store!r}: {err}") from None

    def fingerprint(self) -> str:
        """``"store:<sha256 of the store's configuration, fit and shape, 16 hex digits>"``."""
        from ..storage.read import store_info

        info = store_info(self.group)
        identity = {k: info.get(k) for k in ("config", "test_block_sizes", "train_block_sizes")}
        identity["fit"] = (info.get("fit") or {}).get("fingerprint")  # the fitted state, not when it was fitted
        identity["shape"] = [int(v) for v in self.group["influences"].shape]
        text = json.dumps(identity, sort_keys=True, default=str)
        return "store:" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def subset_sums(self, masks: np.ndarray) -> np.ndarray:
        """See :class:`ScoreSource`."""
        weights = np.asarray(masks, dtype=np.float64)
        out = np.zeros((self.n_test, weights.shape[0]))
        for (r0, r1), (c0, c1), block in self._chunks():
            out[r0:r1] += block @ weights[:, c0:c1].T
        return out

    def columns(self, indices: np.ndarray) -> np.ndarray:
        """See :class:`ScoreSource`."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.full((self.n_test, indices.size), np.nan)
        for (r0, r1), (c0, c1), block in self._chunks():
            inside = np.nonzero((indices >= c0) & (indices < c1))[0]
            if inside.size:
                out[r0:r1, inside] = block[:, indices[inside] - c0]
        return out

    def mean_influence(self) -> np.ndarray:
        """See :class:`ScoreSource`."""
        from ..storage.read import mean_influence

        return mean_influence(self.group)[0]

    def self_influences(self) -> np.ndarray | None:
        """See :class:`ScoreSource`: the store's ``self_influences`` if it has them, complete."""
        from ..storage.completion import completion

        done, total = completion(self.group).get("self_influences", (0, 1))
        if done != total:
            return None
        return np.asarray(self.group["self_influences"][...], dtype=np.float64)


def as_scores(scores: Any) -> ScoreSource:
    """A :class:`ScoreSource` for a matrix, a store path or URL, or a source as it is.

    Raises:
        TypeError: ``scores`` is none of these.
    """
    if isinstance(scores, (str, os.PathLike)):
        return StoreScores(scores)
    if isinstance(scores, ScoreSource):
        return scores
    if isinstance(scores, np.ndarray) or hasattr(scores, "__array__") or _is_tensor(scores):
        return MatrixScores(scores)
    raise TypeError(
        "scores must be an influence matrix (n_test, n_train), the path of a store written by "
        f"influences_to_zarr, or a ScoreSource; got {type(scores).__name__}."
    )


def scores_fingerprint(source: Any, fallback: np.ndarray | None = None) -> str:
    """What identifies the scores an evaluation's result was computed from: the source's
    ``fingerprint()`` (:class:`MatrixScores`, :class:`StoreScores`), else ``"values:<sha256>"``
    of ``fallback`` (the values the evaluation read from the source, e.g. its predictions)."""
    own = getattr(source, "fingerprint", None)
    if callable(own):
        return str(own())
    digest = hashlib.sha256(type(source).__qualname__.encode())
    if fallback is not None:
        digest.update(np.ascontiguousarray(np.asarray(fallback, dtype=np.float64)).tobytes())
    return "values:" + digest.hexdigest()[:16]


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _as_numpy(value: Any) -> np.ndarray:
    if _is_tensor(value):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
