"""Reading a store back: open it, its attributes, completion, statistics, top-k and mean influence.

This is the read side used by the ``inspect``, ``top`` and ``plot`` commands (and usable
from Python). Everything works on complete and incomplete stores alike: only chunks done
with the store's current fit are read (the done state comes from the completion manifest,
see :mod:`.completion`), streamed a bounded window of chunks at a time (:mod:`.chunkfiles`),
and an unreadable flag counts as not done. zarr is imported when a store is opened, so
importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import StoreError
from .chunkfiles import read_chunks
from .completion import CompletionState, is_complete, load_state
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


def done_chunks(
    group: Any, state: CompletionState | None = None
) -> Iterator[tuple[int, int, tuple[int, int], tuple[int, int]]]:
    """``(i, j, rows, cols)`` of every chunk of ``influences`` done with the current fit."""
    info = store_info(group)
    rows = chunk_ranges(info["test_block_sizes"])
    cols = chunk_ranges(info["train_block_sizes"])
    done = (state or load_state(group)).done("influences")  # an unreadable flag counts as not done
    for i, j in zip(*np.nonzero(done)):
        yield int(i), int(j), rows[i], cols[j]


def done_blocks(group: Any, state: CompletionState | None = None) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """``((row start, column start), values)`` of every done chunk of ``influences``, streamed.

    At most a window of chunks is held at a time (:func:`~.chunkfiles.read_chunks`); a chunk
    whose file is missing or does not decode raises :class:`StoreError` (run ``inspect
    --verify``, then ``run --resume``, to repair it).
    """
    array = group["influences"]
    extra = (0,) * (array.ndim - 2)
    starts = {}
    coords = []
    for i, j, (r0, _), (c0, _) in done_chunks(group, state):
        starts[(i, j, *extra)] = (r0, c0)
        coords.append((i, j, *extra))
    for c, data in read_chunks(array, coords):
        if not isinstance(data, np.ndarray):
            reason = "its file is missing" if data is None else " ".join(str(data).split())
            raise StoreError(
                f"Chunk {c[:2]} of 'influences' is marked done but cannot be read ({reason}); run "
                "`dask-influence inspect STORE --verify`, then the job with --resume to recompute it."
            )
        yield starts[c], data


def mean_influence(group: Any, state: CompletionState | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean influence of each training point over the test points of the computed chunks.

    Streams the done chunks (bounded memory). Returns ``(mean, count)``: ``count[j]`` test
    points went into ``mean[j]`` (NaN where no chunk of column ``j`` is done yet).
    """
    n_test, n_train = group["influences"].shape[:2]
    total = np.zeros(n_train, dtype=np.float64)
    count = np.zeros(n_train, dtype=np.int64)
    for (_, c0), block in done_blocks(group, state):
        block = np.asarray(block, dtype=np.float64)
        rows, cols = block.shape[:2]
        total[c0 : c0 + cols] += block.reshape(rows, cols, -1).sum(axis=(0, 2))
        count[c0 : c0 + cols] += rows
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


def _batched(blocks: Iterator[np.ndarray], size: int = 1 << 20) -> Iterator[np.ndarray]:
    """The values of ``blocks`` flattened and joined into arrays of about ``size`` values: a
    store of many tiny chunks is summed with a few large numpy calls (memory: one batch)."""
    pending: list[np.ndarray] = []
    count = 0
    for block in blocks:
        pending.append(np.ravel(block))
        count += block.size
        if count >= size:
            yield np.concatenate(pending)
            pending, count = [], 0
    if pending:
        yield np.concatenate(pending)


def statistics(group: Any, state: CompletionState | None = None) -> dict:
    """Summary statistics of the computed chunks of every array, streamed (bounded memory).

    Running sums over the done chunks, read a window at a time (:func:`done_blocks`); memory
    does not grow with the store.
    """
    state = state or load_state(group)
    out = {}
    moments, positive = _Moments(), 0
    for values in _batched(block for _, block in done_blocks(group, state)):
        moments.add(values)
        positive += int((values > 0).sum())
    out["influences"] = moments.summary()
    if moments.n:
        out["influences"]["fraction_positive"] = positive / moments.n
    if "self_influences" in group and "self_influences" in state.values:
        s = _Moments()
        done = [(int(j),) for j in np.nonzero(state.done("self_influences"))[0]]

        def blocks() -> Iterator[np.ndarray]:
            for c, data in read_chunks(group["self_influences"], done):
                if not isinstance(data, np.ndarray):
                    raise StoreError(f"Chunk {c[0]} of 'self_influences' is marked done but cannot be read.")
                yield data

        for values in _batched(blocks()):
            s.add(values)
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
    state = load_state(group)
    report = None
    if verify:
        from .verify import verify_store

        report = verify_store(group, state=state)
        for source in (report.damaged, report.unreadable_flags, report.wrong_flags):
            for kind, coords in source.items():
                for c in coords:
                    state.clear(kind, c if isinstance(c, tuple) else (c,))
    done = {k: {"done": d, "total": t} for k, (d, t) in state.counts().items()}
    out = {
        "store": path,
        "complete": is_complete(group, state),
        "completion": done,
        "completion_state": state.as_dict(),
        "fit": info.get("fit"),
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
        out["statistics"] = statistics(group, state)
    if report is not None:
        out["verify"] = report.as_dict()
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
    state = load_state(group)
    if stored_k >= k and "top_k" in state.values and bool(state.done("top_k")[block]):
        out = {"source": f"stored top-k (k={stored_k})", "missing_train_blocks": 0}
        for kind in ("helpful", "harmful"):
            idx = np.asarray(group[f"top_{kind}_indices"][test, :k])
            val = np.asarray(group[f"top_{kind}_values"][test, :k])
            out[kind] = [(int(i), float(v)) for i, v in zip(idx, val) if i >= 0]
        return out
    done = state.done("influences")[block]
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
