"""Build the Dask graph of per-block tasks for one job.

Keys (``name`` parts are tokenized from the solver fingerprint, the data tokens, the plan
and the mode, so a rerun maps to the same keys):

- ``solver-<token>``: the fitted solver, a literal fetched once per worker;
- ``("factors-<token>", i)``: influence factors of test block ``i``: ``(n_i, p)``;
- ``("group-<token>", g, j)``: influences of train block ``j`` on test group ``g``
  (train gradients computed once per group): one ``(n_i, n_j[, *features])`` array per
  member ``i`` of the group;
- ``("influences-<token>", i, j[, 0...])``: chunk ``(i, j)`` of the influence matrix.

:func:`plan_influence_graph` makes a graph with none of the per-block tasks (the plan, the
names, the solver and the data); the tasks are added for exactly the blocks a job needs
(:meth:`InfluenceGraph.add_factor_tasks`, :meth:`InfluenceGraph.add_group_task`), so a resume
of 10 missing chunks of a 100,000-chunk store builds tens of tasks, not the store's.
:func:`build_influence_graph` adds every task (the lazy dask array of ``influences``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dask.base import tokenize

from ..core.modes import InfluenceMode
from . import tasks
from .literals import Literal, unbox
from .plan import BlockPlan
from .sources import BlockSource


def solver_fingerprint(solver: Any) -> str:
    """A deterministic hash of a fitted solver: method, hyperparameters, weights and fitted state
    (:meth:`~dask_influence.core.solvers.base.InfluenceModel.fingerprint`)."""
    return solver.fingerprint()


def output_dtype(solver: Any) -> str:
    """float64 for float64 models, else float32; never derived from the input data."""
    return "float64" if solver.dtype == torch.float64 else "float32"


@dataclass
class InfluenceGraph:
    """The graph of one influence job and the names of its parts."""

    dsk: dict
    plan: BlockPlan
    mode: InfluenceMode
    solver_key: str
    chunk_name: str
    feature_shape: tuple[int, ...]
    dtype: str
    train: BlockSource
    token: str
    group_name: str
    test: BlockSource
    factor_name: str
    solve_name: str
    """``(solve_name, i)`` is the task that solves test block ``i``: the factors themselves, or
    with ``record_solves`` the pair ``(factors, solver_info_row)``."""
    record_solves: bool = False

    def solve_key(self, i: int) -> tuple:
        """The key of the task that solves test block ``i`` (see :attr:`solve_name`)."""
        return (self.solve_name, i)

    def chunk_key(self, i: int, j: int) -> tuple:
        """The key of chunk ``(i, j)`` of the influence array."""
        return (self.chunk_name, i, j) + (0,) * len(self.feature_shape)

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """The chunks of the influence array (test blocks, train blocks, features)."""
        return (self.plan.test_sizes, self.plan.train_sizes) + tuple((s,) for s in self.feature_shape)

    def factor_key(self, i: int) -> tuple:
        """The key of the factors of test block ``i`` (``(n_i, p)``)."""
        return (self.factor_name, i)

    def group_key(self, g: int, j: int) -> tuple:
        """The key of the influences of train block ``j`` on test group ``g`` (a list, one array per member)."""
        return (self.group_name, g, j)

    def add_factor_tasks(self, blocks: Iterable[int]) -> None:
        """Compute the factors of test blocks ``blocks`` (each a solve of its block's gradients).

        With ``record_solves`` the solve task returns ``(factors, solver_info_row)`` and the
        factor key picks the factors from it.
        """
        for i in blocks:
            block = self.test.block_task(i)
            if self.record_solves:
                self.dsk[self.solve_key(i)] = (tasks.factors_with_info, self.solver_key, block)
                self.dsk[self.factor_key(i)] = (tasks.pick, self.solve_key(i), 0)
            else:
                self.dsk[self.factor_key(i)] = (tasks.factor_block, self.solver_key, block)

    def add_group_task(self, g: int, j: int) -> tuple:
        """Influences of train block ``j`` on every test block of group ``g``, and the chunk keys
        picking each member's part; returns the group key. The factors of the group's test
        blocks must be in the graph (computed, or read from a store)."""
        members = self.plan.test_groups[g]
        key = self.group_key(g, j)
        self.dsk[key] = (
            tasks.influence_group,
            self.solver_key,
            [self.factor_key(i) for i in members],
            self.train.block_task(j),
            self.mode.value,
            self.dtype,
        )
        for position, i in enumerate(members):
            self.dsk[self.chunk_key(i, j)] = (tasks.pick, key, position)
        return key

    def order_groups(self, ahead: int = 1) -> None:
        """Solve test group ``g``'s factors only once group ``g - 1 - ahead``'s influence tasks are done
        (a barrier task per group), so that a worker holds the factors of ``1 + ahead`` groups (the one in
        use and the next, solved while it runs), not every group's: the factor tasks have many dependents
        and are ready first, and on GPT-2-small (0.5 GB of factors per test sequence) a worker solved
        four groups ahead and passed 8 GB. Groups exist only where the factors exceed the per-task
        memory budget, which is where this matters."""
        groups = self.plan.test_groups
        for g in range(1 + ahead, len(groups)):
            waited = g - 1 - ahead
            before = [key for j in range(len(self.plan.train_sizes)) if (key := self.group_key(waited, j)) in self.dsk]
            if not before:
                continue
            barrier = (f"groupdone-{self.token}", waited)
            self.dsk[barrier] = (tasks.after, None, *before)
            for i in groups[g]:
                key = self.solve_key(i)
                task = self.dsk.get(key)
                if isinstance(task, tuple) and task and task[0] in (tasks.factor_block, tasks.factors_with_info):
                    self.dsk[key] = (tasks.after, task, barrier)


def plan_influence_graph(
    solver: Any,
    test: BlockSource,
    train: BlockSource,
    mode: InfluenceMode,
    *,
    memory_budget: int | None,
    record_solves: bool = False,
) -> InfluenceGraph:
    """The graph of a job without its per-block tasks: the plan, the key names, the solver and
    the data sources (nothing is computed; add tasks with the graph's methods).

    With ``record_solves`` the task that solves a test block also returns the solver's report
    as a row of the store's ``solver_info`` (:func:`tasks.factors_with_info`), at the key
    :meth:`InfluenceGraph.solve_key`; the factors are picked from it.
    """
    dtype = output_dtype(solver)
    itemsize = np.dtype(dtype).itemsize
    # one test point costs its factor row (p) plus its row of the output block, each held
    # about twice (torch and numpy copies) by an influence task
    row_width = solver.num_params + max(train.block_sizes) * max(
        1, int(np.prod(train.feature_shape)) if mode is InfluenceMode.perturbation else 1
    )
    plan = BlockPlan.build(
        test.block_sizes, train.block_sizes, bytes_per_test_point=2 * row_width * itemsize, memory_budget=memory_budget
    )
    feature_shape = tuple(train.feature_shape) if mode is InfluenceMode.perturbation else ()
    fingerprint = solver_fingerprint(solver)
    token = tokenize(fingerprint, test.token, train.token, plan, mode.value, dtype)
    solver_key = f"solver-{fingerprint}"
    factors, group, chunk = f"factors-{token}", f"group-{token}", f"influences-{token}"
    solve = f"factorinfo-{token}" if record_solves else factors
    dsk: dict = {solver_key: (unbox, Literal(solver, fingerprint)), **test.graph(), **train.graph()}
    return InfluenceGraph(
        dsk,
        plan,
        mode,
        solver_key,
        chunk,
        feature_shape,
        dtype,
        train,
        token,
        group,
        test,
        factors,
        solve,
        record_solves,
    )


def build_influence_graph(
    solver: Any,
    test: BlockSource,
    train: BlockSource,
    mode: InfluenceMode,
    *,
    memory_budget: int | None,
    record_solves: bool = False,
) -> InfluenceGraph:
    """The tasks that compute every chunk of the influence matrix (nothing is computed); see
    :func:`plan_influence_graph`."""
    graph = plan_influence_graph(solver, test, train, mode, memory_budget=memory_budget, record_solves=record_solves)
    graph.add_factor_tasks(range(len(graph.plan.test_sizes)))
    for g in range(len(graph.plan.test_groups)):
        for j in range(len(graph.plan.train_sizes)):
            graph.add_group_task(g, j)
    graph.order_groups()
    return graph


def add_self_influence_tasks(graph: InfluenceGraph, blocks: Iterable[int] | None = None) -> str:
    """Add ``("self-<token>", j)`` tasks (self-influences of train block ``j``: ``(n_j,)``) for
    ``blocks`` (default: every train block); returns the name."""
    name = f"self-{graph.token}"
    for j in range(len(graph.plan.train_sizes)) if blocks is None else blocks:
        graph.dsk[(name, j)] = (tasks.self_influence_block, graph.solver_key, graph.train.block_task(j), graph.dtype)
    return name
