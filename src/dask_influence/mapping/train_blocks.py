"""The train blocks of a fit: where a solver's passes over the training data run.

The core expresses every pass a fit makes over the training data as a sum over training blocks of a
module-level block function (:mod:`dask_influence.core.blocks`); this module supplies the blocks and the
reduction, and knows nothing of any solver's math:

- :class:`ClusterTrainBlocks` loads the blocks once per fit onto the workers of a ``distributed.Client``
  (one contiguous group of blocks per worker) and runs each pass there: one task per block
  (:func:`run_block`: the block's arrays as tensors, the core's function, the result back on the CPU),
  a chain of in-place additions in index order on each group's worker (:func:`add_block`), and the
  groups' partial sums added in order on the client, or, for a :class:`~dask_influence.core.blocks.Each`,
  each element's parts added and finished on a worker (:func:`finish_element`: EK-FAC's
  eigendecompositions). The order is fixed by the number of workers, so sums are reproducible, and
  one result per worker (``(p, k)`` for ``k`` vectors, Kronecker factors for EK-FAC; never per-sample
  gradients) crosses the network.
- :class:`LocalTrainBlocks` runs the same graphs in this process.

Tasks use the worker's copy of the solver directly: its pickling (when a peer fetches it) is serialized
with forwards by the process-wide forward lock (:meth:`InfluenceModel.__reduce__`), so a task needs no
private copy.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core import batches
from ..core.blocks import BlockFunction, Each, add_results, finish_each
from ..core.data import input_signature
from ..core.solvers.base import InfluenceModel
from ..core.solvers.fit_record import to_device as _to_device
from . import tasks
from .clients import direct_to_workers, trim_workers
from .literals import Literal, broadcast_large, payload_bytes, sent_once, unbox
from .sources import BlockSource, DatasetSource, to_numpy

logger = logging.getLogger("dask_influence")

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
        box = self.client.scatter(payload, broadcast=True, hash=False, direct=direct_to_workers(self.client) or None)
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
        """Release the blocks held on the workers, and the memory they freed (:func:`.clients.trim_workers`)."""
        self._blocks = []
        self._solver = None
        trim_workers(self.client)
