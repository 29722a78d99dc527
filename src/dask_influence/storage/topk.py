"""The top-k of each test point: candidates per chunk, merged per test block, written once.

Per test point ``r`` (a row of the influence matrix) the store keeps the ``k`` most helpful
(largest values) and the ``k`` most harmful (smallest values) training points, ordered from
the most to the least extreme. The order is total: by value, ties by the lower training
index, NaN last, so the result is one well-defined answer whatever the blocks.

The merge runs on the workers, in three kinds of tasks:

- :func:`candidates`: the best ``min(k, n_j)`` of one chunk ``(n_i, n_j)`` per row, from its
  values in memory (the influence task's output) or read back from the store
  (:func:`chunk_candidates`, for chunks done before a resume). ``np.argpartition`` selects
  them in ``O(n_i * n_j)``, only the ``k`` selected are sorted;
- :func:`merge`: the candidates of several chunks of a row of chunks merged (the best ``k``
  of a union is the best ``k`` of the union of each part's best ``k``), in a tree;
- :func:`write_topk`: the merged candidates of test block ``i`` written, then its done flag.

So the job reads nothing back from the store (except chunks done before a resume) and the
merge costs about one pass over each chunk, where the chunk is.

:data:`Candidates` is a tuple ``(helpful_indices, helpful_values, harmful_indices,
harmful_values)``, each ``(n_i, m)`` with ``m <= k``, ordered from most to least extreme;
indices are global training indices (int64).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Candidates = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
KINDS = (("helpful", -1.0), ("harmful", 1.0))  # the sign that makes "best" the smallest key


def _keys(values: np.ndarray, sign: float) -> np.ndarray:
    """``sign * values`` as float64, NaN replaced by +inf (NaN sorts last)."""
    key = np.multiply(values, sign, dtype=np.float64)
    key[np.isnan(key)] = np.inf
    return key


def _ragged(flat: np.ndarray, n: int, m: int, source: np.ndarray, fill: Any) -> tuple[np.ndarray, np.ndarray]:
    """The entries ``flat`` (increasing flat positions in an ``(n, m)`` array) gathered row by row
    into ``(n, w)`` arrays, ``w`` the most entries of a row: ``source``'s values there and their
    columns; a row's unused places hold ``fill`` and the column ``m``."""
    rows, cols = np.divmod(flat, m)
    counts = np.bincount(rows, minlength=n)
    width = int(counts.max()) if n else 0
    position = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    values = np.full((n, width), fill, dtype=source.dtype)
    columns = np.full((n, width), m, dtype=np.int64)
    values[rows, position] = source.reshape(-1)[flat]
    columns[rows, position] = cols
    return values, columns


def _best(values: np.ndarray, indices: np.ndarray, k: int, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """The best ``min(k, m)`` of each row of ``values`` ``(n, m)`` (``indices``: their training
    indices, ``(n, m)``), ordered by ``(sign * value, index)``, NaN last: ``((n, k'), (n, k'))``.
    Exact for any input (the merge, and the rows :func:`_best_of_chunk` leaves to it)."""
    n, m = values.shape
    key = _keys(values, sign)
    cols: np.ndarray
    if m > k:  # preselect: every entry at most the k-th smallest key (ties may add a few)
        kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
        key, cols = _ragged(np.flatnonzero(key <= kth), n, m, key, np.inf)
        idx = np.take_along_axis(indices, np.minimum(cols, m - 1), 1)
        idx[cols == m] = np.iinfo(np.int64).max  # unused places sort last
    else:
        idx, cols = indices, np.broadcast_to(np.arange(m), (n, m))
    order = np.lexsort((idx, key), axis=1)[:, : min(k, m)]
    cols = np.take_along_axis(cols, order, 1)
    return np.take_along_axis(indices, cols, 1).astype(np.int64, copy=False), np.take_along_axis(values, cols, 1)


SAMPLE = 1024
"""Columns of a chunk sampled for a first threshold (see :func:`_best_of_chunk`)."""


def _best_of_chunk(values: np.ndarray, k: int, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """The columns of the best ``min(k, m)`` of each row of a chunk ``(n, m)`` ordered by
    ``(sign * value, column)``, NaN last, and their values: ``((n, k'), (n, k'))``.

    About two passes over the chunk: the ``k``-th best of a sample of its columns (every
    ``m / SAMPLE``-th) bounds the row's ``k``-th best, so the entries at least as good as it hold
    the row's best ``k`` (every tie included); they are few (about ``SAMPLE / k`` times fewer
    than the chunk's), found with one comparison and ``flatnonzero``, and ordered exactly. A
    row with fewer than ``k`` such entries (NaN in it) goes through :func:`_best`.
    """
    n, m = values.shape
    if m <= 4 * k or n == 0:
        return _best(values, np.broadcast_to(np.arange(m), (n, m)), k, sign)
    sample = values[:, :: max(1, m // SAMPLE)]
    kth = sample.shape[1] - k if sign < 0 else k - 1  # the k-th largest (helpful) or smallest (harmful)
    bound = np.partition(sample, kth, axis=1)[:, kth : kth + 1]
    good = values >= bound if sign < 0 else values <= bound  # NaN never compares true
    chosen, cols = _ragged(np.flatnonzero(good), n, m, values, np.nan)
    enough = (cols < m).sum(axis=1) >= k
    if enough.all():  # ties by column: the column order is the index order
        return _best(chosen, cols, k, sign)
    out_cols = np.empty((n, k), dtype=np.int64)
    out_values = np.empty((n, k), dtype=values.dtype)
    if enough.any():
        out_cols[enough], out_values[enough] = _best(chosen[enough], cols[enough], k, sign)
    if not enough.all():  # NaN in the row (or in the sample's bound): the exact path
        rows = values[~enough]
        out_cols[~enough], out_values[~enough] = _best(rows, np.broadcast_to(np.arange(m), rows.shape), k, sign)
    return out_cols, out_values


def candidates(values: np.ndarray, start: int, k: int) -> Candidates:
    """The top-``k`` candidates of one chunk ``(n_i, n_j)`` whose first column is training point ``start``."""
    values = np.asarray(values)
    h_col, h_val = _best_of_chunk(values, k, -1.0)
    x_col, x_val = _best_of_chunk(values, k, 1.0)
    return h_col + start, h_val, x_col + start, x_val


def merge(parts: list[Candidates], k: int) -> Candidates:
    """The top-``k`` of the union of several chunks' candidates (the same rows)."""
    if len(parts) == 1 and parts[0][0].shape[1] <= k:
        return parts[0]
    out: list[np.ndarray] = []
    for offset, sign in ((0, -1.0), (2, 1.0)):
        indices = np.concatenate([p[offset] for p in parts], axis=1)
        values = np.concatenate([p[offset + 1] for p in parts], axis=1)
        out.extend(_best(values, indices, k, sign))
    return out[0], out[1], out[2], out[3]


def chunk_candidates(path: str, row: tuple[int, int], col: tuple[int, int], k: int) -> Candidates:
    """The candidates of a chunk already in the store (done before a resume), read back."""
    import zarr

    group: Any = zarr.open_group(path, mode="r")
    return candidates(np.asarray(group["influences"][row[0] : row[1], col[0] : col[1]]), col[0], k)


def write_topk(path: str, i: int, row: tuple[int, int], merged: Candidates, flag: int) -> int:
    """Write test block ``i``'s top-k (rows ``row``, ``(n_i, k)`` each), then its done flag ``flag``."""
    import zarr

    group: Any = zarr.open_group(path, mode="r+")
    for (kind, _), offset in zip(KINDS, (0, 2)):
        idx, val = merged[offset], merged[offset + 1]
        width = idx.shape[1]
        group[f"top_{kind}_indices"][row[0] : row[1], :width] = idx
        group[f"top_{kind}_values"][row[0] : row[1], :width] = val
    group["topk_done"][i] = flag
    return i
