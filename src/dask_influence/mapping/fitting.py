"""Fitting a solver over the train blocks of a Dask cluster, and saving and restoring the fit.

A solver fits through :meth:`InfluenceModel.fit_blocks` given anything that sums block functions over
the training data: :mod:`.train_blocks` supplies those (the cluster's and this process's; its names are
re-exported here). This module:

- :func:`fit_with_blocks` validates and checksums the blocks, then fits a solver with them,
  or restores a saved fit (:func:`save_fit`, :func:`load_fit`) after checking its model and
  training-data checksums. :func:`restore_fit` restores a saved fit without any pass over
  the training data (``run --resume``): the model, the solver and the data's size, blocks and
  feature shape are checked, not the data's contents.
- the training data as a solver keeps it (CG and LiSSA solve with it): :func:`local_training_data`;
- :func:`solve_factors_on_cluster` computes CG's test factors on the client, one distributed
  sweep per CG iteration, instead of a worker sweeping the whole training set alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..core.blocks import BlockFunction, Each, add_results, curvature_block, finish_each  # noqa: F401  (re-exported)
from ..core.data import TrainingData
from ..core.solvers import fit_record
from ..core.solvers.base import InfluenceModel
from ..storage.urls import is_url
from .sources import BlockSource, DaskArraySource, DatasetSource, to_numpy
from .train_blocks import (  # noqa: F401  (re-exported: the blocks' names where they were)
    SMALL_PAYLOAD,
    ClusterTrainBlocks,
    LocalTrainBlocks,
    TrainBlocks,
    add_block,
    contiguous_groups,
    finish_element,
    inspect_block,
    new_payload,
    run_block,
)

logger = logging.getLogger("dask_influence")

FIT_SUFFIX = ".fit.pt"


# -- the training data as the solver keeps it (CG and LiSSA solve with it) --------------------
class _KnownTrainingData(TrainingData):
    """:class:`TrainingData` whose size and feature shape are known (no counting pass)."""

    def __init__(self, solver: InfluenceModel, data: Any, *, n: int, feature_shape: Sequence[int], batch_size: int):
        super().__init__(
            data,
            dtype=solver.dtype,
            device=solver.device,
            batch_size=batch_size,
            perturb=solver.objective.perturb,
            pairs=solver.objective.pairs,
        )
        self._n = int(n)
        self.feature_shape = torch.Size(feature_shape)


class _DaskArrayBatches:
    """The blocks of dask arrays as a re-iterable of numpy batches."""

    def __init__(self, source: DaskArraySource):
        self.source = source

    def __iter__(self) -> Iterator[Any]:
        for k in range(len(self.source.block_sizes)):
            yield self.source.load_block(k)


def local_training_data(solver: InfluenceModel, source: BlockSource) -> TrainingData:
    """The train blocks as a :class:`TrainingData` in this process (read lazily, block by block)."""
    if isinstance(source, DatasetSource):
        data: Any = DataLoader(
            source.dataset, batch_size=source.block_sizes[0], shuffle=False, collate_fn=source.collate
        )
    elif isinstance(source, DaskArraySource):
        data = _DaskArrayBatches(source)
    else:  # pragma: no cover - every source kind is handled above
        raise TypeError(f"Unsupported train source {type(source).__name__}.")
    return _KnownTrainingData(
        solver, data, n=source.n, feature_shape=source.feature_shape, batch_size=max(source.block_sizes)
    )


# -- fitting, saving and restoring -------------------------------------------------------------------
def data_identity(source: BlockSource) -> dict:
    """What is known of the training data without reading it: size, block sizes, feature shape."""
    return {
        "n": int(source.n),
        "block_sizes": [int(s) for s in source.block_sizes],
        "feature_shape": [int(s) for s in source.feature_shape],
    }


def data_fingerprint(blocks: TrainBlocks, digests: Sequence[str]) -> dict:
    """The identity of the training data: size, blocks, feature shape and a sha256 of its contents."""
    digest = hashlib.sha256()
    for d in digests:
        digest.update(d.encode())
    return {**data_identity(blocks.source), "sha256": digest.hexdigest()}


def fit_with_blocks(
    solver: InfluenceModel, blocks: TrainBlocks, *, path: str | os.PathLike | None = None, refit: bool = False
) -> dict:
    """Fit ``solver`` over ``blocks`` (or restore a matching saved fit from ``path``); returns a report.

    One first pass validates every block (finite values, feature shape, the loss on block 0)
    and checksums it. With ``path``, an existing file is restored instead of fitting, after
    checking that it holds this solver class and hyperparameters, fitted with these model
    weights on this training data (else ``ValueError``); a fresh fit is saved there.

    Returns:
        ``{"reused", "path", "sweeps", "blocks", "n_train", "seconds", "training_data"}``.
    """
    start = time.perf_counter()
    solver.check_model_mode()
    solver.trained_parameters()
    inspected = blocks.map(inspect_block, tuple(blocks.source.feature_shape))
    fingerprint = data_fingerprint(blocks, [digest for digest, _ in inspected])
    float_inputs = inspected[0][1]
    data = local_training_data(solver, blocks.source)
    path = None if path is None else os.fspath(path)
    reused = path is not None and not refit and _exists(path)
    if reused:
        assert path is not None  # reused implies a path
        load_fit(solver, path, training_data=fingerprint, data=data, float_inputs=float_inputs)
    else:
        _fit(solver, blocks, data, float_inputs)
        if path is not None:
            save_fit(solver, path, training_data=fingerprint)
    report = {
        "reused": reused,
        "path": path,
        "sweeps": blocks.sweeps,
        "blocks": len(blocks.sizes),
        "n_train": blocks.n,
        "seconds": time.perf_counter() - start,
        "training_data": fingerprint,
        "data_checked": True,
    }
    logger.debug(  # the CLI says it in its own words
        "%s %s over %d train blocks (%d passes) in %.1f s.",
        "Restored" if reused else "Fitted",
        type(solver).__name__,
        report["blocks"],
        report["sweeps"],
        report["seconds"],
    )
    return report


def restore_fit(solver: InfluenceModel, source: BlockSource, path: str | os.PathLike) -> dict:
    """Restore the saved fit at ``path`` into ``solver`` WITHOUT a pass over the training data.

    For a resume (``run --resume``), whose first run validated and checksummed the same
    training data: :func:`fit_with_blocks` reads every train block to check its contents,
    which costs a pass over the whole training set. Still checked here, as by
    :func:`load_fit` (a mismatch raises ``ValueError``): the file is a saved fit (plain
    data); its solver class, fit-relevant hyperparameters and training loss are this
    solver's; its checksum of the trainable parameters is the model's (the weights); and
    the training data has the recorded size, block sizes and feature shape (read from the
    source, no block is loaded). NOT checked: the contents of the training data (its
    sha256) and the per-block validation (finite values, the loss on block 0); pass
    through :func:`fit_with_blocks` (``verify_data=True``, ``run --resume --verify``) for those.

    Returns:
        the report of :func:`fit_with_blocks`, with ``"data_checked": False`` and no passes.
    """
    start = time.perf_counter()
    solver.check_model_mode()
    solver.trained_parameters()
    identity = data_identity(source)
    path = os.fspath(path)
    load_fit(solver, path, training_data=identity, data=local_training_data(solver, source))
    report = {
        "reused": True,
        "path": path,
        "sweeps": 0,
        "blocks": len(source.block_sizes),
        "n_train": int(source.n),
        "seconds": time.perf_counter() - start,
        "training_data": identity,
        "data_checked": False,
    }
    logger.debug("Restored %s from %s without a pass over the training data.", type(solver).__name__, path)
    return report


def saved_fit_exists(path: str | os.PathLike) -> bool:
    """Whether a saved fit file exists at ``path`` (local or URL)."""
    return _exists(os.fspath(path))


def _fit(solver: InfluenceModel, blocks: TrainBlocks, data: TrainingData, float_inputs: bool | None) -> None:
    """The solver's one fitting path (:meth:`InfluenceModel.fit_blocks`) over ``blocks``."""
    solver.fit_blocks(blocks, data, feature_shape=blocks.source.feature_shape, float_inputs=float_inputs)


def fit_path_for(store: str | os.PathLike) -> str:
    """Where a job keeps its fit: next to the store, ``<store>.fit.pt``."""
    return os.fspath(store).rstrip("/") + FIT_SUFFIX


def save_fit(solver: InfluenceModel, path: str | os.PathLike, *, training_data: dict) -> None:
    """Write ``solver.save``'s file plus the training data's fingerprint, atomically for local paths.

    The file is plain data (:mod:`dask_influence.core.serialization`, format 2): ``solver.save``'s
    record plus ``"training_data"``; it also loads with ``Class.load(path, model, loss)``.
    """
    import io

    from ..storage.urls import replace_atomically

    path = os.fspath(path)
    buffer = io.BytesIO()
    fit_record.write(solver, solver._require_fitted(), buffer, training_data=dict(training_data))
    if not is_url(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomically(path, buffer.getvalue())


def load_fit(
    solver: InfluenceModel,
    path: str | os.PathLike,
    *,
    training_data: dict,
    data: TrainingData,
    float_inputs: bool | None = None,
) -> None:
    """Restore a fit written by :func:`save_fit` into ``solver``, after checking that it belongs to it.

    The file is read as data, never as code (:func:`_read`). Only the hyperparameters a fit
    depends on must match (``solver.config.fit_relevant()``): the ``solve_time`` ones (the
    regularization of the solvers that factorize the unregularized curvature, CG's
    tolerances) may differ, and ``solver`` keeps its own values of them.

    Raises:
        ValueError: the file is not a saved fit (or not plain data: refused unrun, naming the
            file), or holds another solver class or fit-relevant hyperparameters, was fitted
            with other model weights, or on other training data.
    """
    path = os.fspath(path)
    record = _read(path)
    theta = solver.trained_parameters()
    problems = _mismatches(record, solver, theta, training_data)
    if problems:
        raise ValueError(
            f"The saved fit {path!r} does not belong to this solver and data: {'; '.join(problems)}. "
            "Fit again and replace it with refit=True (dask-influence run --refit), or use another fit file."
        )
    fit_record.restore(solver, record, theta, data, where=path, float_inputs=float_inputs)


def _read(path: str) -> dict:
    """The record of a saved fit (:func:`dask_influence.core.solvers.fit_record.read`: plain data,
    only allow-listed classes); a file that names any Python object, or of the old pickled format
    1, is refused with a ``ValueError`` before anything in it runs."""
    from ..storage.urls import open_file

    what = "a saved fit (written by calc.fit(..., path=...))"
    refit = "fit again and replace it with refit=True (dask-influence run --refit)"
    if is_url(path):
        try:
            with open_file(path, "rb") as fh:
                return fit_record.read(fh, where=path, what=what, refit=refit)
        except (OSError, FileNotFoundError) as err:
            raise ValueError(f"{path!r} is not {what}: {err}") from None
    return fit_record.read(path, where=path, what=what, refit=refit)


def _mismatches(record: dict, solver: InfluenceModel, theta: Tensor, training_data: dict) -> list[str]:
    """:func:`~dask_influence.core.solvers.fit_record.mismatches`, and the training data's."""
    problems = fit_record.mismatches(record, solver, theta)
    saved_data = record.get("training_data")
    if saved_data is None:
        problems.append("it records no checksum of its training data (it was written by solver.save)")
    else:  # what is known of the data: everything, or without its sha256 (restore_fit)
        differ = [k for k in training_data if saved_data.get(k) != training_data[k]]
        if differ:
            problems.append(f"it was fitted on other training data (differs in: {', '.join(differ)})")
    return problems


def _exists(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, inner = fsspec.core.url_to_fs(path)
        return bool(fs.exists(inner))
    return os.path.isfile(path)


# -- CG's test factors on the client --------------------------------------------------------------
@contextmanager
def solving_on_cluster(solver: InfluenceModel, client: Any, source: BlockSource) -> Iterator[InfluenceModel]:
    """A copy of a fitted ``solver`` whose curvature products are sweeps over ``source`` on the cluster.

    For CG: every iteration of its solves (``apply_inverse``, ``influence_factors``) on the
    client is ONE sweep over the train blocks, with all right-hand sides of the iteration.
    The blocks are loaded onto the workers on entry and released on exit.
    """
    with ClusterTrainBlocks(client, solver, source) as blocks:
        yield solver.attach_curvature(solver.curvature_over(blocks, solver.trained_parameters()))


def solve_factors_on_cluster(
    solver: InfluenceModel,
    client: Any,
    source: BlockSource,
    graph: Any,
    dsk: dict,
    keys: list,
    *,
    result: Callable[[np.ndarray, Any], Any] | None = None,
) -> int:
    """Solve here, with distributed sweeps, the test blocks whose solves ``keys`` need.

    Each test block's CG runs on the client (:func:`solving_on_cluster`); its result is
    scattered to the cluster and ``dsk``'s solve task of the block (``graph.solve_key(i)``)
    becomes that future.

    Args:
        source: the train blocks the solver was fitted on.
        graph: the job's :class:`~.graph.InfluenceGraph`; ``dsk`` its tasks (changed in place).
        keys: the keys the job computes.
        result: ``(factors, report) -> value`` of a solve task (default: the factors).

    Returns:
        the number of test blocks solved.
    """
    from dask.local import get_sync
    from dask.optimization import cull

    result = result or (lambda factors, _: factors)
    needed, _ = cull(dsk, keys)
    todo = [i for i in range(len(graph.plan.test_sizes)) if graph.solve_key(i) in needed]
    if not todo:
        return 0
    solved: dict[Any, Any] = {}
    start = time.perf_counter()
    with solving_on_cluster(solver, client, source) as cluster_solver:
        for i in todo:
            began = time.perf_counter()
            block = get_sync({**needed, "fit-test-block": graph.test.block_task(i)}, "fit-test-block")
            factors, report = cluster_solver.influence_factors_with_report(block)
            logger.info(
                "Solved test block %d of %d on the client in %.1f s%s.",
                len(solved) + 1,
                len(todo),
                time.perf_counter() - began,
                f" ({report.iterations} iterations)" if getattr(report, "iterations", None) is not None else "",
            )
            solved[graph.solve_key(i)] = client.scatter([result(to_numpy(factors), report)], hash=False)[0]
    logger.info(
        "Solved the factors of %d test blocks on the client, sweeping the train blocks on the cluster, in %.1f s.",
        len(todo),
        time.perf_counter() - start,
    )
    dsk.update(solved)
    return len(todo)
