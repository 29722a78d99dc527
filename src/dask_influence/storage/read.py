"""Reading a store back: open it, its attributes, completion, statistics, top-k and mean influence.

This is the read side used by the ``inspect``, ``top`` and ``plot`` commands (and usable
from Python). Everything works on complete and incomplete stores alike: only chunks whose
done flag is set are read, one chunk at a time, and an unreadable flag counts as not done.
zarr is imported when a store is opened, so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import StoreError
from .completion import completion, is_complete, read_flags
from .layout import ATTR
from .urls import is_url

# -- opening a store ------------------------------------------------------------------------


def open_store(path: str) -> Any:
    """Open a dask-influence zarr store read-only, or raise :class:`StoreError` saying why not."""
    import zarr

    if not is_url(path) and not os.path.exists(path):
        raise StoreError(f"No store at {path!r}; pass the path of a zarr store written by `dask-influence run`.")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several kinds for "not a group"
        raise StoreError(f"{path!r} is not a zarr group ({' '.join(str(exc).split())}).") from None
    if ATTR not in group.attrs or "influences" not in group:
        raise StoreError(f"{path!r} is a zarr group but not a dask-influence store (no {ATTR!r} attributes).")
    return group


def store_info(group: Any) -> dict:
    """The ``dask_influence`` attributes of a store."""
    return dict(group.attrs[ATTR])


def require_up_mode(group: Any, command: str) -> None:
    """Raise :class:`StoreError` unless the store holds one value per (test, train) pair (mode ``up``)."""
    mode = store_info(group).get("config", {}).get("mode", "up")
    if mode != "up":
        raise StoreError(f"`{command}` needs a store in mode 'up'; this one has mode {mode!r} (one value per feature).")


# -- computed chunks ------------------------------------------------------------------------


def chunk_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each block, from the block sizes of the store's attributes."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def done_chunks(group: Any) -> Iterator[tuple[int, int, tuple[int, int], tuple[int, int]]]:
    """``(i, j, rows, cols)`` of every chunk of ``influences`` whose done flag is set."""
    info = store_info(group)
    rows = chunk_ranges(info["test_block_sizes"])
    cols = chunk_ranges(info["train_block_sizes"])
    done, _ = read_flags(group["influences_done"])  # an unreadable flag counts as not done
    for i, j in zip(*np.nonzero(done)):
        yield int(i), int(j), rows[i], cols[j]


def mean_influence(group: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean influence of each training point over the test points of the computed chunks.

    Reads the store one chunk at a time. Returns ``(mean, count)``: ``count[j]`` test points
    went into ``mean[j]`` (NaN where no chunk of column ``j`` is done yet).
    """
    n_test, n_train = group["influences"].shape[:2]
    total = np.zeros(n_train, dtype=np.float64)
    count = np.zeros(n_train, dtype=np.int64)
    array = group["influences"]
    for _, _, (r0, r1), (c0, c1) in done_chunks(group):
        block = np.asarray(array[r0:r1, c0:c1], dtype=np.float64)
        total[c0:c1] += block.reshape(r1 - r0, c1 - c0, -1).sum(axis=(0, 2))
        count[c0:c1] += r1 - r0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean, count


# -- statistics -----------------------------------------------------------------------------


class _Moments:
    """Running count, sum, sum of squares, min, max and non-finite count."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.squares = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.nonfinite = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        self.nonfinite += int(values.size - finite.sum())
        values = values[finite]
        if values.size:
            self.n += values.size
            self.total += float(values.sum())
            self.squares += float(np.square(values).sum())
            self.lo = min(self.lo, float(values.min()))
            self.hi = max(self.hi, float(values.max()))

    def summary(self) -> dict:
        if not self.n:
            return {"count": 0, "non_finite": self.nonfinite}
        mean = self.total / self.n
        var = max(self.squares / self.n - mean * mean, 0.0)
        return {
            "count": self.n,
            "min": self.lo,
            "max": self.hi,
            "mean": mean,
            "std": math.sqrt(var),
            "non_finite": self.nonfinite,
        }


def statistics(group: Any) -> dict:
    """Summary statistics of the computed chunks of every array (read chunk by chunk)."""
    out = {}
    moments, positive = _Moments(), 0
    array = group["influences"]
    for _, _, (r0, r1), (c0, c1) in done_chunks(group):
        block = np.asarray(array[r0:r1, c0:c1])
        moments.add(block)
        positive += int((block > 0).sum())
    out["influences"] = moments.summary()
    if moments.n:
        out["influences"]["fraction_positive"] = positive / moments.n
    if "self_influences" in group:
        info = store_info(group)
        s = _Moments()
        flags, _ = read_flags(group["self_influences_done"])
        for j, (c0, c1) in enumerate(chunk_ranges(info["train_block_sizes"])):
            if flags[j]:
                s.add(group["self_influences"][c0:c1])
        out["self_influences"] = s.summary()
    return out


# -- a whole store at a glance ----------------------------------------------------------------


def describe(path: str, group: Any, *, stats: bool = True, verify: bool = False) -> dict:
    """Everything ``inspect`` shows, as a JSON-ready dict (``verify``: read every flagged chunk)."""
    info = store_info(group)
    config = info.get("config", {})
    arrays = {}
    for name in sorted(group.array_keys()):
        a = group[name]
        arrays[name] = {"shape": list(a.shape), "chunks": list(a.chunks), "dtype": str(a.dtype)}
    done = {k: {"done": d, "total": t} for k, (d, t) in completion(group).items()}
    out = {
        "store": path,
        "complete": is_complete(group),
        "completion": done,
        "method": config.get("method"),
        "parameters": config.get("parameters", {}),
        "regularization": config.get("regularization"),
        "mode": config.get("mode"),
        "shape": info.get("shape"),
        "dtype": config.get("dtype"),
        "test_block_sizes": info.get("test_block_sizes"),
        "train_block_sizes": info.get("train_block_sizes"),
        "top_k": config.get("top_k"),
        "self_influences": config.get("self_influences"),
        "num_params": config.get("num_params"),
        "n_train_fit": config.get("n_train_fit"),
        "arrays": arrays,
        "sign_convention": info.get("sign_convention"),
        "versions": info.get("versions", {}),
        "created": info.get("created"),
        "completed": info.get("completed"),
        "solver_info": info.get("solver_info"),
        "lock": lock_status(path),
    }
    if stats:
        out["statistics"] = statistics(group)
    if verify:
        from .verify import verify_store

        out["verify"] = verify_store(group).as_dict()
    return out


def lock_status(path: str) -> dict | None:
    """The store's lock (``<store>.lock``): who holds it and whether it is stale; None if free."""
    from .lock import read_lock

    try:
        found = read_lock(path)
    except Exception:  # a lock that cannot be read is reported by `run`, not here
        return None
    return None if found is None else found.status()


# -- top-k of one test point ------------------------------------------------------------------


def top_of_row(group: Any, test: int, k: int) -> dict:
    """The ``k`` most helpful and harmful training points of test point ``test``.

    Read from the stored top-k arrays when the store has them for the test point's block
    and they hold at least ``k`` entries; otherwise ranked from row ``test`` of the influence
    matrix, read one chunk at a time. Ties keep the lower index first, as in the stored arrays.

    Returns a dict with ``helpful`` and ``harmful`` (lists of ``(index, value)``, most
    extreme first), ``source`` (``"stored top-k"`` or ``"influence row"``) and
    ``missing_train_blocks`` (train blocks of the row not computed yet).
    """
    info = store_info(group)
    n_test, n_train = group["influences"].shape[:2]
    if not 0 <= test < n_test:
        raise StoreError(f"--test must be a test index from 0 to {n_test - 1}; got {test}.")
    rows = chunk_ranges(info["test_block_sizes"])
    block = next(i for i, (r0, r1) in enumerate(rows) if r0 <= test < r1)
    k = min(k, n_train)
    stored_k = info.get("config", {}).get("top_k") or 0
    if stored_k >= k and "topk_done" in group and int(group["topk_done"][block]) == 1:
        out = {"source": f"stored top-k (k={stored_k})", "missing_train_blocks": 0}
        for kind in ("helpful", "harmful"):
            idx = np.asarray(group[f"top_{kind}_indices"][test, :k])
            val = np.asarray(group[f"top_{kind}_values"][test, :k])
            out[kind] = [(int(i), float(v)) for i, v in zip(idx, val) if i >= 0]
        return out
    done = np.asarray(group["influences_done"][block]) == 1
    array = group["influences"]
    values = np.full(n_train, np.nan)
    for j, (c0, c1) in enumerate(chunk_ranges(info["train_block_sizes"])):
        if done[j]:
            values[c0:c1] = np.asarray(array[test, c0:c1])
    valid = np.nonzero(~np.isnan(values))[0]
    if valid.size == 0:
        raise StoreError(f"No influences of test point {test} are computed yet; run the job with --resume.")
    vals = values[valid]
    out = {"source": "influence row", "missing_train_blocks": int((~done).sum())}
    for kind, sign in (("helpful", -1.0), ("harmful", 1.0)):
        order = np.argsort(sign * vals, kind="stable")[:k]
        out[kind] = [(int(valid[o]), float(vals[o])) for o in order]
    return out
