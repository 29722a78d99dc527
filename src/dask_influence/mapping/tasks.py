"""Pure module-level task functions run on the workers, one per block.

Inputs and outputs are numpy arrays (never tensors, which Dask's serializer mishandles on
CUDA and undercounts in memory accounting); the fitted solver arrives as a graph
dependency, fetched once per worker.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.modes import InfluenceMode
from ..storage.solver_info import solver_info_row
from .sources import to_numpy


def _match_threads() -> None:
    """Use as many torch threads as the Dask worker has threads (1 on the default cluster).

    Only in a worker that has its process to itself (started by a nanny, or alone without a
    scheduler). An in-process worker (``LocalCluster(processes=False)``, a notebook's
    ``Client(processes=False)``) shares the process with the user's program and with other
    workers: ``torch.set_num_threads`` changes process-wide settings (MKL's thread count, the
    count every new thread starts with), so a task there would override the user's setting
    for the driver and the other workers. Its threads are left as the process has them.
    """
    if "distributed" not in sys.modules:  # no Dask worker in this process (synchronous scheduler)
        return
    try:
        from distributed import get_worker

        worker = get_worker()
        nthreads = worker.state.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    if not _owns_process(worker):
        return
    if torch.get_num_threads() != nthreads:
        torch.set_num_threads(max(1, int(nthreads)))


_GONE = ("stopping", "stopped", "closing", "closing_gracefully", "closed", "failed")


def _owns_process(worker: Any) -> bool:
    """Whether a Dask worker is the only Dask server of its process."""
    if getattr(worker, "nanny", None):  # a nanny starts each worker in a process of its own
        return True
    from distributed import Scheduler, Worker

    def running(server: Any) -> bool:
        return str(getattr(getattr(server, "status", None), "name", "")) not in _GONE

    schedulers = [s for s in list(Scheduler._instances) if running(s)]
    workers = [w for w in list(Worker._instances) if running(w)]
    return not schedulers and len(workers) <= 1


def factor_block(solver: Any, block: Any) -> np.ndarray:
    """Influence factors of one test block (a batch of numpy arrays): ``(n_block, p)``."""
    _match_threads()
    return to_numpy(solver.influence_factors(block))


def factors_with_info(solver: Any, block: Any) -> tuple[np.ndarray, np.ndarray]:
    """Influence factors of one test block and the solve's report as a ``solver_info`` row:
    ``((n_block, p), (3,))``. The report is the solve's own (concurrent tasks sharing the solver
    on one worker cannot mix them up)."""
    _match_threads()
    factors, report = solver.influence_factors_with_report(block)
    return to_numpy(factors), solver_info_row(report, len(factors))


def influence_group(
    solver: Any,
    factors: list[np.ndarray],
    block: Any,
    mode: str,
    out_dtype: str,
) -> list[np.ndarray]:
    """Influences of one train block on a group of test blocks.

    Args:
        factors: the factor arrays ``(n_test_block, p)`` of the group's test blocks.
        block: the train block (a batch, e.g. ``(x, y)``) with ``n_b`` samples.

    Returns:
        one array per test block: ``(n_test_block, n_b)`` or, in perturbation mode,
        ``(n_test_block, n_b, *feature_shape)``. The train gradients are computed once for
        the whole group.
    """
    _match_threads()
    stacked = _joined(factors)
    values = to_numpy(solver.influences_from_factors(stacked, block, mode=InfluenceMode.parse(mode)))
    values = values.astype(out_dtype, copy=False)
    bounds = np.cumsum([0] + [len(f) for f in factors])
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def influence_stream(
    solver: Any, path: str, blocks: list[tuple[int, tuple[int, int]]], train: list[Any], out_dtype: str, *done: Any
) -> list[list[np.ndarray]]:
    """Influences of consecutive train blocks on test blocks whose factors are saved in a store (one-pass
    scoring).

    Args:
        path: the store; ``blocks``: ``(i, (start, stop))`` of the test blocks, their rows of ``factors``.
        train: the train blocks (batches), scored as one batch: the factors are read once per group of
            their gradients held (:meth:`~dask_influence.core.solvers.engine.SolverEngine.held_gradient_bytes`),
            not once per block.
        done: the tasks that saved the factors (ordering only).

    Returns:
        per train block ``j`` (``n_j`` samples), one ``(n_i, n_j)`` array per test block. The factors are
        read a slab of columns at a time (:class:`~dask_influence.storage.factors.StoredFactorColumns`),
        never held whole.
    """
    from ..storage.factors import StoredFactorColumns

    _match_threads()
    batch, sizes = _joined_blocks(train)
    values = to_numpy(solver.influences_from_factor_columns(StoredFactorColumns(path, blocks), batch))
    values = values.astype(out_dtype, copy=False)
    rows = np.cumsum([0] + [stop - start for _, (start, stop) in blocks])
    cols = np.cumsum([0] + sizes)
    return [[values[r0:r1, c0:c1] for r0, r1 in zip(rows[:-1], rows[1:])] for c0, c1 in zip(cols[:-1], cols[1:])]


def _joined_blocks(blocks: list[Any]) -> tuple[Any, list[int]]:
    """Loaded blocks (batches of numpy arrays, the same structure) as one batch, and their sizes."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(b) for b in blocks]
    sizes = [len(leaves[0]) for leaves, _ in flat]
    if len(blocks) == 1:
        return blocks[0], sizes
    joined = [np.concatenate([leaves[k] for leaves, _ in flat]) for k in range(len(flat[0][0]))]
    return tree_unflatten(joined, flat[0][1]), sizes


def _joined(factors: list[np.ndarray]) -> Tensor:
    """The group's factors as one ``(n, p)`` tensor: one test block's as it is (a copy of ``(n, p)`` floats is a
    gigabyte per two test points at 124M parameters), several concatenated. Scoring only reads it, so a read-only
    array, as Dask may deliver one, is used as well (torch's warning about writes to it is moot)."""
    if len(factors) > 1:
        return torch.from_numpy(np.concatenate(factors, axis=0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(factors[0])


def after(value: Any, *done: Any) -> Any:
    """``value`` (computed by Dask, e.g. a nested task), once ``done`` are: an ordering dependency."""
    return value


def pick(parts: Sequence[Any], k: int) -> Any:
    """The ``k``-th part of a task's list or tuple output."""
    return parts[k]


def self_influence_block(solver: Any, block: Any, out_dtype: str) -> np.ndarray:
    """Self-influences of one train block: ``(n_b,)``."""
    _match_threads()
    return to_numpy(solver.self_influences(block)).astype(out_dtype, copy=False)
