"""Fitting a solver over the train blocks of a Dask cluster.

The core expresses every pass a fit makes over the training data as a sum over training
blocks of a module-level block function (:mod:`dask_influence.core.blocks`); a solver fits
through :meth:`InfluenceModel.fit_blocks` given anything that sums such functions. This
module supplies the blocks and the reduction, and knows nothing of any solver's math:

- :class:`ClusterTrainBlocks` loads the blocks once per fit onto the workers of a
  ``distributed.Client`` (one contiguous group of blocks per worker) and runs each pass
  there: one task per block (:func:`run_block`: the block's arrays as tensors, the core's
  function, the result back on the CPU), a chain of additions in index order on each
  group's worker, and the groups' partial sums added in order on the client. The order is
  fixed by the number of workers, so sums are reproducible, and one result per worker
  (``(p, k)`` for ``k`` vectors, Kronecker factors for EK-FAC; never per-sample gradients)
  crosses the network. :class:`LocalTrainBlocks` runs the same graphs in this process.
  Tasks use the worker's copy of the solver directly: its pickling (when a peer fetches it)
  is serialized with forwards by the process-wide forward lock
  (:meth:`InfluenceModel.__reduce__`), so a task needs no private copy.
- :func:`fit_with_blocks` validates and checksums the blocks, then fits a solver with them,
  or restores a saved fit (:func:`save_fit`, :func:`load_fit`) after checking its model and
  training-data checksums. :func:`restore_fit` restores a saved fit without any pass over
  the training data (``run --resume``): the model, the solver and the data's size, blocks and
  feature shape are checked, not the data's contents.
- :func:`solve_factors_on_cluster` computes CG's test factors on the client, one distributed
  sweep per CG iteration, instead of a worker sweeping the whole training set alone.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..core import batches
from ..core.blocks import BlockFunction, Each, add_results, curvature_block, finish_each  # noqa: F401  (re-exported)
from ..core.data import TrainingData, input_signature
from ..core.solvers import fit_record
from ..core.solvers.base import InfluenceModel
from ..core.solvers.fit_record import to_device as _to_device
from ..storage.urls import is_url
from . import tasks
from .literals import Literal, broadcast_large, payload_bytes, sent_once, unbox
from .sources import BlockSource, DaskArraySource, DatasetSource, to_numpy

logger = logging.getLogger("dask_influence")

FIT_SUFFIX = ".fit.pt"
SMALL_PAYLOAD = 2**20  # bytes; a larger payload (the vectors V) is broadcast to the workers first


# -- per-block task functions (run on the workers) -------------------------------------------
def new_payload(value: Any) -> Literal:
    """A value shipped to every task of a pass as one object, with a random Dask token
    (tokenizing the value itself would pickle it); tasks read ``payload.value``."""
    return Literal(value, uuid.uuid4().hex)


def _block_tensors(solver: InfluenceModel, block: Any, start: int) -> Any:
    """A loaded block (numpy arrays) as the solver's validated batch of tensors."""
    try:
        return solver.prepare_batch(block, training=True)
    except ValueError as err:
        raise type(err)(f"In the training block starting at sample {start}: {err}") from None


def inspect_block(
    solver: InfluenceModel, block: Any, start: int, weight: float, payload: Literal
) -> tuple[str, bool | None]:
    """Validate a block (finite, feature shape; the loss on block 0); return its sha256 and
    whether the input the task perturbs is floating point (``None`` without one)."""
    tasks._match_threads()
    batch = _block_tensors(solver, block, start)
    shape, is_float = input_signature(batch, solver.objective.perturb)
    if is_float is not None and tuple(shape) != tuple(payload.value):
        raise ValueError(
            f"The training block starting at sample {start} has feature shape "
            f"{tuple(shape)}; the first block has {tuple(payload.value)}."
        )
    if start == 0:
        solver.check_loss(batch)
    digest = hashlib.sha256()
    keyed = isinstance(block, dict)  # a dict's keys are part of the data; a tuple's positions are not named
    for path, array in zip(batches.leaf_paths(block), batches.leaves(block)):
        array = np.ascontiguousarray(array)
        if keyed:
            digest.update(f"{path}:".encode())
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest(), is_float


def run_block(
    fn: BlockFunction,
    solver: InfluenceModel,
    block: Any,
    start: int,
    weight: float,
    payload: Literal,
    out: Any = None,
) -> Any:
    """Run a core block function (:mod:`dask_influence.core.blocks`) on one loaded block.

    The block's arrays become validated tensors on the solver's device, and so does the
    payload (numpy arrays and tensors in it); the result comes back as numpy arrays (Dask
    counts their size right, so placement and memory accounting see the true cost). ``out``
    (numpy arrays, or a list of them, as an earlier call returned) is the running sum the
    function adds its block into, in place where the arrays are writable and on the CPU.
    """
    tasks._match_threads()
    batch = _block_tensors(solver, block, start)
    value = _payload_on(payload.value, solver.device)
    result = fn(solver, batch, start, weight, value, out=None if out is None else _running_sum(out, solver.device))
    return [to_numpy(t) for t in result] if isinstance(result, list) else to_numpy(result)


def add_block(
    total: Any, fn: BlockFunction, solver: InfluenceModel, block: Any, start: int, weight: float, payload: Literal
) -> Any:
    """:func:`run_block` with ``total`` as its running sum: a link of a group's chain. The block
    function adds into the sum as it goes (EK-FAC's float64 factor sums, 2.6 GB on GPT-2-small, are
    neither allocated anew nor added once more per block)."""
    return run_block(fn, solver, block, start, weight, payload, out=total)


def _running_sum(total: Any, device: torch.device) -> Any:
    """``total`` (arrays, or a list of them) as tensors on ``device``: sharing the arrays' memory where
    they are writable CPU arrays (a sum that came from another worker is read-only: copied)."""
    if isinstance(total, list):
        return [_running_sum(t, device) for t in total]
    array = np.asarray(total)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)


def _done(total: Any) -> None:
    """A chain's end has been computed (a marker for progress; holds nothing)."""
    return None


def finish_element(function: Callable[[Tensor, Any], Any], argument: Any, *parts: Any) -> Any:
    """``function(element, argument)`` on the sum of ``parts`` (one element of each group's sum, numpy
    arrays), on the CPU; tensors in the result as numpy arrays (see :class:`~..core.blocks.Each`)."""
    total = parts[0]
    for part in parts[1:]:
        total = add_results(total, part)
    tasks._match_threads()
    return _as_arrays(function(_running_sum(total, torch.device("cpu")), argument))


def _as_arrays(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_as_arrays(v) for v in value)
    return to_numpy(value) if isinstance(value, torch.Tensor) else value


def _tensors(total: Any) -> Any:
    """A sum (an array, or a list of them) as tensors sharing its memory."""
    if isinstance(total, list):
        return [torch.from_numpy(np.asarray(t)) for t in total]
    return torch.from_numpy(np.asarray(total))


def _as_tensors(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_as_tensors(v) for v in value)
    return torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value


def _payload_on(value: Any, device: torch.device) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_payload_on(v, device) for v in value)
    return _to_device(value, device)


# -- where the blocks are and how a pass runs over them -------------------------------------------
RawBlockFunction = Callable[[InfluenceModel, tuple, int, float, Literal], Any]
"""A function of one block's arrays as loaded: ``fn(solver, block, start, weight, payload)``."""


class TrainBlocks:
    """The train blocks of one fit and how per-block functions run over them.

    The blocks are split into contiguous groups, one per place that holds blocks (one group
    in this process, one per worker on a cluster). A sum adds each group's blocks one after
    the other in index order where the group is (a chain: each block's task adds its result in
    place into the sum of the blocks before it, :func:`add_block`, so that a worker holds the sum
    and one block's result; a binary tree over 32 blocks held up to six of EK-FAC's 2.6 GB float64
    factor sums on GPT-2-small, and the kernel ended the workers), then adds the groups' partial
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
        self.on_block: Callable[[int], None] | None = None
        """Called here with the samples of each block (or group of blocks) as a sum finishes it (progress)."""
        self._leaf_counts: dict[Any, int] = {}  # samples per key of a sum's block tasks, and of its groups' tops
        self._group_counts: dict[Any, int] = {}
        self.resources = {"GPU": 1} if solver.device.type == "cuda" else None
        self.groups = contiguous_groups(self.starts, self.sizes, self.n, places)
        self.sweeps = 0
        self._token = uuid.uuid4().hex[:12]

    def map(self, fn: RawBlockFunction, payload: Any = None) -> list:
        """``fn(solver, block_arrays, start, weight, payload)`` on every loaded block (numpy
        arrays, as the source gives them); returns the per-block results in block order."""
        dsk, keys = self._tasks(fn, payload)
        results = self._get(dsk, [[keys[k] for k in group] for group in self.groups])
        return [r for group in results for r in group]

    def sum(self, fn: BlockFunction, payload: Any = None, each: Each | None = None) -> Any:
        """The sum of a core block function over all blocks (the :class:`~dask_influence.core.blocks.BlockSums`
        protocol): a chain per group where the group is, then the groups here; with ``each``, its
        function on each element of the summed list instead (:meth:`_finish_each`)."""
        began = time.perf_counter()
        dsk, keys = self._tasks(fn, payload, wrap=True)
        tops = []
        for group in self.groups:  # a chain: each block's task adds its result into the sum of those before it
            top = keys[group[0]]
            for k in group[1:]:
                dsk[keys[k]] = (add_block, top, *dsk[keys[k]][1:])
                top = keys[k]
            tops.append(top)
        if self.on_block is not None:  # per block in this process; per group (its chain's end) on a cluster
            self._leaf_counts = {keys[k]: self.sizes[k] for k in range(len(self.sizes))}
            self._group_counts = {top: sum(self.sizes[k] for k in group) for top, group in zip(tops, self.groups)}
        try:
            result = self._total(dsk, tops) if each is None else self._finish_each(dsk, tops, each)
        finally:
            self._leaf_counts, self._group_counts = {}, {}
        logger.debug(  # the solver's fit reports its passes (dask_influence.progress)
            "Pass %d over %d train blocks (%s) in %.1f s.",
            self.sweeps,
            len(self.sizes),
            getattr(fn, "__name__", "block sums").replace("_", " "),
            time.perf_counter() - began,
        )
        if each is not None:
            return [_as_tensors(r) for r in result]
        return _tensors(result)

    def _total(self, dsk: dict, tops: list) -> Any:
        """The sum of the groups' sums (``tops``: each group's chain end), added here in group order."""
        partials = [group[0] for group in self._get(dsk, [[top] for top in tops])]
        total = partials[0]
        for part in partials[1:]:
            total = add_results(total, part)
        return total

    def _finish_each(self, dsk: dict, tops: list, each: Each) -> list:
        """``each`` on the summed elements of the groups' sums (``tops``: each group's chain end): here, on
        the sum of the groups, one element after the other."""
        return finish_each(_tensors(self._total(dsk, tops)), each)

    def _tasks(self, fn: Callable, payload: Any, wrap: bool = False) -> tuple[dict, list]:
        self.sweeps += 1
        name = f"fit-{fn.__name__.replace('_', '-')}-{self._token}-{self.sweeps}"
        solver, blocks, box, dsk = self._refs(new_payload(_to_device(payload, torch.device("cpu"))))
        keys = []
        for k, (start, size) in enumerate(zip(self.starts, self.sizes)):
            task = (fn, solver, blocks[k], start, size / self.n, box)
            dsk[(name, 0, k)] = (run_block, *task) if wrap else task
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

    def __enter__(self) -> TrainBlocks:
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
        dsk = {**self.source.graph(), f"fit-solver-{self._token}": self._solver, f"fit-payload-{self._token}": payload}
        for k, key in enumerate(self._block_keys):
            dsk[key] = self.source.block_task(k)
        return f"fit-solver-{self._token}", self._block_keys, f"fit-payload-{self._token}", dsk

    def _get(self, dsk: dict, keys: list[list]) -> list[list]:
        from contextlib import nullcontext

        from dask.callbacks import Callback
        from dask.local import get_sync

        leaves, on_block = self._leaf_counts, self.on_block

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker: Any) -> None:
            if key in leaves and on_block is not None:
                on_block(leaves[key])

        with Callback(posttask=posttask) if leaves else nullcontext():
            # dask's annotation omits nested lists of keys, which get_sync accepts (and returns nested)
            return [list(group) for group in get_sync(dsk, keys)]  # type: ignore[arg-type]


class ClusterTrainBlocks(TrainBlocks):
    """The passes on a Dask cluster.

    The blocks are loaded once, on the workers (one contiguous group of blocks per worker),
    and stay there until :meth:`close`: the training data is spread over the workers' memory
    during the fit, never held by the client. Each group's tasks and partial sums are asked
    of its worker (loosely: another worker takes them if it leaves). The solver (without
    training data) and the dataset are graph keys (recomputed if their worker is lost, like
    the blocks; a solver whose model holds more than ``BROADCAST_BYTES`` is broadcast instead,
    see :func:`~.literals.broadcast_large`); a large payload of a pass (the vectors ``V``) is broadcast to every worker.
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
            # a model over BROADCAST_BYTES (GPT-2-small's 0.5 GB) is scattered to the workers, not held in the graph
            dsk = broadcast_large(client, {key: (unbox, Literal(solver.shippable(), self._token))})
            self._solver = client.get(dsk, key, sync=False)
            graph = source.graph()
            if isinstance(source, DatasetSource):  # send the dataset once (a graph key: recomputable), not per worker
                graph = {source.key: client.get(graph, source.key, sync=False)}
            for address, members in zip(self.workers, self.groups):
                dsk = {**graph, **{(name, k): source.block_task(k) for k in members}}
                futures = client.get(
                    dsk, [(name, k) for k in members], sync=False, workers=[address], allow_other_workers=True
                )
                for k, future in zip(members, futures):
                    self._blocks[k] = future

    def _refs(self, payload: Literal) -> tuple[Any, list, Any, dict]:
        # the arrays reachable from the payload (dask's sizeof takes an object holding them, e.g. EK-FAC's
        # eigenbases for its second pass, 1.2 GB on GPT-2-small, for a few bytes: it travelled in the graph)
        if payload_bytes(payload.value, SMALL_PAYLOAD) < SMALL_PAYLOAD:  # travels with the graph: one round trip less
            key = f"fit-payload-{self._token}-{self.sweeps}"
            return self._solver, self._blocks, key, {key: payload}
        box = self.client.scatter(payload, broadcast=True, hash=False)
        return self._solver, self._blocks, box, {}

    def _get(self, dsk: dict, keys: list[list]) -> list[list]:
        futures = self._submit(dsk, keys)
        self._report(futures)
        return self.client.gather(futures)

    def _submit(self, dsk: dict, keys: list[list]) -> list[list]:
        """Futures of ``keys[g]``, each group's graph asked of its worker."""
        from dask.optimization import cull

        return [
            self.client.get(
                cull(dsk, group)[0],
                group,
                sync=False,
                workers=[address],
                allow_other_workers=True,
                resources=self.resources,
            )
            for address, group in zip(self.workers, keys)
        ]

    def _report(self, futures: list[list]) -> None:
        """Progress: each group's samples as its chain's end (a key of ``_group_counts``) finishes."""
        if self.on_block is None or not self._group_counts:
            return
        from distributed import as_completed

        watched = [f for group in futures for f in group if f.key in self._group_counts]
        for future in as_completed(watched, loop=self.client.loop):
            if future.status != "finished":
                break  # an error: gather raises it
            self.on_block(self._group_counts.get(future.key, 0))

    def _finish_each(self, dsk: dict, tops: list, each: Each) -> list:
        """``each`` on the workers: each group's sum is split into its elements where it is, and each element's
        groups are added and finished on one worker (the costliest first, each to the least loaded one). Only
        the results travel to the client; an element's parts travel between workers."""
        name = f"fit-each-{self._token}-{self.sweeps}"
        count = len(each.costs)
        keys = []
        for g, top in enumerate(tops):
            dsk[(f"{name}-done", g)] = (_done, top)  # the chain's end, for progress: its samples are summed
            for i in range(count):
                dsk[(f"{name}-part", g, i)] = (operator.getitem, top, i)
            keys.append([(f"{name}-done", g)] + [(f"{name}-part", g, i) for i in range(count)])
        if self.on_block is not None:
            self._group_counts = {(f"{name}-done", g): n for g, n in enumerate(self._group_counts.values())}
        futures = self._submit(dsk, keys)
        load = dict.fromkeys(self.workers, 0.0)
        finished: list[Any] = [None] * count
        parts: list[Any] = []
        for i in sorted(range(count), key=lambda i: -each.costs[i]):
            address = min(self.workers, key=load.__getitem__)
            load[address] += each.costs[i]
            key = (name, i)
            parts = [futures[g][1 + i] for g in range(len(tops))]
            finished[i] = self.client.get(
                {key: (finish_element, each.function, each.argument, *parts)},
                key,
                sync=False,
                workers=[address],
                allow_other_workers=True,
            )
        markers = [[group[0]] for group in futures]
        del futures, parts  # the parts are held by the tasks that need them, and let go after
        self._report(markers)
        self.client.gather(markers)  # an error of a pass raises here
        return self.client.gather(finished)

    def close(self) -> None:
        """Release the blocks held on the workers."""
        self._blocks = []
        self._solver = None


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
