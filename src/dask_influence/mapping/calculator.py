"""DaskInfluenceCalculator and SequentialInfluenceCalculator.

Both map a fitted solver over blocks of test and train data with the same graph
(:mod:`.graph`); the Dask one runs it on a distributed client (the current one, or an
embedded ``LocalCluster`` started and closed per call), the sequential one in this process
with Dask's synchronous scheduler. They give the same numbers.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

import dask.array as da
import numpy as np
import zarr

from ..core.modes import InfluenceMode
from ..core.solvers.base import InfluenceModel
from ..errors import NotFittedError
from . import store as zstore
from .graph import InfluenceGraph, add_self_influence_tasks, build_influence_graph, solver_fingerprint
from .sources import as_source

logger = logging.getLogger("dask_influence")

DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes of test factors held by one influence task


class _BlockCalculator:
    """Shared logic; subclasses say how a graph is executed."""

    def __init__(self, solver: InfluenceModel, *, progress: bool = True, memory_budget: int | str | None = "auto"):
        if not isinstance(solver, InfluenceModel):
            raise TypeError(f"solver must be a dask_influence solver (e.g. CgInfluence); got {type(solver).__name__}.")
        if not solver.is_fitted:
            raise NotFittedError(f"The {type(solver).__name__} is not fitted; call solver.fit(train_loader) first.")
        if memory_budget not in (None, "auto") and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0
        ):
            raise ValueError(f"memory_budget must be a positive number of bytes, 'auto' or None; got {memory_budget!r}.")
        self.solver = solver
        self.progress = bool(progress)
        self.memory_budget = memory_budget
        self.last_run_: dict[str, Any] = {}

    # -- graph ------------------------------------------------------------------------
    def _graph(self, test: Any, train: Any, mode: Any, test_block_size: int | None,
               train_block_size: int | None) -> InfluenceGraph:
        mode = InfluenceMode.parse(mode)
        test_src = as_source(test, block_size=test_block_size, name="test")
        train_src = as_source(train, block_size=train_block_size, name="train")
        fitted = tuple(self.solver.feature_shape_ or ())
        for name, src in (("test", test_src), ("train", train_src)):
            if tuple(src.feature_shape) != fitted:
                raise ValueError(
                    f"The {name} inputs have feature shape {tuple(src.feature_shape)} but the solver "
                    f"was fitted on {fitted}."
                )
        if mode is InfluenceMode.perturbation and not np.issubdtype(train_src.input_dtype, np.floating):
            raise TypeError(
                f"Perturbation influences need floating-point train inputs; got {train_src.input_dtype}. "
                "Use mode='up' for integer inputs such as token ids."
            )
        graph = build_influence_graph(self.solver, test_src, train_src, mode, memory_budget=self._memory_budget())
        if len(graph.plan.test_groups) > 1:
            logger.warning("Test factors exceed the per-task memory budget; %s.", graph.plan.describe())
        return graph

    def influences(self, test: Any, train: Any, mode: Any = "up", *, test_block_size: int | None = None,
                   train_block_size: int | None = None) -> Any:
        """Influence of every train point on every test point.

        Returns ``(n_test, n_train)`` (``(n_test, n_train, *features)`` in perturbation
        mode), chunked as (test block, train block).
        """
        graph = self._graph(test, train, mode, test_block_size, train_block_size)
        return da.Array(graph.dsk, graph.chunk_name, chunks=graph.chunks, dtype=graph.dtype)

    def self_influences(self, train: Any, *, block_size: int | None = None) -> Any:
        """``grad L(z)^T H^-1 grad L(z)`` for every train point: ``(n_train,)``."""
        src = as_source(train, block_size=block_size, name="train")
        graph = build_influence_graph(self.solver, src, src, InfluenceMode.up, memory_budget=None)
        name = add_self_influence_tasks(graph)
        return da.Array(graph.dsk, name, chunks=(graph.plan.train_sizes,), dtype=graph.dtype)

    # -- zarr ------------------------------------------------------------------------
    def influences_to_zarr(
        self,
        test: Any,
        train: Any,
        store: str | os.PathLike,
        mode: Any = "up",
        *,
        resume: bool = False,
        overwrite: bool = False,
        top_k: int | None = None,
        self_influences: bool = False,
        test_block_size: int | None = None,
        train_block_size: int | None = None,
    ) -> zarr.Group:
        """Compute the influence matrix into a zarr group and mark it complete.

        Args:
            store: path of the zarr group to create (or to complete with ``resume``).
            resume: complete an existing store written by the same configuration,
                computing only the chunks not yet flagged done.
            overwrite: replace an existing store.
            top_k: also store, per test point, the ``top_k`` most helpful and most harmful
                training indices with their values (mode ``"up"`` only).
            self_influences: also store the self-influence of every train point.

        Returns:
            the zarr group. ``last_run_`` says how many chunks were computed and skipped.
        """
        mode = InfluenceMode.parse(mode)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None; got {top_k!r}.")
        if top_k and mode is not InfluenceMode.up:
            raise ValueError("top_k needs mode='up' (perturbation influences have one value per feature).")
        graph = self._graph(test, train, mode, test_block_size, train_block_size)
        plan = graph.plan
        top_k = min(top_k, plan.n_train) if top_k else None
        layout = zstore.StoreLayout(plan.test_sizes, plan.train_sizes,
                                    graph.feature_shape if mode is InfluenceMode.perturbation else None,
                                    graph.dtype, top_k, bool(self_influences))
        config = self._config(graph, layout)
        path = os.fspath(store)
        group = zstore.prepare_store(path, config=config, layout=layout, resume=resume, overwrite=overwrite)
        keys = self._pending_writes(graph, group, path, layout)
        self._execute(graph.dsk, keys)
        zstore.mark_complete(group, {"test_groups": [list(g) for g in plan.test_groups]})
        return zarr.open_group(path, mode="r")

    def _pending_writes(self, graph: InfluenceGraph, group: zarr.Group, path: str, layout: zstore.StoreLayout) -> list:
        plan, dsk = graph.plan, graph.dsk
        done = np.asarray(group["influences_done"][...]) == 1
        rows, cols = plan.test_ranges, plan.train_ranges
        write = f"write-{graph.token}"
        keys: list = []
        row_writes: dict[int, list] = {}
        computed = 0
        for g, members in enumerate(plan.test_groups):
            for j in range(len(cols)):
                targets = [(i, *rows[i], pos) for pos, i in enumerate(members) if not done[i, j]]
                if not targets:
                    continue
                dsk[(write, g, j)] = (zstore.write_influence_chunks, path, j, cols[j], targets, (graph.group_name, g, j))
                keys.append((write, g, j))
                computed += len(targets)
                for i, *_ in targets:
                    row_writes.setdefault(i, []).append((write, g, j))
        skipped = int(done.sum())
        self_written = 0
        if layout.self_influences:
            sdone = np.asarray(group["self_influences_done"][...]) == 1
            name = add_self_influence_tasks(graph)
            for j in np.nonzero(~sdone)[0]:
                j = int(j)
                dsk[(f"swrite-{graph.token}", j)] = (zstore.write_self_chunk, path, j, cols[j], (name, j))
                keys.append((f"swrite-{graph.token}", j))
                self_written += 1
        if layout.top_k:
            tdone = np.asarray(group["topk_done"][...]) == 1
            for i in np.nonzero(~tdone)[0]:
                i = int(i)
                dsk[(f"topk-{graph.token}", i)] = (zstore.topk_row, path, i, rows[i], list(cols), layout.top_k,
                                                   *row_writes.get(i, []))
                keys.append((f"topk-{graph.token}", i))
        self.last_run_ = {"chunks_computed": computed,
                          "chunks_skipped": skipped, "chunks_total": plan.num_chunks,
                          "self_influence_blocks_computed": self_written, "plan": plan.describe()}
        return keys

    def _config(self, graph: InfluenceGraph, layout: zstore.StoreLayout) -> dict:
        solver = self.solver
        params = {k: v for k, v in vars(solver).items()
                  if not k.startswith("_") and not k.endswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
        params["curvature"] = solver.curvature.value
        return {
            "method": type(solver).__name__,
            "parameters": params,
            "regularization": solver.regularization,
            "mode": graph.mode.value,
            "shape": list(layout.shape),
            "test_block_sizes": list(layout.test_sizes),
            "train_block_sizes": list(layout.train_sizes),
            "dtype": layout.dtype,
            "top_k": layout.top_k,
            "self_influences": layout.self_influences,
            "solver_fingerprint": solver_fingerprint(solver),
            "num_params": solver.num_params,
            "n_train_fit": solver.n_train_,
        }

    def _memory_budget(self) -> int | None:
        """Bytes one influence task may hold: the given budget, or 512 MiB for 'auto'."""
        return DEFAULT_MEMORY_BUDGET if self.memory_budget == "auto" else self.memory_budget

    def _execute(self, dsk: dict, keys: list) -> list:
        raise NotImplementedError


class SequentialInfluenceCalculator(_BlockCalculator):
    """Runs the block graph in this process (Dask's synchronous scheduler); no cluster.

    ``influences`` and ``self_influences`` return lazy dask arrays like the Dask
    calculator's; compute them with ``.compute(scheduler="synchronous")`` to stay in one
    process. ``influences_to_zarr`` runs synchronously with a plain progress bar.
    """

    def _execute(self, dsk: dict, keys: list) -> list:
        from dask.diagnostics import ProgressBar
        from dask.local import get_sync

        if not keys:
            return []
        if self.progress:
            with ProgressBar():
                return get_sync(dsk, keys)
        return get_sync(dsk, keys)


class DaskInfluenceCalculator(_BlockCalculator):
    """Runs the block graph on a Dask cluster.

    Args:
        solver: a fitted solver; it is shipped to each worker once (as one graph key that
            the scheduler can recompute if a worker is lost).
        client: a ``distributed.Client``; ``None`` uses the current client if there is one,
            else starts an embedded ``LocalCluster`` (one single-threaded worker process per
            core) for each call and closes it afterwards.
        progress: show Dask's progress bar while a job runs.
        memory_budget: bytes one influence task may hold (its test factors and its block of
            output); test blocks beyond that are split into groups. ``"auto"``: a quarter of
            the smallest worker memory limit of the current client, at most 512 MiB;
            ``None``: one group.
        n_workers: workers of the embedded cluster (default: the number of cores).

    A solver whose model is on CUDA runs its tasks with the resource ``GPU=1``; start
    workers with ``--resources GPU=1`` (one per GPU).
    """

    def __init__(self, solver: InfluenceModel, client: Any = None, *, progress: bool = True,
                 memory_budget: int | str | None = "auto", n_workers: int | None = None):
        super().__init__(solver, progress=progress, memory_budget=memory_budget)
        self.client = client
        self.n_workers = n_workers

    def _memory_budget(self) -> int | None:
        if self.memory_budget != "auto":
            return self.memory_budget
        client = self.client
        if client is None:
            try:
                from distributed import get_client

                client = get_client()
            except ValueError:
                return DEFAULT_MEMORY_BUDGET
        limits = [w.get("memory_limit") or 0 for w in client.scheduler_info().get("workers", {}).values()]
        limits = [x for x in limits if x > 0]
        return min([DEFAULT_MEMORY_BUDGET] + [x // 4 for x in limits])

    @contextmanager
    def _client(self) -> Iterator[Any]:
        from distributed import Client, LocalCluster, get_client

        if self.client is not None:
            yield self.client
            return
        try:
            yield get_client()
            return
        except ValueError:
            pass
        workers = self.n_workers or os.cpu_count() or 1
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client

    def _execute(self, dsk: dict, keys: list) -> list:
        if not keys:
            return []
        resources = {"GPU": 1} if self.solver.device.type == "cuda" else None
        with self._client() as client:
            futures = client.get(dsk, keys, sync=False, resources=resources)
            if self.progress:
                from distributed import progress

                progress(futures)
            return client.gather(futures)
