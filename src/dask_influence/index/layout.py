"""The zarr layout of a gradient index.

A zarr group (format 3):

- ``gradients``: ``(n_train, k)`` in the index dtype (float16 or float32; float64 for float64
  models), chunked by train block, fill value NaN: the projected loss gradient of each
  training point;
- ``gradients_done``: ``(n_blocks,)`` int8, one chunk per flag, set after its block is written;
- ``curvature``: ``(k, k)`` float64, the preconditioner's undamped curvature ``C`` (the
  projected Hessian or GGN ``P H P^T``, or the projected empirical Fisher ``Phi^T Phi / n``;
  the identity for ``"none"``): queries solve with ``C + lambda I``, so ``lambda`` can change
  without rebuilding;
- attributes under ``"dask_influence_index"``: the format, the model checksum, the task, the
  projection, the data (``n_train``, block sizes, a digest of the first block), the
  preconditioner, library versions, and ``complete``.

Every write covers whole chunks (zstd, then a CRC32C checksum, as the influence stores).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError
from ..storage.index_info import INDEX_ATTR
from ..storage.layout import codecs, normalize_config, versions

ATTR = INDEX_ATTR
FORMAT_VERSION = 1
DTYPES = ("float16", "float32", "float64")


def is_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a gradient index (its attributes say so)."""
    try:
        group: Any = zarr.open_group(os.fspath(path), mode="r")
    except Exception:
        return False
    return ATTR in group.attrs


def block_digest(block: Any) -> str:
    """sha256 of a block's arrays (shapes, dtypes and bytes), leaf by leaf in order."""
    from ..core import batches

    h = hashlib.sha256()
    for leaf in batches.leaves(batches.to_numpy(block)):
        a = np.ascontiguousarray(leaf)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def create(path: str, record: dict, block_sizes: tuple[int, ...], dim: int, dtype: str) -> zarr.Group:
    """Create (replacing whatever is at ``path``) the index group, its arrays and attributes."""
    group = zarr.open_group(path, mode="w")
    compress = codecs()
    group.create_array(
        "gradients",
        shape=(sum(block_sizes), dim),
        chunks=(max(block_sizes), dim),
        dtype=dtype,
        fill_value=np.nan,
        config={"write_empty_chunks": True},
        **compress,
    )
    group.create_array("gradients_done", shape=(len(block_sizes),), chunks=(1,), dtype="int8", fill_value=0, **compress)
    group.attrs[ATTR] = {
        **record,
        "format": FORMAT_VERSION,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "curvature_done": False,
        "complete": False,
    }
    return group


def open_index(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """Open an existing index.

    Raises:
        StoreError: nothing at ``path``, or not a gradient index.
    """
    path = os.fspath(path)
    try:
        group: Any = zarr.open_group(path, mode=mode)  # type: ignore[arg-type]
    except Exception as err:
        raise StoreError(
            f"No gradient index at {path!r} ({type(err).__name__}); build one with GradientIndex.build."
        ) from None
    if ATTR not in group.attrs:
        raise StoreError(
            f"{path!r} is a zarr group but not a gradient index (no {ATTR!r} attributes); "
            "build one with GradientIndex.build or `dask-influence index`."
        )
    return group


def attributes(group: Any) -> dict:
    """The index's attributes (a copy)."""
    return dict(group.attrs[ATTR])


def update(group: Any, **values: Any) -> None:
    """Replace some of the index's attributes."""
    group.attrs[ATTR] = {**attributes(group), **normalize_config(values)}


def done_blocks(group: Any) -> np.ndarray:
    """Which blocks are written: ``(n_blocks,)`` bool (one read of the flag array)."""
    return np.asarray(group["gradients_done"][:]) > 0


def differences(stored: dict, record: dict) -> list[str]:
    """The keys of ``record`` whose stored values differ (as JSON reads them back)."""
    record = normalize_config(record)
    return sorted(k for k in record if stored.get(k) != record[k])


def check_record(path: str, stored: dict, record: dict, what: str) -> None:
    """Refuse an index whose model, task, projection or data differ from ``record``."""
    diff = differences(stored, record)
    if diff:
        details = "; ".join(
            f"{k}: index has {_short(stored.get(k))}, {what} has {_short(normalize_config(record)[k])}" for k in diff
        )
        raise StoreError(
            f"The gradient index {path!r} was built with another {', '.join(diff)} ({details}). "
            "An index is valid only for the model, task and projection it was built with: build a new one "
            "(or pass overwrite=True to rebuild this one)."
        )


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def write_block(path: str, j: int, rows: tuple[int, int], values: np.ndarray) -> int:
    """Write block ``j`` (rows ``rows``) of ``gradients`` and then its done flag."""
    group: Any = zarr.open_group(path, mode="r+")
    array = group["gradients"]
    array[rows[0] : rows[1]] = values.astype(array.dtype, copy=False)
    group["gradients_done"][j] = 1
    return j


def write_curvature(group: Any, curvature: np.ndarray) -> None:
    """Store ``curvature`` ``(k, k)`` float64 (replacing an earlier one)."""
    if "curvature" in group:
        del group["curvature"]
    k = curvature.shape[0]
    group.create_array("curvature", shape=(k, k), chunks=(k, k), dtype="float64", **codecs())
    group["curvature"][:] = curvature


def existing_kind(path: str) -> str | None:
    """``"index"``, ``"other"`` (something not an index) or ``None`` (nothing, or an empty directory)."""
    if os.path.isfile(path):
        return "other"
    if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return None
    return "index" if is_index(path) else "other"


def refuse_other(path: str) -> None:
    """Refuse a path that holds something other than an index."""
    raise StoreError(
        f"The index path {path!r} exists and is not a gradient index; choose another path (it is not deleted)."
    )


def now() -> str:
    """The current UTC time, ISO formatted."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat()
