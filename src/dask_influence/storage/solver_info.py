"""The per-solve error estimates of the solvers that report them: the ``solver_info`` array.

One row per test block, ``[iterations, largest error estimate, right-hand sides above
tolerance]``, written by a task on a worker; summarized into the store's attributes.

A solve's report is read by its attributes, whatever its class (this package imports no
solver): ``iterations`` (int), ``relative_residuals`` (``(k,)``: the solver's error measure
per right-hand side, smaller is better) and ``not_converged`` (int; a report without it is
read from a ``converged`` tensor). The measure depends on the solver:

- CG (``CgInfo``): the relative residual ``|g - (H + lambda I) f| / |g|`` of each test point;
- LiSSA (``LissaInfo``): the same residual, computed exactly by its checking sweeps (with
  ``lambda + dampen * scale`` as the regularization);
- Arnoldi and Nystroem (``LowRankInfo``): the fraction ``|g - V V^T g| / |g|`` of each test
  gradient outside the retained eigenvectors ``V``, where the curvature is taken to be zero;
  not a bound on the error, and without a tolerance. ``iterations`` is the fit's Lanczos steps
  (Arnoldi) or probe vectors (Nystroem).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SOLVER_INFO_COLUMNS = ("iterations", "max_relative_residual", "not_converged")

MEASURES = {
    "cg": "relative residual |g - (H + lambda I) f| / |g| per test point",
    "lissa": "relative residual |g - (H + lambda' I) f| / |g| per test point (lambda' = lambda + dampen * scale_)",
    "lowrank": (
        "fraction |g - V V^T g| / |g| of each test gradient outside the retained eigenvectors V "
        "(where H is taken to be zero; not an error bound)"
    ),
}
"""The measure in the ``solver_info`` attribute, by the kind of solver (:func:`measure_of`)."""


def measure_of(method: str) -> str:
    """The kind of error measure of a solver named ``method`` (its class or registered name):
    ``"lissa"``, ``"lowrank"`` (Arnoldi, Nystroem) or ``"cg"`` (any other)."""
    name = method.lower()
    if "lissa" in name:
        return "lissa"
    if "arnoldi" in name or "nystroem" in name or "nystrom" in name:
        return "lowrank"
    return "cg"


def solver_info_row(info: Any, n_rows: int) -> np.ndarray:
    """``[iterations, largest error estimate, right-hand sides above tolerance]`` of a solve's report.

    See the module docstring for the attributes read. ``None`` (a solver without a report):
    NaN. ``n_rows`` (the block's right-hand sides) counts them all as above tolerance for a
    report that says only ``converged=False``.
    """
    if info is None:
        return np.full(3, np.nan)
    rel = np.asarray(_numpy(info.relative_residuals), dtype=np.float64).reshape(-1)
    if hasattr(info, "not_converged"):
        failed = int(info.not_converged)
    else:
        converged = np.asarray(_numpy(info.converged), dtype=bool)
        failed = int((~converged).sum()) if converged.ndim else (0 if bool(converged) else n_rows)
    return np.array([info.iterations, float(rel.max()) if rel.size else 0.0, failed], dtype=np.float64)


def _numpy(value: Any) -> Any:
    """A tensor (or anything array-like) as something numpy reads."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value


def write_solver_info(path: str, i: int, row: np.ndarray) -> int:
    """Write the solver's record of test block ``i`` (a task on a worker)."""
    import zarr

    group: Any = zarr.open_group(path, mode="r+")
    group["solver_info"][i] = row
    return i


def read_solver_info(group: Any) -> np.ndarray:
    """The ``(n_test_blocks, 3)`` records; NaN rows are missing or unreadable.

    Read in bulk: one listing of the chunk files, then only the chunks that exist, decoded
    directly on a few threads for local stores (:func:`~.chunkfiles.read_chunks`); a chunk that
    does not decode leaves its rows NaN, the others are kept.
    """
    from .chunkfiles import list_chunks, read_chunks

    array = group["solver_info"]
    shape = tuple(int(s) for s in array.shape)
    chunks = tuple(int(c) for c in array.chunks)
    out = np.full(shape, np.nan)
    present = list_chunks(array)
    grid = tuple(-(-extent // size) for extent, size in zip(shape, chunks))
    coords = sorted(present) if present is not None else list(np.ndindex(*grid))
    for c, data in read_chunks(array, coords):
        if isinstance(data, np.ndarray):
            block = tuple(slice(k * size, k * size + n) for k, size, n in zip(c, chunks, data.shape))
            out[block] = data
    return out


def solver_info_summary(rows: np.ndarray, *, method: str, tolerance: float | None) -> dict:
    """The attribute ``solver_info``: the worst estimate over all test blocks and per block.

    Keys: ``measure`` (what the estimate is), ``tolerance`` (``None`` for Arnoldi and Nystroem,
    which have none), ``blocks_recorded``, ``blocks``, and once a block is recorded
    ``max_relative_residual`` (the worst estimate), ``max_iterations``, ``not_converged``,
    ``converged`` (``None`` without a tolerance) and ``per_block_max_relative_residual``; for
    Arnoldi and Nystroem also ``min_captured_fraction`` (``|V^T g| / |g|`` of the least
    captured test gradient).
    """
    known = ~np.isnan(rows).any(axis=1)
    kind = measure_of(method)
    out: dict[str, Any] = {
        "measure": MEASURES[kind],
        "tolerance": None if kind == "lowrank" else tolerance,
        "blocks_recorded": int(known.sum()),
        "blocks": int(rows.shape[0]),
    }
    if known.any():
        k = rows[known]
        worst = float(k[:, 1].max())
        out.update(
            {
                "max_relative_residual": worst,
                "max_iterations": int(k[:, 0].max()),
                "not_converged": int(k[:, 2].sum()),
                "converged": None if out["tolerance"] is None else bool(k[:, 2].sum() == 0),
                "per_block_max_relative_residual": [None if np.isnan(r) else float(r) for r in rows[:, 1]],
            }
        )
        if kind == "lowrank":
            out["min_captured_fraction"] = float(np.sqrt(max(0.0, 1.0 - worst**2)))
    return out
