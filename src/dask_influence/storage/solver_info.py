"""The convergence records of iterative solvers (CG, LiSSA): the ``solver_info`` array.

One row per test block, ``[iterations, largest relative residual, right-hand sides above
tolerance]``, written by a task on a worker; summarized into the store's attributes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
    return np.array([info.iterations, float(info.relative_update), 0 if info.converged else n_rows], dtype=np.float64)


def write_solver_info(path: str, i: int, row: np.ndarray) -> int:
    """Write the solver's convergence record of test block ``i`` (a task on a worker)."""
    import zarr

    group: Any = zarr.open_group(path, mode="r+")
    group["solver_info"][i] = row
    return i


def read_solver_info(group: Any) -> np.ndarray:
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
    measure = (
        "relative change of the LiSSA iterate in its last step"
        if lissa
        else "relative residual |g - (H + lambda I) f| / |g| per test point"
    )
    out: dict[str, Any] = {
        "measure": measure,
        "tolerance": tolerance,
        "blocks_recorded": int(known.sum()),
        "blocks": int(rows.shape[0]),
    }
    if known.any():
        k = rows[known]
        out.update(
            {
                "max_relative_residual": float(k[:, 1].max()),
                "max_iterations": int(k[:, 0].max()),
                "not_converged": int(k[:, 2].sum()),
                "converged": bool(k[:, 2].sum() == 0),
                "per_block_max_relative_residual": [None if np.isnan(r) else float(r) for r in rows[:, 1]],
            }
        )
    return out
