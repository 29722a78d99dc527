"""The zarr output store: create it, write whole chunks, track completion explicitly.

Layout of the zarr group (zarr format 3):

- ``influences``: ``(n_test, n_train[, *features])``, chunked as (test block, train block),
  fill value NaN;
- ``influences_done``: ``(n_test_blocks, n_train_blocks)`` int8, one chunk per flag, set to
  1 after the matching ``influences`` chunk is written. An absent chunk of ``influences``
  therefore never passes for "computed" (zarr does not write chunks equal to the fill value);
- optional ``self_influences`` ``(n_train,)`` with ``self_influences_done``;
- optional top-k arrays ``top_helpful_indices``/``_values`` and ``top_harmful_indices``/
  ``_values`` ``(n_test, k)`` with ``topk_done``;
- attributes under ``"dask_influence"``: the job's configuration, the sign convention,
  shapes, library versions and ``complete`` (true only once every flag is set).

Every write covers whole chunks, so concurrent tasks never share one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError

ATTR = "dask_influence"
FORMAT_VERSION = 1
SIGN_CONVENTION = (
    "influence[i, j] = grad L(test_i)^T (H + lambda I)^-1 grad L(train_j); positive means "
    "training point j helps test point i (removing it raises the test loss by about "
    "influence / n_train)."
)


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the result."""
    import dask
    import torch

    from .. import __version__

    return {"dask_influence": __version__, "torch": torch.__version__, "dask": dask.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__}


def _normalize(config: dict) -> dict:
    return json.loads(json.dumps(config, sort_keys=True, default=str))


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of the arrays of one job."""

    test_sizes: tuple[int, ...]
    train_sizes: tuple[int, ...]
    feature_shape: tuple[int, ...] | None  # None in "up" mode
    dtype: str
    top_k: int | None
    self_influences: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(self.test_sizes), sum(self.train_sizes)) + tuple(self.feature_shape or ())

    @property
    def chunks(self) -> tuple[int, ...]:
        return (max(self.test_sizes), max(self.train_sizes)) + tuple(self.feature_shape or ())


def _exists(path: str) -> bool:
    return os.path.exists(path) if "://" not in path else bool(zarr.storage.FsspecStore.from_url(path).fs.exists(path))


def prepare_store(path: str, *, config: dict, layout: StoreLayout, resume: bool, overwrite: bool) -> zarr.Group:
    """Create the store, or open an existing one for ``resume`` after checking its configuration.

    Raises:
        StoreError: the path exists and neither ``resume`` nor ``overwrite`` is set; the
            existing store was written with another configuration; the path is a file or a
            directory that is not a dask-influence store.
    """
    if resume and overwrite:
        raise ValueError("Pass resume=True or overwrite=True, not both.")
    path = str(path)
    config = _normalize(config)
    if os.path.isfile(path):
        raise StoreError(f"The output path {path!r} is a file; pass a directory path for the zarr store.")
    if _exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        existing = _open_existing(path)
        if existing is None:
            raise StoreError(
                f"The output path {path!r} exists and is not a dask-influence zarr store; "
                "choose another path (it is not deleted)."
            )
        if overwrite:
            pass  # recreated below
        elif resume:
            stored = existing.attrs[ATTR].get("config")
            if stored != config:
                diff = sorted(k for k in set(stored or {}) | set(config) if (stored or {}).get(k) != config.get(k))
                raise StoreError(
                    f"The store {path!r} was written by a different configuration (differs in: "
                    f"{', '.join(diff)}); resume it with the same solver, data and blocks, or "
                    "pass overwrite=True to start afresh."
                )
            return existing
        else:
            raise StoreError(
                f"The output store {path!r} already exists; pass resume=True to complete it "
                "or overwrite=True to replace it."
            )
    return _create(path, config, layout)


def _open_existing(path: str) -> zarr.Group | None:
    try:
        group = zarr.open_group(path, mode="r+")
    except Exception:
        return None
    return group if ATTR in group.attrs else None


def _create(path: str, config: dict, layout: StoreLayout) -> zarr.Group:
    group = zarr.open_group(path, mode="w")
    n_i, n_j = len(layout.test_sizes), len(layout.train_sizes)
    group.create_array("influences", shape=layout.shape, chunks=layout.chunks, dtype=layout.dtype,
                       fill_value=np.nan, config={"write_empty_chunks": True})
    group.create_array("influences_done", shape=(n_i, n_j), chunks=(1, 1), dtype="int8", fill_value=0)
    if layout.self_influences:
        group.create_array("self_influences", shape=(sum(layout.train_sizes),), chunks=(max(layout.train_sizes),),
                           dtype=layout.dtype, fill_value=np.nan, config={"write_empty_chunks": True})
        group.create_array("self_influences_done", shape=(n_j,), chunks=(1,), dtype="int8", fill_value=0)
    if layout.top_k:
        k = layout.top_k
        shape, chunks = (sum(layout.test_sizes), k), (max(layout.test_sizes), k)
        for kind in ("helpful", "harmful"):
            group.create_array(f"top_{kind}_indices", shape=shape, chunks=chunks, dtype="int64", fill_value=-1,
                               config={"write_empty_chunks": True})
            group.create_array(f"top_{kind}_values", shape=shape, chunks=chunks, dtype=layout.dtype,
                               fill_value=np.nan, config={"write_empty_chunks": True})
        group.create_array("topk_done", shape=(n_i,), chunks=(1,), dtype="int8", fill_value=0)
    group.attrs[ATTR] = {
        "format": FORMAT_VERSION,
        "config": config,
        "sign_convention": SIGN_CONVENTION,
        "shape": list(layout.shape),
        "test_block_sizes": list(layout.test_sizes),
        "train_block_sizes": list(layout.train_sizes),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "complete": False,
    }
    return group


# -- writes from the workers (module-level task functions) ------------------------------

def write_influence_chunks(path: str, j: int, col: tuple[int, int], targets: list[tuple[int, int, int, int]],
                           values: list[np.ndarray]) -> int:
    """Write chunks ``(i, j)`` of ``influences``, each followed by its done flag.

    Args:
        targets: ``(i, row_start, row_stop, position)`` for each chunk to write, where
            ``values[position]`` holds its data (the output of one influence task).

    Returns the number of chunks written.
    """
    group = zarr.open_group(path, mode="r+")
    array, done = group["influences"], group["influences_done"]
    for i, start, stop, position in targets:
        array[start:stop, col[0] : col[1]] = values[position]
        done[i, j] = 1
    return len(targets)


def write_self_chunk(path: str, j: int, col: tuple[int, int], value: np.ndarray) -> int:
    """Write chunk ``j`` of ``self_influences`` and then its done flag."""
    group = zarr.open_group(path, mode="r+")
    group["self_influences"][col[0] : col[1]] = value
    group["self_influences_done"][j] = 1
    return j


def topk_row(path: str, i: int, row: tuple[int, int], train_ranges: list[tuple[int, int]], k: int, *deps: Any) -> int:
    """Merge the top-``k`` helpful and harmful training points of test block ``i``.

    Reads the block's row of chunks one train chunk at a time (memory ``O(n_block * (k + b))``)
    and writes ``(n_block, k)`` indices and values, ordered from most to least extreme.
    """
    group = zarr.open_group(path, mode="r+")
    array = group["influences"]
    n_rows = row[1] - row[0]
    best = {kind: (np.empty((n_rows, 0), np.int64), np.empty((n_rows, 0), array.dtype)) for kind in ("helpful", "harmful")}
    for start, stop in train_ranges:
        block = np.asarray(array[row[0] : row[1], start:stop])
        idx = np.broadcast_to(np.arange(start, stop), block.shape)
        for kind, sign in (("helpful", -1.0), ("harmful", 1.0)):
            cand_idx = np.concatenate([best[kind][0], idx], axis=1)
            cand_val = np.concatenate([best[kind][1], block], axis=1)
            order = np.argsort(sign * cand_val, axis=1, kind="stable")[:, :k]
            best[kind] = (np.take_along_axis(cand_idx, order, 1), np.take_along_axis(cand_val, order, 1))
    for kind in ("helpful", "harmful"):
        idx, val = best[kind]
        width = idx.shape[1]
        group[f"top_{kind}_indices"][row[0] : row[1], :width] = idx
        group[f"top_{kind}_values"][row[0] : row[1], :width] = val
    group["topk_done"][i] = 1
    return i


# -- completion -------------------------------------------------------------------------

def completion(group: zarr.Group) -> dict[str, tuple[int, int]]:
    """``{array: (done, total)}`` for every tracked array of the store."""
    out = {}
    for flag, name in (("influences_done", "influences"), ("self_influences_done", "self_influences"),
                       ("topk_done", "top_k")):
        if flag in group:
            done = np.asarray(group[flag][...])
            out[name] = (int((done == 1).sum()), int(done.size))
    return out


def is_complete(group: zarr.Group) -> bool:
    """True when the store is marked complete AND every flag is set."""
    return bool(group.attrs.get(ATTR, {}).get("complete")) and all(d == t for d, t in completion(group).values())


def mark_complete(group: zarr.Group, extra: dict | None = None) -> None:
    """Set ``complete`` after checking every done flag; raises :class:`StoreError` otherwise."""
    missing = {k: v for k, v in completion(group).items() if v[0] != v[1]}
    if missing:
        raise StoreError(f"Cannot mark the store complete: chunks missing {missing}.")
    attrs = dict(group.attrs[ATTR])
    attrs.update(extra or {})
    attrs["complete"] = True
    attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    group.attrs[ATTR] = attrs
