"""Verification of a gradient index (:mod:`dask_influence.index`), torch-free for ``inspect``.

The store's mechanisms, applied to the index's arrays: the done flags of ``gradients_done``
read as :func:`~.completion.read_flags` reads flags (a flag that does not decode counts as not
written), the chunk files of ``gradients`` listed and read by :mod:`.chunkfiles` (CRC32C
checked), and the findings in a :class:`~.verify.VerifyReport`. The index's own code repairs
(clears the flags of) what is found: :func:`dask_influence.index.layout.repair`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INDEX_ATTR = "dask_influence_index"
"""The attribute that holds a gradient index's record (:mod:`dask_influence.index.layout`)."""

FACTORED_ARRAYS = ("factors_out", "factors_in", "factors_dropped")
"""The per-block arrays of a factored index (``storage="factored"``: :mod:`dask_influence.index.factored`)."""


def data_arrays(group: Any) -> tuple[str, ...]:
    """The arrays written per train block before its flag: ``("gradients",)``, or a factored
    index's :data:`FACTORED_ARRAYS` (its attribute ``storage``)."""
    factored = group.attrs[INDEX_ATTR].get("storage") == "factored"
    return FACTORED_ARRAYS if factored else ("gradients",)


def damaged_blocks(report: Any) -> list[int]:
    """The blocks :func:`verify` found damaged in any data array, or whose flag does not decode."""
    found = {c[0] for c in report.unreadable_flags.get("gradients", [])}
    for name, blocks in report.damaged.items():
        if name != "curvature":
            found |= set(blocks)
    return sorted(found)


def chunk_problem(data: Any) -> str | None:
    """Why a chunk as :func:`~dask_influence.storage.chunkfiles.read_chunks` yields it is unusable, or None."""
    if data is None:
        return "is missing (its file was deleted)"
    if isinstance(data, Exception):
        return f"does not decode ({type(data).__name__}: {str(data).splitlines()[0] if str(data) else ''})"
    if np.issubdtype(data.dtype, np.floating) and np.isnan(data).any():  # a missing chunk read through zarr
        return "is missing (it reads as the fill value NaN)"
    return None


def read_done(group: Any) -> tuple[np.ndarray, list[int]]:
    """Which blocks are flagged written ``(n_blocks,)`` bool, and the blocks whose flag does not decode
    (they count as not written): :func:`~dask_influence.storage.completion.read_flags`."""
    from .completion import read_flags

    flags, bad = read_flags(group["gradients_done"], value=1)
    return flags, [int(c[0]) for c in bad]


def verify(group: Any, *, mode: str = "full", threads: int = 8) -> Any:
    """Check every block flagged written: its chunk of ``gradients`` (of each of a factored index's
    :data:`FACTORED_ARRAYS`) exists (one listing) and, with ``mode="full"``, decodes (CRC32C)
    without NaN; and the curvature, once stored, likewise.

    Returns a :class:`~dask_influence.storage.verify.VerifyReport`: ``damaged[name]`` the blocks
    of each data array, ``damaged["curvature"]`` ``[0]`` when ``C`` is missing or damaged,
    ``unreadable_flags["gradients"]`` the blocks whose own flag does not decode. Nothing is
    modified; see :func:`repair`.
    """
    import time

    from .chunkfiles import present_mask, read_chunks
    from .verify import VerifyReport

    if mode not in ("full", "exists"):
        raise ValueError(f"verify must be True, False, 'full' or 'exists'; got {mode!r}.")
    start = time.perf_counter()
    report = VerifyReport(mode=mode)
    done, bad_flags = read_done(group)
    if bad_flags:
        report.unreadable_flags["gradients"] = [(j,) for j in bad_flags]
    for name in data_arrays(group):
        array = group[name]
        rest = (0,) * (len(array.shape) - 1)
        present = present_mask(array, done.shape, rest)
        broken = done & ~present if present is not None else np.zeros_like(done)
        if mode == "full":
            check = [(int(j), *rest) for j in np.nonzero(done & ~broken)[0]]
            for (j, *_), data in read_chunks(array, check, threads=threads):
                if chunk_problem(data) is not None:
                    broken[j] = True
                elif isinstance(data, np.ndarray):
                    report.bytes_read += data.nbytes
        if broken.any():
            report.damaged[name] = [int(j) for j in np.nonzero(broken)[0]]
    report.checked = int(done.sum())
    if group.attrs[INDEX_ATTR].get("curvature_done"):
        report.checked += 1
        if "curvature" not in group:
            report.damaged["curvature"] = [0]
        else:
            curvature = group["curvature"]
            if mode == "full":
                ((_, data),) = list(read_chunks(curvature, [(0, 0)], threads=1))
                bad = chunk_problem(data) is not None
            else:
                mask = present_mask(curvature, (1, 1))
                bad = mask is not None and not bool(mask[0, 0])
            if bad:
                report.damaged["curvature"] = [0]
    report.seconds = time.perf_counter() - start
    return report


def problems(report: Any) -> str:
    """What :func:`verify` found, in words (``""``: nothing)."""
    parts = []
    how = "missing or not decoding" if report.mode == "full" else "missing (chunk files deleted)"
    for name, damaged in report.damaged.items():
        if name != "curvature" and damaged:
            parts.append(f"block(s) {listed(damaged)} of its array {name!r} are {how} although flagged written")
    flags = [c[0] for c in report.unreadable_flags.get("gradients", [])]
    if flags:
        parts.append(f"the done flag(s) of block(s) {listed(flags)} (array 'gradients_done') do not decode")
    if report.damaged.get("curvature"):
        parts.append("its array 'curvature' is missing or does not decode")
    return "; ".join(parts)


def listed(values: list[int], most: int = 10) -> str:
    """``"2, 5, 7"``: the first ``most`` values, and how many more."""
    shown = ", ".join(map(str, values[:most]))
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")
