"""The zarr layout of a gradient index.

A zarr group (format 3):

- ``gradients``: ``(n_train, k)`` in the index dtype (float16 or float32; float64 for float64
  models), chunked by train block, fill value NaN: the projected loss gradient of each
  training point;
- or, in a factored index (attribute ``storage = "factored"``, :mod:`.factored`), instead of
  ``gradients``: ``factors_out`` ``(n_train, r, sum k_o)`` and ``factors_in``
  ``(n_train, r, sum k_i)`` in the index dtype (per layer ``r`` pairs ``(u, v)`` with
  ``sum_r u_r v_r^T`` the layer's ``(k_o, k_i)`` projected gradient) and ``factors_dropped``
  ``(n_blocks, 2)`` float64 (per block the squared Frobenius norm a truncation left out, and the
  total), chunked by train block like ``gradients``; :func:`read_gradients` densifies them;
- ``gradients_done``: ``(n_blocks,)`` int8, one chunk per flag, set after its block is written;
- ``curvature``: ``(k, k)`` float32 (float64 in a float64 index, and in indexes built before
  the attribute ``curvature_dtype``): with the attribute ``curvature_form = "cholesky"`` the
  lower Cholesky factor ``L`` of ``C + lambda_0 I`` (``lambda_0`` the attribute
  ``curvature_factor_lambda``, the build's regularization; its upper triangle is zeros, which
  the compressor all but removes), else (an indefinite ``C + lambda_0 I``, or an index built
  before the factor was stored) the undamped curvature ``C`` itself. ``C`` is the
  preconditioner's curvature: the projected Hessian or GGN ``P H P^T``, the projected empirical
  Fisher ``Phi^T Phi / n``, or the identity for ``"none"``. Queries at ``lambda_0`` solve with
  the stored factor; another ``lambda`` refactors ``C = L L^T - lambda_0 I``;
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
from ..storage.index_verify import chunk_problem, damaged_blocks, listed, problems, read_done, verify
from ..storage.layout import codecs, normalize_config, versions

ATTR = INDEX_ATTR
FORMAT_VERSION = 1
DTYPES = ("float16", "float32", "float64")
F16_MAX = 65504.0
"""The largest float16: a float16 index refuses a block with a larger entry (never writes inf)."""
ADDED_LATER = ("inputs",)
"""Record keys an index built by an earlier version may lack: a resume records them, a query
without them skips their check."""


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
    n, rows = sum(block_sizes), max(block_sizes)
    if record.get("storage") == "factored":  # per layer r pairs (u, v): see the module
        r, dims = int(record["factor_rank"]), record["projection"]["layer_dims"]
        for name, width in (("factors_out", sum(d[0] for d in dims)), ("factors_in", sum(d[1] for d in dims))):
            group.create_array(
                name,
                shape=(n, r, width),
                chunks=(rows, r, width),
                dtype=dtype,
                fill_value=np.nan,
                config={"write_empty_chunks": True},
                **compress,
            )
        group.create_array(
            "factors_dropped",
            shape=(len(block_sizes), 2),
            chunks=(1, 2),
            dtype="float64",
            fill_value=np.nan,
            **compress,
        )
    else:
        group.create_array(
            "gradients",
            shape=(n, dim),
            chunks=(rows, dim),
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
    """Which blocks are written: ``(n_blocks,)`` bool (a flag that does not decode counts as not written)."""
    return read_done(group)[0]


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
    if array.dtype == np.float16 and len(values) and float(np.abs(values).max()) > F16_MAX:
        i = int(np.abs(values).max(axis=1).argmax())
        raise ValueError(
            f"Training point {rows[0] + i} (block {j}) has a projected gradient entry of "
            f"{float(np.abs(values[i]).max()):.4g}, beyond float16's range ({F16_MAX:g}); build the index "
            "with dtype='float32'."
        )
    array[rows[0] : rows[1]] = values.astype(array.dtype, copy=False)
    group["gradients_done"][j] = 1
    return j


def write_factors(
    path: str, j: int, rows: tuple[int, int], factors_out: np.ndarray, factors_in: np.ndarray, norms: tuple
) -> int:
    """Write block ``j``'s factors (rows ``rows``: ``(n_b, r, sum k_o)`` and ``(n_b, r, sum k_i)``) and
    its ``norms`` (squared Frobenius norm dropped, total), then its done flag."""
    group: Any = zarr.open_group(path, mode="r+")
    out, into = group["factors_out"], group["factors_in"]
    for values in (factors_out, factors_in):
        if out.dtype == np.float16 and values.size and float(np.abs(values).max()) > F16_MAX:
            i = int(np.abs(values).reshape(len(values), -1).max(axis=1).argmax())
            raise ValueError(
                f"Training point {rows[0] + i} (block {j}) has a projected gradient factor of "
                f"{float(np.abs(values[i]).max()):.4g}, beyond float16's range ({F16_MAX:g}); build the index "
                "with dtype='float32'."
            )
    out[rows[0] : rows[1]] = factors_out.astype(out.dtype, copy=False)
    into[rows[0] : rows[1]] = factors_in.astype(into.dtype, copy=False)
    group["factors_dropped"][j] = np.asarray(norms, dtype=np.float64)
    group["gradients_done"][j] = 1
    return j


def stored_dtype(group: Any) -> np.dtype:
    """The dtype the index stores its projected gradients (or their factors) in."""
    return np.dtype(group["factors_out" if "factors_out" in group else "gradients"].dtype)


def factor_dropped(path: str, group: Any) -> float:
    """A factored index's truncation: ``sqrt(sum ||M - M_r||_F^2 / sum ||M||_F^2)`` over every
    training point and layer (``0``: exact), from ``factors_dropped`` (verified)."""
    norms = _read_rows(path, group, "factors_dropped", (0, int(group["factors_dropped"].shape[0])), np.float64)
    dropped, total = (float(v) for v in norms.sum(axis=0))
    return float(np.sqrt(dropped / total)) if total > 0 else 0.0


REPAIR = (
    "run the build again with verification to recompute it (GradientIndex.build(...) verifies every chunk "
    "by default; `dask-influence index JOB.toml --verify`)"
)
"""How to repair a damaged index, as the errors say it."""


def block_rows(group: Any, j: int) -> tuple[int, int]:
    """The rows of block ``j`` (chunk ``(j, 0)`` of ``gradients``; blocks are even with a ragged last one)."""
    sizes = [int(s) for s in attributes(group)["block_sizes"]]
    start = sum(sizes[:j])
    return start, start + sizes[j]


def _damaged(path: str, name: str, j: int, rows: tuple[int, int] | None, what: str) -> StoreError:
    where = f"chunk {j} of its array {name!r}" + (
        f" (block {j}, training points {rows[0]} to {rows[1] - 1})" if rows else ""
    )
    return StoreError(f"The gradient index {path!r} is damaged: {where} {what}; {REPAIR}.")


def read_gradients(path: str, rows: tuple[int, int], group: Any = None, dtype: Any = np.float64) -> np.ndarray:
    """Rows ``rows`` of ``gradients`` ``(rows[1] - rows[0], k)`` in ``dtype`` (float64 by default; the
    queries of a float32 model read float32), each chunk verified.

    Raises:
        StoreError: a chunk is missing, does not decode (checksum), or reads as NaN, naming the
            index, the array, the chunk, its training points and the repair.
    """
    group = group if group is not None else zarr.open_group(path, mode="r")
    if "factors_out" in group:  # a factored index: its factors densified (one point, every query)
        from .factored import densify

        dims = [(int(ko), int(ki)) for ko, ki in group.attrs[ATTR]["projection"]["layer_dims"]]
        out = _read_rows(path, group, "factors_out", rows, None)
        into = _read_rows(path, group, "factors_in", rows, None)
        return densify(out, into, dims, dtype)
    return _read_rows(path, group, "gradients", rows, dtype)


def _read_rows(path: str, group: Any, name: str, rows: tuple[int, int], dtype: Any) -> np.ndarray:
    """Rows ``rows`` of the array ``name`` (chunked by train block along its first axis) in
    ``dtype`` (``None``: as stored), each chunk verified (see :func:`read_gradients`)."""
    from ..storage.chunkfiles import read_chunks

    array = group[name]
    size = int(array.chunks[0])
    rest = (0,) * (len(array.shape) - 1)
    first, last = rows[0] // size, (rows[1] - 1) // size
    parts = []
    for (j, *_), data in read_chunks(array, [(c, *rest) for c in range(first, last + 1)], threads=1):
        problem = chunk_problem(data)
        if problem is not None:
            chunk_rows = (j * size, min((j + 1) * size, int(array.shape[0])))
            raise _damaged(path, name, j, chunk_rows, problem)
        assert isinstance(data, np.ndarray)
        lo, hi = max(rows[0] - j * size, 0), min(rows[1] - j * size, len(data))
        parts.append(np.array(data[lo:hi], dtype=dtype))  # a writable copy (torch.from_numpy)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_curvature(path: str, group: Any = None) -> np.ndarray:
    """The stored ``curvature`` array ``(k, k)`` as float64, verified (see :func:`read_gradients`):
    ``C``, or the Cholesky factor of ``C + lambda_0 I`` where the attribute ``curvature_form`` is
    ``"cholesky"`` (see the module's docstring)."""
    from ..storage.chunkfiles import read_chunks

    group = group if group is not None else zarr.open_group(path, mode="r")
    if "curvature" not in group:
        raise StoreError(f"The gradient index {path!r} has no curvature array (an interrupted build); {REPAIR}.")
    ((_, data),) = list(read_chunks(group["curvature"], [(0, 0)], threads=1))
    problem = chunk_problem(data)
    if problem is not None:
        raise _damaged(path, "curvature", 0, None, problem)
    return np.array(data, dtype=np.float64)  # a writable copy


def check_intact(path: str, group: Any) -> None:
    """Refuse an index whose flags or chunk files are not all there (one listing per array, the
    flags read: no chunk of data is read; queries verify the chunks they read)."""
    report = verify(group, mode="exists")
    done = done_blocks(group)
    found = problems(report)
    if not found and not done.all():
        found = f"block(s) {listed([int(j) for j in np.nonzero(~done)[0]])} are not written"
    if found:
        raise StoreError(f"The gradient index {path!r} is damaged: {found}; {REPAIR}.")


def repair(group: Any, report: Any) -> None:
    """Clear the flags of the damaged blocks (and rewrite unreadable flags as 0), mark the curvature
    not done if it is damaged, and the index incomplete if anything was found: the build then
    recomputes exactly these blocks (and the curvature)."""
    blocks = damaged_blocks(report)
    for j in blocks:
        group["gradients_done"][j] = 0
    if blocks or report.damaged.get("curvature"):
        attrs = attributes(group)
        attrs.pop("completed", None)
        attrs["complete"] = False
        if report.damaged.get("curvature"):
            attrs["curvature_done"] = False
        group.attrs[ATTR] = attrs


def curvature_dtype(index_dtype: str) -> str:
    """The dtype ``C`` is stored in: float64 for a float64 index, else float32 (half the bytes; its
    rounding, ``6e-8`` of ``|C|``, is far below any usable ``lambda``)."""
    return "float64" if index_dtype == "float64" else "float32"


def write_curvature(group: Any, curvature: np.ndarray, dtype: str = "float64") -> None:
    """Store ``curvature`` ``(k, k)`` (``C`` or its factor) in ``dtype`` (replacing an earlier one;
    the index's attributes ``curvature_dtype`` and ``curvature_form`` say which: an index without
    them stored ``C`` in float64)."""
    if "curvature" in group:
        del group["curvature"]
    k = curvature.shape[0]
    group.create_array("curvature", shape=(k, k), chunks=(k, k), dtype=dtype, **codecs())
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
