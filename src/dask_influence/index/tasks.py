"""Module-level task functions of the index graphs (build, curvature, queries), one per block.

Inputs and outputs are numpy arrays; the projector and the Cholesky factor arrive as graph
dependencies, fetched once per worker; index chunks are read by the workers from the store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.eigen import factor_solve
from ..mapping.tasks import _match_threads
from . import inputs, layout


def write_projected(
    projector: Any, block: Any, path: str, j: int, rows: tuple[int, int], factor_rank: int | None = None
) -> int:
    """Project train block ``j``'s loss gradients and write them (then the block's flag); with
    ``factor_rank`` (a factored index) their per-layer factors of that rank (:mod:`.factored`)."""
    _match_threads()
    if factor_rank is not None:
        out, into, dropped, total = projector.project_factors(block, factor_rank)
        _check_rows(out, j, rows)
        return layout.write_factors(path, j, rows, out, into, (dropped, total))
    return _write(path, j, rows, projector.project(block))


def _check_rows(values: np.ndarray, j: int, rows: tuple[int, int]) -> None:
    """Refuse a train block whose rows are not the plan's ``rows``."""
    if len(values) != rows[1] - rows[0]:
        raise ValueError(f"Train block {j} has {len(values)} samples; the plan expects {rows[1] - rows[0]}.")


def _write(path: str, j: int, rows: tuple[int, int], values: np.ndarray) -> int:
    """Block ``j``'s projected gradients ``values`` ``(n_b, k)`` written at ``rows`` (checked), then its flag."""
    _check_rows(values, j, rows)
    return layout.write_block(path, j, rows, values)


def _gram(phi: np.ndarray) -> np.ndarray:
    """``Phi^T Phi`` ``(k, k)`` float64 of index rows ``phi`` ``(n_b, k)``: formed in float32 (by torch: numpy's
    float32 product was 8x slower here) unless the rows are float64, added in float64 (see :func:`gram_block`)."""
    wide = np.float64 if phi.dtype == np.float64 else np.float32
    rows = torch.from_numpy(np.ascontiguousarray(phi.astype(wide, copy=False)))
    return (rows.T @ rows).double().numpy()


def write_projected_with_ggn(
    projector: Any, block: Any, path: str, j: int, rows: tuple[int, int], weight: float, sampled: dict | None
) -> tuple[int, np.ndarray]:
    """:func:`write_projected` and :func:`curvature_block` (the GGN) of train block ``j`` from one forward
    per sample (:meth:`~.projector.Projector.gradients_and_ggn`): the written count and ``weight * P C_b P^T``."""
    _match_threads()
    values, curvature = projector.gradients_and_ggn(block, sampled, rows[0])
    return _write(path, j, rows, values), weight * curvature


def write_projected_with_gram(
    projector: Any, block: Any, path: str, j: int, rows: tuple[int, int], dtype: str
) -> tuple[int, np.ndarray]:
    """:func:`write_projected` and :func:`gram_block` of train block ``j`` in one task: the gradients are
    squared as they are written (rounded to the stored ``dtype`` first, so the Fisher is the stored rows'),
    not read back from the store (a zarr read was 40% of a 256-sequence GPT-2 build): the written count and
    ``Phi_b^T Phi_b`` ``(k, k)`` float64."""
    _match_threads()
    values = projector.project(block)
    return _write(path, j, rows, values), _gram(values.astype(dtype, copy=False))


def _read(path: str, rows: tuple[int, int], dtype: Any = np.float64) -> np.ndarray:
    """Index rows ``rows`` ``(n_b, k)`` in ``dtype``, every chunk verified (a missing or damaged one
    raises a ``StoreError`` naming it: :func:`~.layout.read_gradients`)."""
    return layout.read_gradients(path, rows, dtype=dtype)


def gram_block(path: str, rows: tuple[int, int]) -> np.ndarray:
    """``Phi_b^T Phi_b`` ``(k, k)`` float64 of the stored gradients of rows ``rows``.

    Formed in float32 (:func:`_gram`) unless the index stores float64 gradients: a block's sum of
    products carries about ``1e-6`` relative rounding, far below what the float32 curvature the index
    stores keeps, at a quarter of the float64 product's time (``n_b k^2`` multiply-adds: the largest
    part of a build at ``k = 4,096``); blocks are added in float64."""
    import zarr

    stored = layout.stored_dtype(zarr.open_group(path, mode="r"))
    return _gram(_read(path, rows, np.float64 if stored == np.float64 else np.float32))


def curvature_block(
    projector: Any, block: Any, curvature: str, weight: float, sampled: dict | None = None, offset: int = 0
) -> np.ndarray:
    """``weight * P C_b P^T`` ``(k, k)`` for one train block (``weight = n_b / n``; ``sampled``:
    the sampled Fisher's draws and seed, ``offset`` the block's first training index)."""
    _match_threads()
    return weight * projector.curvature(block, curvature, sampled, offset)


def total(*parts: np.ndarray) -> np.ndarray:
    """The sum of the parts (a node of the reduction tree)."""
    out = np.array(parts[0], dtype=np.float64, copy=True)
    for part in parts[1:]:
        out += part
    return out


def factor_block(
    projector: Any, chol: np.ndarray, block: Any, recorded: dict | None = None, dtype: str = "float64"
) -> np.ndarray:
    """``(C + lambda I)^-1 P grad f(z)`` for each test point of a block: ``(n_block, k)`` in ``dtype``
    (solved in float64; the queries of a float32 model score in float32).

    ``chol``: the lower Cholesky factor ``L`` ``(k, k)`` of ``C + lambda I``; ``recorded``: the
    index's record of its training inputs, against which the block is checked (:mod:`.inputs`)."""
    _match_threads()
    inputs.check(recorded, block, projector.task.pairs)
    phi = torch.from_numpy(projector.project(block, measurement=True)).double()
    return factor_solve(torch.from_numpy(chol), phi.T).T.numpy().astype(dtype, copy=False)


def score_group(factors: list[np.ndarray], path: str, rows: tuple[int, int], out_dtype: str) -> list[np.ndarray]:
    """Influences of index rows ``rows`` on a group of test blocks: one ``(n_test_block, n_b)``
    array per test block (the index chunk is read once for the whole group)."""
    phi = _read(path, rows, out_dtype)  # float16/float32 rows widened to float32 only, for a float32 model
    stacked = torch.from_numpy(np.concatenate(factors, axis=0).astype(out_dtype, copy=False))
    values = (stacked @ torch.from_numpy(phi).T).numpy()  # torch's matmul: 5-8x numpy's here (measured)
    bounds = np.cumsum([0] + [len(f) for f in factors])
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def self_block(path: str, rows: tuple[int, int], chol: np.ndarray, out_dtype: str) -> np.ndarray:
    """``phi_j^T (C + lambda I)^-1 phi_j`` for index rows ``rows``: ``(n_b,)``."""
    phi = torch.from_numpy(_read(path, rows))
    half = torch.linalg.solve_triangular(torch.from_numpy(chol), phi.T, upper=False)
    return (half * half).sum(0).numpy().astype(out_dtype, copy=False)
