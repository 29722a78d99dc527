"""Fitting a solver over the train blocks: every pass over the training data is a sum of per-block results.

A solver's ``_fit(operator, data)`` touches the training data only through curvature products
``operator.matmat(V)`` (and ``operator.dense()``), except EK-FAC, whose two passes are sums of
per-block Kronecker factors (:meth:`EkfacInfluence.block_sums`). Here each pass is one Dask
graph: one task per train block, run where the block was loaded, returning a small result
(``(p, k)`` for ``k`` vectors, the Kronecker factors for EK-FAC; never per-sample gradients).
Each worker holds one contiguous group of blocks and adds its group's results by a binary
tree in index order; the client adds the groups' partial sums in order. The reduction order
is fixed by the number of workers, so the sums are reproducible, and one ``(p, k)`` result
per worker crosses the network. The iteration of CG, Lanczos or the power method stays on
the client. Tasks use the worker's copy of the solver directly: its pickling (when a peer
fetches it) is serialized with forwards by the process-wide forward lock
(:meth:`InfluenceModel.__reduce__`), so a task needs no private copy.

- :class:`ClusterTrainBlocks` loads the blocks once per fit onto the workers of a
  ``distributed.Client`` (contiguous ranges of blocks per worker) and runs the passes there;
  :class:`LocalTrainBlocks` runs the same graphs in this process (Dask's synchronous scheduler).
- :class:`DistributedCurvatureOperator` is ``H`` of the mean training loss as such a sum.
- :func:`fit_with_blocks` fits a solver with them, or restores a saved fit (:func:`save_fit`,
  :func:`load_fit`) after checking its model and training-data checksums.
- :func:`solve_factors_on_cluster` computes CG's test factors on the client, one distributed
  sweep per CG iteration, instead of a worker sweeping the whole training set alone.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..core.data import TrainingData, check_pair, to_tensor
from ..core.gradients import check_finite, flat_params
from ..core.operators import BlockDiagonalOperator, CurvatureOperator, LinearOperator
from ..core.solvers.base import InfluenceModel, _checksum, _to_device
from ..core.solvers.ekfac import EkfacInfluence
from ..storage.urls import is_url
from . import tasks
from .literals import Literal, sent_once, unbox
from .sources import BlockSource, DaskArraySource, DatasetSource, to_numpy

logger = logging.getLogger("dask_influence")

FIT_SUFFIX = ".fit.pt"
SMALL_PAYLOAD = 2**20  # bytes; a larger payload (the vectors V) is broadcast to the workers first


# -- per-block task functions (run on the workers; numpy in, numpy out) ------------------------
def new_payload(value: Any) -> Literal:
    """A value shipped to every task of a pass as one object, with a random Dask token
    (tokenizing the value itself would pickle it); tasks read ``payload.value``."""
    return Literal(value, uuid.uuid4().hex)


def _block_tensors(solver: InfluenceModel, block: tuple[np.ndarray, np.ndarray], start: int) -> tuple[Tensor, Tensor]:
    x = to_tensor(block[0], "training inputs", dtype=solver.dtype, device=solver.device)
    y = to_tensor(block[1], "training targets", dtype=solver.dtype, device=solver.device)
    try:
        check_pair(x, y, "training inputs", "training targets")
    except ValueError as err:
        raise type(err)(f"In the training block starting at sample {start}: {err}") from None
    return x, y


def _block_operator(solver: InfluenceModel) -> CurvatureOperator:
    theta = flat_params(solver.model, solver._functions.spec)
    return CurvatureOperator(solver._functions, theta, None, solver.curvature)  # type: ignore[arg-type]


def inspect_block(solver: InfluenceModel, block: tuple, start: int, weight: float, payload: Literal) -> str:
    """Validate a block (finite, feature shape; the loss on block 0) and return its sha256."""
    tasks._match_threads()
    x, y = _block_tensors(solver, block, start)
    if tuple(x.shape[1:]) != tuple(payload.value):
        raise ValueError(f"The training block starting at sample {start} has feature shape "
                         f"{tuple(x.shape[1:])}; the first block has {tuple(payload.value)}.")
    if start == 0:
        solver._check_loss(x, y)
    digest = hashlib.sha256()
    for array in block:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def curvature_block(solver: InfluenceModel, block: tuple, start: int, weight: float, payload: Literal) -> np.ndarray:
    """``(n_b / n) * H_b V`` of one block for ``V`` ``(p, k)``: ``(p, k)``."""
    tasks._match_threads()
    x, y = _block_tensors(solver, block, start)
    v = torch.from_numpy(payload.value).to(device=solver.device, dtype=solver.dtype)
    return to_numpy(weight * _block_operator(solver).batch_matmat(x, y, v))


def dense_block(solver: InfluenceModel, block: tuple, start: int, weight: float, payload: Literal) -> list[np.ndarray]:
    """``(n_b / n) * H_b`` of one block, restricted to each ``(start, stop)`` range: ``[(p_r, p_r), ...]``."""
    tasks._match_threads()
    ranges, column_chunk = payload.value
    x, y = _block_tensors(solver, block, start)
    operator = _block_operator(solver)
    p = operator.size
    out = []
    for a, b in ranges:
        matrix = torch.empty(b - a, b - a, dtype=solver.dtype, device=solver.device)
        for c0 in range(0, b - a, column_chunk):
            c1 = min(c0 + column_chunk, b - a)
            eye = torch.zeros(p, c1 - c0, dtype=solver.dtype, device=solver.device)
            eye[torch.arange(a + c0, a + c1), torch.arange(c1 - c0)] = 1
            matrix[:, c0:c1] = (weight * operator.batch_matmat(x, y, eye))[a:b]
        out.append(to_numpy(matrix))
    return out


def ekfac_block(solver: EkfacInfluence, block: tuple, start: int, weight: float, payload: Literal) -> list[np.ndarray]:
    """One block's EK-FAC sums (:meth:`EkfacInfluence.block_sums`), float64."""
    tasks._match_threads()
    kind, factors = payload.value
    x, y = _block_tensors(solver, block, start)
    theta = flat_params(solver.model, solver._functions.spec)
    if factors is not None:
        factors = [_to_device(f, solver.device) for f in factors]
    return [to_numpy(t) for t in solver.block_sums(kind, theta, x, y, offset=start, factors=factors)]


def add_results(a: Any, b: Any) -> Any:
    """Sum of two per-block results (arrays, or lists of arrays added elementwise)."""
    if isinstance(a, list):
        return [u + v for u, v in zip(a, b)]
    return a + b


# -- where the blocks are and how a pass runs over them -------------------------------------------
BlockFunction = Callable[[InfluenceModel, tuple, int, float, Literal], Any]


class TrainBlocks:
    """The train blocks of one fit and how per-block functions run over them.

    The blocks are split into contiguous groups, one per place that holds blocks (one group
    in this process, one per worker on a cluster). A sum runs a binary tree of additions over
    each group's blocks in index order where the group is, then adds the groups' partial
    sums in group order here: one ``(p, k)`` result per group crosses the network, and the
    reduction order is fixed by the number of groups alone.

    Attributes:
        source: the blocks.
        groups: the block indices of each group, contiguous, in order.
        sweeps: passes run so far (each one task per block).
    """

    def __init__(self, solver: InfluenceModel, source: BlockSource, places: int = 1):
        self.source = source
        self.sizes = tuple(int(s) for s in source.block_sizes)
        self.starts = tuple(int(s) for s in np.cumsum((0,) + self.sizes[:-1]))
        self.n = int(source.n)
        self.resources = {"GPU": 1} if solver.device.type == "cuda" else None
        self.groups = contiguous_groups(self.starts, self.sizes, self.n, places)
        self.sweeps = 0
        self._token = uuid.uuid4().hex[:12]

    def map(self, fn: BlockFunction, payload: Any = None) -> list:
        """``fn`` on every block; returns the per-block results in block order."""
        dsk, keys = self._tasks(fn, payload)
        results = self._get(dsk, [[keys[k] for k in group] for group in self.groups])
        return [r for group in results for r in group]

    def sum(self, fn: BlockFunction, payload: Any = None) -> Any:
        """The sum of ``fn`` over all blocks: a tree per group where the group is, then the groups here."""
        dsk, keys = self._tasks(fn, payload)
        name = f"{keys[0][0]}-sum"
        tops = []
        for g, group in enumerate(self.groups):
            level, depth = [keys[k] for k in group], 0
            while len(level) > 1:
                depth += 1
                nxt = []
                for i in range(0, len(level) - 1, 2):
                    dsk[(name, g, depth, i // 2)] = (add_results, level[i], level[i + 1])
                    nxt.append((name, g, depth, i // 2))
                level = nxt + level[len(level) - len(level) % 2:]
            tops.append([level[0]])
        partials = [group[0] for group in self._get(dsk, tops)]
        total = partials[0]
        for part in partials[1:]:
            total = add_results(total, part)
        return total

    def _tasks(self, fn: BlockFunction, payload: Any) -> tuple[dict, list]:
        self.sweeps += 1
        name = f"fit-{fn.__name__.replace('_', '-')}-{self._token}-{self.sweeps}"
        solver, blocks, box, dsk = self._refs(new_payload(payload))
        keys = []
        for k, (start, size) in enumerate(zip(self.starts, self.sizes)):
            dsk[(name, 0, k)] = (fn, solver, blocks[k], start, size / self.n, box)
            keys.append((name, 0, k))
        return dsk, keys

    def _refs(self, payload: Literal) -> tuple[Any, list, Any, dict]:
        """References to the solver, the blocks and the payload, and the graph they need."""
        raise NotImplementedError

    def _get(self, dsk: dict, keys: list[list]) -> list[list]:
        """The values of ``keys[g]`` (lists of keys), each list computed where group ``g`` is."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the blocks hold."""

    def __enter__(self) -> "TrainBlocks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def contiguous_groups(starts: Sequence[int], sizes: Sequence[int], n: int, places: int) -> list[list[int]]:
    """Split blocks into at most ``places`` contiguous groups of about equal numbers of samples.

    Block ``k`` goes to the group its middle sample falls in when ``[0, n)`` is cut into
    ``places`` equal parts; empty groups are dropped.
    """
    owner = np.minimum((np.asarray(starts) + np.asarray(sizes) / 2) * places // n, places - 1).astype(int)
    groups = [[k for k in range(len(sizes)) if owner[k] == g] for g in range(places)]
    return [g for g in groups if g]


class LocalTrainBlocks(TrainBlocks):
    """The passes in this process: the same graphs, Dask's synchronous scheduler, one block at a time."""

    def __init__(self, solver: InfluenceModel, source: BlockSource):
        super().__init__(solver, source)
        self._solver = solver
        self._block_keys = [(f"fit-block-{self._token}", k) for k in range(len(self.sizes))]

    def _refs(self, payload: Literal) -> tuple[Any, list, Any, dict]:
        dsk = {**self.source.graph(), f"fit-solver-{self._token}": self._solver,
               f"fit-payload-{self._token}": payload}
        for k, key in enumerate(self._block_keys):
            dsk[key] = self.source.block_task(k)
        return f"fit-solver-{self._token}", self._block_keys, f"fit-payload-{self._token}", dsk

    def _get(self, dsk: dict, keys: list[list]) -> list[list]:
        from dask.local import get_sync

        return [list(group) for group in get_sync(dsk, keys)]


class ClusterTrainBlocks(TrainBlocks):
    """The passes on a Dask cluster.

    The blocks are loaded once, on the workers (one contiguous group of blocks per worker),
    and stay there until :meth:`close`: the training data is spread over the workers' memory
    during the fit, never held by the client. Each group's tasks and partial sums are asked
    of its worker (loosely: another worker takes them if it leaves). The solver (without
    training data) and the dataset are graph keys (recomputed if their worker is lost, like
    the blocks); a large payload of a pass (the vectors ``V``) is broadcast to every worker.
    """

    def __init__(self, client: Any, solver: InfluenceModel, source: BlockSource):
        self.workers = sorted(client.scheduler_info().get("workers", {}))
        if not self.workers:
            raise RuntimeError("The Dask cluster has no workers; start at least one worker to fit.")
        super().__init__(solver, source, places=len(self.workers))
        self.client = client
        key = f"fit-solver-{self._token}"
        name = f"fit-block-{self._token}"
        self._blocks: list[Any] = [None] * len(self.sizes)
        with sent_once():
            self._solver = client.get({key: (unbox, Literal(solver.shippable(), self._token))}, key, sync=False)
            graph = source.graph()
            if isinstance(source, DatasetSource):  # send the dataset once (a graph key: recomputable), not per worker
                graph = {source.key: client.get(graph, source.key, sync=False)}
            for address, members in zip(self.workers, self.groups):
                dsk = {**graph, **{(name, k): source.block_task(k) for k in members}}
                futures = client.get(dsk, [(name, k) for k in members], sync=False, workers=[address],
                                     allow_other_workers=True)
                for k, future in zip(members, futures):
                    self._blocks[k] = future

    def _refs(self, payload: Literal) -> tuple[Any, list, Any, dict]:
        from dask.sizeof import sizeof

        if sizeof(payload.value) < SMALL_PAYLOAD:  # travels with the graph: one round trip less
            key = f"fit-payload-{self._token}-{self.sweeps}"
            return self._solver, self._blocks, key, {key: payload}
        box = self.client.scatter(payload, broadcast=True, hash=False)
        return self._solver, self._blocks, box, {}

    def _get(self, dsk: dict, keys: list[list]) -> list[list]:
        from dask.optimization import cull

        futures = [self.client.get(cull(dsk, group)[0], group, sync=False, workers=[address],
                                   allow_other_workers=True, resources=self.resources)
                   for address, group in zip(self.workers, keys)]
        return self.client.gather(futures)

    def close(self) -> None:
        self._blocks = []
        self._solver = None


# -- the curvature as a sum over blocks -------------------------------------------------------------
class DistributedCurvatureOperator(LinearOperator):
    """``H`` of the mean training loss with each sweep a sum of per-block products.

    ``matmat(V)`` runs one task per train block, ``(n_b / n) * H_b V`` where the block is, and
    adds the ``(p, k)`` results by a fixed binary tree; :meth:`dense` builds ``H`` in ONE
    sweep as a sum of per-block matrices.

    Args:
        blocks: the train blocks (on a cluster or in this process).
        theta: the trained parameters ``(p,)``.

    Attributes:
        num_passes: sweeps over the training data made so far.
    """

    def __init__(self, blocks: TrainBlocks, theta: Tensor):
        self.blocks = blocks
        self.theta = theta
        self.size = int(theta.numel())
        self.dtype = theta.dtype
        self.device = theta.device
        self.num_passes = 0

    def matmat(self, v: Tensor) -> Tensor:
        out = self.blocks.sum(curvature_block, np.ascontiguousarray(to_numpy(v.to(self.dtype))))
        self.num_passes += 1
        return self._finite(torch.from_numpy(np.asarray(out)).to(device=self.device, dtype=self.dtype))

    def dense(self, column_chunk: int = 64) -> Tensor:
        return self.dense_blocks([(0, self.size)], column_chunk)[0]

    def dense_blocks(self, ranges: Sequence[tuple[int, int]], column_chunk: int = 64) -> list[Tensor]:
        """The diagonal blocks ``H[a:b, a:b]`` of each range, symmetrized, from ONE sweep."""
        parts = self.blocks.sum(dense_block, (tuple(ranges), int(column_chunk)))
        self.num_passes += 1
        out = []
        for part in parts:
            m = torch.from_numpy(np.asarray(part)).to(device=self.device, dtype=self.dtype)
            out.append(self._finite(0.5 * (m + m.T)))
        return out

    @staticmethod
    def _finite(out: Tensor) -> Tensor:
        check_finite(
            "A curvature-vector product",
            out,
            hint="The model or loss produced NaN/Inf second derivatives at the trained "
            "parameters; check for overflow in the model or use curvature='ggn'.",
        )
        return out


class DistributedBlockDiagonalOperator(BlockDiagonalOperator):
    """The per-layer blocks of a :class:`DistributedCurvatureOperator`; all dense blocks in one sweep."""

    def __init__(self, inner: DistributedCurvatureOperator, blocks: list[tuple[int, int]]):
        super().__init__(inner, blocks)
        self._dense: list[Tensor] | None = None

    def block_dense(self, b: int, column_chunk: int = 64) -> Tensor:
        if self._dense is None:
            self._dense = self.inner.dense_blocks(self.blocks, column_chunk)  # type: ignore[attr-defined]
        return self._dense[b]


def distributed_operator(solver: InfluenceModel, blocks: TrainBlocks, theta: Tensor) -> LinearOperator:
    """The operator ``solver._fit`` expects (block-diagonal by layer with ``blocks="layer"``), over ``blocks``."""
    operator = DistributedCurvatureOperator(blocks, theta)
    if solver.blocks == "layer":
        slices = [(start, stop) for _, start, stop in solver._functions.spec.layer_slices()]
        return DistributedBlockDiagonalOperator(operator, slices)
    return operator


# -- the training data as the solver keeps it (CG and LiSSA solve with it) --------------------
class _KnownTrainingData(TrainingData):
    """:class:`TrainingData` whose size and feature shape are known (no counting pass)."""

    def __init__(self, data: Any, *, n: int, feature_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device, batch_size: int):
        super().__init__(data, dtype=dtype, device=device, batch_size=batch_size)
        self._n = int(n)
        self.feature_shape = torch.Size(feature_shape)


class _DaskArrayBatches:
    """The blocks of a pair of dask arrays as a re-iterable of numpy ``(x, y)`` batches."""

    def __init__(self, x: Any, y: Any):
        self.x, self.y = x, y

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import dask

        for k in range(self.x.numblocks[0]):
            yield dask.compute(self.x.blocks[k], self.y.blocks[k], scheduler="sync")


def local_training_data(solver: InfluenceModel, source: BlockSource) -> TrainingData:
    """The train blocks as a :class:`TrainingData` in this process (read lazily, block by block)."""
    if isinstance(source, DatasetSource):
        data: Any = DataLoader(source.dataset, batch_size=source.block_sizes[0], shuffle=False,
                               collate_fn=source.collate)
    elif isinstance(source, DaskArraySource):
        data = _DaskArrayBatches(source.x, source.y)
    else:  # pragma: no cover - every source kind is handled above
        raise TypeError(f"Unsupported train source {type(source).__name__}.")
    return _KnownTrainingData(data, n=source.n, feature_shape=source.feature_shape, dtype=solver.dtype,
                              device=solver.device, batch_size=max(source.block_sizes))


# -- fitting, saving and restoring -------------------------------------------------------------------
def data_fingerprint(blocks: TrainBlocks, digests: Sequence[str]) -> dict:
    """The identity of the training data: size, blocks, feature shape and a sha256 of its contents."""
    digest = hashlib.sha256()
    for d in digests:
        digest.update(d.encode())
    return {"n": blocks.n, "block_sizes": list(blocks.sizes),
            "feature_shape": [int(s) for s in blocks.source.feature_shape], "sha256": digest.hexdigest()}


def fit_with_blocks(solver: InfluenceModel, blocks: TrainBlocks, *, path: str | os.PathLike | None = None,
                    refit: bool = False) -> dict:
    """Fit ``solver`` over ``blocks`` (or restore a matching saved fit from ``path``); returns a report.

    One first pass validates every block (finite values, feature shape, the loss on block 0)
    and checksums it. With ``path``, an existing file is restored instead of fitting, after
    checking that it holds this solver class and hyperparameters, fitted with these model
    weights on this training data (else ``ValueError``); a fresh fit is saved there.

    Returns:
        ``{"reused", "path", "sweeps", "blocks", "n_train", "seconds", "training_data"}``.
    """
    start = time.perf_counter()
    solver._check_model_mode()
    theta = flat_params(solver.model, solver._functions.spec)
    check_finite("The model's trainable parameters", theta, hint="Load a model with finite weights.")
    fingerprint = data_fingerprint(blocks, blocks.map(inspect_block, tuple(blocks.source.feature_shape)))
    data = local_training_data(solver, blocks.source)
    path = None if path is None else os.fspath(path)
    reused = path is not None and not refit and _exists(path)
    if reused:
        load_fit(solver, path, training_data=fingerprint, data=data)
    else:
        _fit(solver, blocks, theta, data)
        if path is not None:
            save_fit(solver, path, training_data=fingerprint)
    report = {"reused": reused, "path": path, "sweeps": blocks.sweeps, "blocks": len(blocks.sizes),
              "n_train": blocks.n, "seconds": time.perf_counter() - start, "training_data": fingerprint}
    logger.info("%s %s over %d train blocks (%d passes) in %.1f s.", "Restored" if reused else "Fitted",
                type(solver).__name__, report["blocks"], report["sweeps"], report["seconds"])
    return report


def _fit(solver: InfluenceModel, blocks: TrainBlocks, theta: Tensor, data: TrainingData) -> None:
    solver._theta = None
    if isinstance(solver, EkfacInfluence):
        def sweep(kind: str, factors: Sequence[Any] | None) -> list[Tensor]:
            shipped = None if factors is None else [_to_device(f, torch.device("cpu")) for f in factors]
            return [torch.from_numpy(np.asarray(t)) for t in blocks.sum(ekfac_block, (kind, shipped))]

        solver.fit_from_sums(blocks.n, sweep)
    else:
        solver._fit(distributed_operator(solver, blocks, theta), data)
    _finish(solver, theta, data, blocks.n, blocks.source.feature_shape)


def _finish(solver: InfluenceModel, theta: Tensor, data: TrainingData, n: int, feature_shape: Sequence[int]) -> None:
    """Mark ``solver`` fitted; CG and LiSSA keep a local operator over the training data for their solves."""
    if solver.needs_training_data:
        solver._attach(solver._operator_for(theta, data), data)
    solver._theta = theta
    solver.n_train_ = int(n)
    solver.feature_shape_ = torch.Size(feature_shape)


def fit_path_for(store: str | os.PathLike) -> str:
    """Where a job keeps its fit: next to the store, ``<store>.fit.pt``."""
    return os.fspath(store).rstrip("/") + FIT_SUFFIX


def save_fit(solver: InfluenceModel, path: str | os.PathLike, *, training_data: dict) -> None:
    """Write ``solver.save``'s file plus the training data's fingerprint, atomically for local paths.

    The file is plain data (:mod:`dask_influence.core.serialization`, format 2): ``solver.save``'s
    record plus ``"training_data"``; it also loads with ``Class.load(path, model, loss)``.
    """
    import io

    from ..core import serialization
    from ..storage.urls import replace_atomically

    path = os.fspath(path)
    buffer = io.BytesIO()
    solver.save(buffer)
    buffer.seek(0)
    record = serialization.load(buffer, source="<solver.save>")
    record["training_data"] = dict(training_data)
    buffer = io.BytesIO()
    serialization.save(record, buffer)
    if not is_url(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomically(path, buffer.getvalue())


def load_fit(solver: InfluenceModel, path: str | os.PathLike, *, training_data: dict, data: TrainingData) -> None:
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
    from ..core.solvers.base import _restore_attributes

    path = os.fspath(path)
    record = _read(path)
    theta = flat_params(solver.model, solver._functions.spec)
    problems = _mismatches(record, solver, theta, training_data)
    if problems:
        raise ValueError(
            f"The saved fit {path!r} does not belong to this solver and data: {'; '.join(problems)}. "
            "Fit again and replace it with refit=True (dask-influence run --refit), or use another fit file."
        )
    _restore_attributes(solver, record["attributes"], path)
    _finish(solver, theta, data, record["n_train"], record["feature_shape"])


def _read(path: str) -> dict:
    """The record of a saved fit, read as plain data (``torch.load(..., weights_only=True)`` and
    only allow-listed classes: :func:`dask_influence.core.serialization.load`); a file that
    names any Python object, or of the old pickled format 1, is refused with a ``ValueError``
    before anything in it runs."""
    from ..core import serialization
    from ..storage.urls import open_file

    what = "a saved fit (written by calc.fit(..., path=...))"
    refit = "fit again and replace it with refit=True (dask-influence run --refit)"
    if is_url(path):
        try:
            with open_file(path, "rb") as fh:
                record = serialization.load(fh, source=path, what=what, refit=refit)
        except (OSError, FileNotFoundError) as err:
            raise ValueError(f"{path!r} is not {what}: {err}") from None
    else:
        record = serialization.load(path, what=what, refit=refit)
    if not isinstance(record.get("attributes"), dict) or not isinstance(record.get("hyperparameters"), dict) \
            or not all(k in record for k in ("n_train", "feature_shape")):
        raise ValueError(f"{path!r} is not {what}: it lacks the fitted attributes or hyperparameters.")
    return record


def _mismatches(record: dict, solver: InfluenceModel, theta: Tensor, training_data: dict) -> list[str]:
    problems = []
    name = type(solver).__name__
    if record.get("class") != name:
        problems.append(f"it holds a fitted {record.get('class')}, not a {name}")
    else:  # only what the fit depends on: solve-time hyperparameters (regularization, ...) may differ
        ours = solver.config.fit_relevant()
        saved = {k: v for k, v in record.get("hyperparameters", {}).items() if k not in solver.config.solve_time}
        differ = sorted(k for k in set(ours) | set(saved) if not _same(ours.get(k), saved.get(k)))
        if differ:
            problems.append(f"its hyperparameters differ ({', '.join(differ)})")
    if record.get("num_params") != theta.numel() or record.get("params_checksum") != _checksum(theta):
        problems.append("it was fitted with other model weights (the checksum of the trainable parameters differs)")
    saved_data = record.get("training_data")
    if saved_data is None:
        problems.append("it records no checksum of its training data (it was written by solver.save)")
    elif saved_data != training_data:
        differ = [k for k in training_data if saved_data.get(k) != training_data[k]]
        problems.append(f"it was fitted on other training data (differs in: {', '.join(differ)})")
    return problems


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, (bool, int, float, str, type(None))) or isinstance(b, (bool, int, float, str, type(None))):
        return a == b
    return type(a) is type(b)  # e.g. a Preconditioner instance: its class


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
        local = copy.copy(solver)
        local._operator = distributed_operator(solver, blocks, solver._require_fitted())
        yield local


def solve_factors_on_cluster(solver: InfluenceModel, client: Any, source: BlockSource, dsk: dict, keys: list, *,
                             kinds: dict[Callable, Callable[[InfluenceModel, np.ndarray], Any]] | None = None) -> int:
    """Replace the factor tasks that ``keys`` need by factors solved here with distributed sweeps.

    Each test block's CG runs on the client (:func:`solving_on_cluster`). The results are
    scattered to the cluster and the graph's factor keys point to them.

    Args:
        source: the train blocks the solver was fitted on.
        dsk, keys: the job's graph (changed in place) and the keys to compute.
        kinds: the factor tasks to replace, ``{function: result}``: a task
            ``(function, solver, test_block)`` becomes ``result(solved_solver, factors)``.
            Default: :func:`tasks.factor_block`, whose result is the factors.

    Returns:
        the number of test blocks solved.
    """
    from dask.local import get_sync
    from dask.optimization import cull

    kinds = kinds or {tasks.factor_block: lambda _, factors: factors}
    needed, _ = cull(dsk, keys)
    factor_keys = sorted((k for k, v in needed.items() if isinstance(v, tuple) and v and v[0] in kinds), key=str)
    if not factor_keys:
        return 0
    solved = {}
    start = time.perf_counter()
    with solving_on_cluster(solver, client, source) as cluster_solver:
        for key in factor_keys:
            local = copy.copy(cluster_solver)  # the solve's record (info_) stays with this copy
            x, y = get_sync({**needed, "fit-test-block": needed[key][2]}, "fit-test-block")
            result = kinds[needed[key][0]](local, to_numpy(local.influence_factors(x, y)))
            solved[key] = client.scatter([result], hash=False)[0]
    logger.info("Solved the factors of %d test blocks on the client, sweeping the train blocks on the cluster, "
                "in %.1f s.", len(factor_keys), time.perf_counter() - start)
    dsk.update(solved)
    return len(factor_keys)
