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
- optional ``solver_info`` ``(n_test_blocks, 3)`` float64 for iterative solvers (CG, LiSSA):
  per test block the iterations, the largest relative residual (LiSSA: relative update) and
  the number of right-hand sides that missed the tolerance; NaN until recorded;
- attributes under ``"dask_influence"``: the job's configuration, the sign convention,
  shapes, library versions and ``complete`` (true only once every flag is set).

Every write covers whole chunks, so concurrent tasks never share one. Every array is
written with a CRC32C checksum after zstd compression, so a truncated or altered chunk
fails to decode; :func:`verify_store` finds such chunks (and flagged chunks whose file is
missing) so that ``resume`` recomputes them. See ``docs/reliability.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    solver_info: bool = False  # an iterative solver: record residuals per test block

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(self.test_sizes), sum(self.train_sizes)) + tuple(self.feature_shape or ())

    @property
    def chunks(self) -> tuple[int, ...]:
        return (max(self.test_sizes), max(self.train_sizes)) + tuple(self.feature_shape or ())


def _codecs() -> dict:
    """zstd, then a CRC32C checksum: truncation or bit flips fail to decode."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()]}


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_path(path: str | os.PathLike) -> None:
    """Refuse a local output path that is a file or lies in a directory this process cannot write.

    Writes and removes a probe file in the store's directory (or, for a new store, in its
    nearest existing ancestor). URLs are not checked.

    Raises:
        StoreError: naming the path, the directory and the reason.
    """
    path = os.fspath(path)
    if "://" in path:
        return
    if os.path.isfile(path):
        raise StoreError(f"The output path {path!r} is a file; pass a directory path for the zarr store.")
    where = _nearest_existing(path)
    if os.path.isfile(where):
        raise StoreError(f"Cannot create the output store {path!r}: {where!r} is a file, not a directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dask-influence-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise StoreError(
            f"Cannot write the output store {path!r}: the directory {where!r} is not writable "
            f"({err.strerror or err}). Choose a directory you can write to, or fix its permissions."
        ) from None


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
            _check_arrays(path, existing, layout)
            return existing
        else:
            raise StoreError(
                f"The output store {path!r} already exists; pass resume=True to complete it "
                "or overwrite=True to replace it."
            )
    try:
        return _create(path, config, layout)
    except OSError as err:
        raise StoreError(f"Cannot write the output store {path!r}: {err.strerror or err}.") from None


def _check_arrays(path: str, group: zarr.Group, layout: StoreLayout) -> None:
    """The arrays of a store being resumed have the job's shapes, chunks and dtype."""
    expected = {"influences": (layout.shape, layout.chunks, layout.dtype),
                "influences_done": ((len(layout.test_sizes), len(layout.train_sizes)), None, "int8")}
    if layout.self_influences:
        expected["self_influences"] = ((sum(layout.train_sizes),), (max(layout.train_sizes),), layout.dtype)
    if layout.top_k:
        expected["top_helpful_indices"] = ((sum(layout.test_sizes), layout.top_k), None, "int64")
    for name, (shape, chunks, dtype) in expected.items():
        if name not in group:
            raise StoreError(f"The store {path!r} has no array {name!r} although its attributes match this "
                             "job; it was altered. Pass overwrite=True to start afresh.")
        a = group[name]
        if (tuple(a.shape) != tuple(shape) or (chunks is not None and tuple(a.chunks) != tuple(chunks))
                or str(a.dtype) != dtype):
            raise StoreError(
                f"The array {name!r} of the store {path!r} has shape {tuple(a.shape)}, chunks "
                f"{tuple(a.chunks)} and dtype {a.dtype}, but this job needs shape {tuple(shape)}"
                + (f", chunks {tuple(chunks)}" if chunks is not None else "") + f" and dtype {dtype}; "
                "the store was altered. Pass overwrite=True to start afresh."
            )
    if layout.solver_info and "solver_info" not in group:
        _create_solver_info(group, len(layout.test_sizes))


def _create_solver_info(group: zarr.Group, n_blocks: int) -> None:
    group.create_array("solver_info", shape=(n_blocks, 3), chunks=(1, 3), dtype="float64", fill_value=np.nan,
                       **_codecs())


def _open_existing(path: str) -> zarr.Group | None:
    try:
        group = zarr.open_group(path, mode="r+")
    except Exception:
        return None
    return group if ATTR in group.attrs else None


def _create(path: str, config: dict, layout: StoreLayout) -> zarr.Group:
    group = zarr.open_group(path, mode="w")
    n_i, n_j = len(layout.test_sizes), len(layout.train_sizes)
    codecs = _codecs()
    group.create_array("influences", shape=layout.shape, chunks=layout.chunks, dtype=layout.dtype,
                       fill_value=np.nan, config={"write_empty_chunks": True}, **codecs)
    group.create_array("influences_done", shape=(n_i, n_j), chunks=(1, 1), dtype="int8", fill_value=0, **codecs)
    if layout.self_influences:
        group.create_array("self_influences", shape=(sum(layout.train_sizes),), chunks=(max(layout.train_sizes),),
                           dtype=layout.dtype, fill_value=np.nan, config={"write_empty_chunks": True}, **codecs)
        group.create_array("self_influences_done", shape=(n_j,), chunks=(1,), dtype="int8", fill_value=0, **codecs)
    if layout.top_k:
        k = layout.top_k
        shape, chunks = (sum(layout.test_sizes), k), (max(layout.test_sizes), k)
        for kind in ("helpful", "harmful"):
            group.create_array(f"top_{kind}_indices", shape=shape, chunks=chunks, dtype="int64", fill_value=-1,
                               config={"write_empty_chunks": True}, **codecs)
            group.create_array(f"top_{kind}_values", shape=shape, chunks=chunks, dtype=layout.dtype,
                               fill_value=np.nan, config={"write_empty_chunks": True}, **codecs)
        group.create_array("topk_done", shape=(n_i,), chunks=(1,), dtype="int8", fill_value=0, **codecs)
    if layout.solver_info:
        _create_solver_info(group, n_i)
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
            done, _ = read_flags(group[flag])
            out[name] = (int(done.sum()), int(done.size))
    return out


def read_flags(array: Any) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The done flags of a flag array as booleans, and the positions of unreadable flags.

    A flag whose chunk does not decode (a damaged file) counts as not done.
    """
    try:
        return np.asarray(array[...]) == 1, []
    except Exception:
        pass
    flags = np.zeros(array.shape, dtype=bool)
    bad = []
    for idx in np.ndindex(*array.shape):  # one chunk per flag
        try:
            flags[idx] = bool(np.asarray(array[idx]) == 1)
        except Exception:
            bad.append(tuple(int(k) for k in idx))
    return flags, bad


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


# -- verification of a store before resume ------------------------------------------------

@dataclass
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        checked: flagged chunks checked (top-k rows count once for their four arrays).
        damaged: per tracked array (``influences``, ``self_influences``, ``top_k``), the chunk
            coordinates whose flag is set but whose file is missing or does not decode.
        unreadable_flags: per tracked array, the flags whose own chunk does not decode.
        bytes_read: bytes of chunk files read (0 with ``mode="exists"``).
        seconds: wall time of the verification.
    """

    mode: str = "full"
    checked: int = 0
    damaged: dict[str, list] = field(default_factory=dict)
    unreadable_flags: dict[str, list] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def repaired(self) -> int:
        """Chunks found damaged (they are recomputed), not counting unreadable flags."""
        return sum(len(v) for v in self.damaged.values())

    def as_dict(self) -> dict:
        return {"mode": self.mode, "checked": self.checked, "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3),
                "damaged": {k: [list(map(int, c)) if isinstance(c, tuple) else int(c) for c in v]
                            for k, v in self.damaged.items() if v},
                "unreadable_flags": {k: [list(c) for c in v] for k, v in self.unreadable_flags.items() if v}}


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    bounds = np.cumsum([0] + list(sizes))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _chunk_keys(array: Any) -> set[str] | None:
    """The keys of the chunk files an array has in its store (one listing), or None if unknown."""
    try:
        from zarr.core.sync import sync

        store, prefix = array.store_path.store, array.store_path.path

        async def collect() -> set[str]:
            return {key async for key in store.list_prefix(f"{prefix}/c/" if prefix else "c/")}

        return sync(collect())
    except Exception:
        return None


def _chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    prefix = array.store_path.path
    key = array.metadata.encode_chunk_key(coords)
    return f"{prefix}/{key}" if prefix else key


def verify_store(group: zarr.Group, *, mode: str = "full", threads: int = 8) -> VerifyReport:
    """Check every chunk whose done flag is set: its file exists and (``mode="full"``) decodes.

    ``"full"`` reads each flagged chunk once (``threads`` at a time, on this process), so it
    costs about one read of the store; the CRC32C checksum of each chunk makes a truncated
    or altered file fail to decode. ``"exists"`` only lists the chunk files (one listing per
    array), which finds deleted chunks but not truncated ones. Nothing is modified; see
    :func:`repair`.
    """
    if mode not in ("full", "exists"):
        raise ValueError(f"verify must be True, False, 'full' or 'exists'; got {mode!r}.")
    start = time.perf_counter()
    attrs = group.attrs[ATTR]
    rows, cols = _ranges(attrs["test_block_sizes"]), _ranges(attrs["train_block_sizes"])
    report = VerifyReport(mode=mode)
    checks: list[tuple[str, Any, list[tuple[str, tuple, tuple]]]] = []

    flags, bad = read_flags(group["influences_done"])
    report.unreadable_flags["influences"] = bad
    extra = (0,) * (group["influences"].ndim - 2)
    for i, j in zip(*np.nonzero(flags)):
        i, j = int(i), int(j)
        sel = (slice(*rows[i]), slice(*cols[j]))
        checks.append(("influences", (i, j), [("influences", sel, (i, j) + extra)]))
    if "self_influences_done" in group:
        flags, bad = read_flags(group["self_influences_done"])
        report.unreadable_flags["self_influences"] = bad
        for (j,) in zip(*np.nonzero(flags)):
            checks.append(("self_influences", int(j), [("self_influences", (slice(*cols[int(j)]),), (int(j),))]))
    if "topk_done" in group:
        flags, bad = read_flags(group["topk_done"])
        report.unreadable_flags["top_k"] = bad
        names = [f"top_{kind}_{what}" for kind in ("helpful", "harmful") for what in ("indices", "values")]
        for (i,) in zip(*np.nonzero(flags)):
            i = int(i)
            checks.append(("top_k", i, [(name, (slice(*rows[i]), slice(None)), (i, 0)) for name in names]))

    arrays = {name: group[name] for _, _, parts in checks for name, _, _ in parts}
    keys = {name: _chunk_keys(a) for name, a in arrays.items()}

    def ok(parts: list[tuple[str, tuple, tuple]]) -> tuple[bool, int]:
        nbytes = 0
        for name, sel, coords in parts:
            present = keys[name]
            if present is not None and _chunk_key(arrays[name], coords) not in present:
                return False, nbytes
            if mode == "full":
                try:
                    nbytes += np.asarray(arrays[name][sel]).nbytes
                except Exception:
                    return False, nbytes
        return True, nbytes

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda c: ok(c[2]), checks))
    for (kind, coords, _), (good, nbytes) in zip(checks, results):
        report.bytes_read += nbytes
        if not good:
            report.damaged.setdefault(kind, []).append(coords)
    report.checked = len(checks)
    report.seconds = time.perf_counter() - start
    return report


def repair(group: zarr.Group, report: VerifyReport) -> None:
    """Clear the flags of the damaged chunks (and rewrite unreadable flags as 0) so that they
    are recomputed, and mark the store incomplete if anything was found."""
    flag_of = {"influences": "influences_done", "self_influences": "self_influences_done", "top_k": "topk_done"}
    found = False
    for kind, coords in list(report.damaged.items()) + list(report.unreadable_flags.items()):
        for c in coords:
            group[flag_of[kind]][c if isinstance(c, tuple) else (c,)] = 0
            found = True
    if found and group.attrs[ATTR].get("complete"):
        attrs = dict(group.attrs[ATTR])
        attrs["complete"] = False
        attrs.pop("completed", None)
        group.attrs[ATTR] = attrs


# -- residuals of iterative solvers --------------------------------------------------------

SOLVER_INFO_COLUMNS = ("iterations", "max_relative_residual", "not_converged")


def solver_info_row(info: Any, n_rows: int) -> np.ndarray:
    """``[iterations, largest relative residual, right-hand sides above tolerance]`` of a solve.

    CG (:class:`CgInfo`): the relative residuals ``|b - (H + lambda I) x| / |b|`` per test
    point. LiSSA (:class:`LissaInfo`): its relative update in the last step (it has no
    residual). ``None`` (a solver without ``info_``): NaN.
    """
    if info is None:
        return np.full(3, np.nan)
    if hasattr(info, "relative_residuals"):
        rel = np.asarray(info.relative_residuals.detach().cpu(), dtype=np.float64)
        failed = int((~np.asarray(info.converged.detach().cpu(), dtype=bool)).sum())
        return np.array([info.iterations, float(rel.max()) if rel.size else 0.0, failed], dtype=np.float64)
    return np.array([info.iterations, float(info.relative_update), 0 if info.converged else n_rows],
                    dtype=np.float64)


def write_solver_info(path: str, i: int, row: np.ndarray) -> int:
    """Write the solver's convergence record of test block ``i`` (a task on a worker)."""
    zarr.open_group(path, mode="r+")["solver_info"][i] = row
    return i


def read_solver_info(group: zarr.Group) -> np.ndarray:
    """The ``(n_test_blocks, 3)`` convergence records; NaN rows are missing or unreadable."""
    array = group["solver_info"]
    try:
        return np.asarray(array[...], dtype=np.float64)
    except Exception:
        out = np.full(array.shape, np.nan)
        for i in range(array.shape[0]):
            try:
                out[i] = array[i]
            except Exception:
                pass
        return out


def solver_info_summary(rows: np.ndarray, *, method: str, tolerance: float | None) -> dict:
    """The attribute ``solver_info``: the worst residual over all test blocks and per block."""
    known = ~np.isnan(rows).any(axis=1)
    lissa = "lissa" in method.lower()
    measure = ("relative change of the LiSSA iterate in its last step" if lissa
               else "relative residual |g - (H + lambda I) f| / |g| per test point")
    out: dict[str, Any] = {"measure": measure, "tolerance": tolerance,
                           "blocks_recorded": int(known.sum()), "blocks": int(rows.shape[0])}
    if known.any():
        k = rows[known]
        out.update({"max_relative_residual": float(k[:, 1].max()), "max_iterations": int(k[:, 0].max()),
                    "not_converged": int(k[:, 2].sum()), "converged": bool(k[:, 2].sum() == 0),
                    "per_block_max_relative_residual": [None if np.isnan(r) else float(r) for r in rows[:, 1]]})
    return out
