"""The tasks of a job writing a zarr store: exactly what the store is missing, and their writes.

Given a job's :class:`~.graph.InfluenceGraph` without per-block tasks
(:func:`~.graph.plan_influence_graph`) and the store's done state, :func:`add_store_tasks`
adds the tasks of the missing work only, so a resume builds a graph of the size of what is
missing, not of the store:

- **chunks**: for each test group ``g`` and train block ``j`` with a chunk not done, the
  group's influence task (the same task as in a clean run: its values are bit-identical)
  and one write task of its missing chunks, each followed by its done flag;
- **factors** of the test blocks those groups hold: read back from the store when saved with
  the current fit (:mod:`dask_influence.storage.factors`), else solved and (``layout.factors``)
  saved, with the solver's report of iterative solvers; one read and one save task per group;
- **self-influences** of the train blocks not done;
- **top-k** of each test block not done: the candidates of each chunk of its row (from the
  values in memory, or read back for chunks done before), merged in a tree of fan-in
  :data:`FAN_IN` and written with the block's flag (:func:`add_topk_tasks`, also used by the
  gradient index's query stores; :mod:`dask_influence.storage.topk`);
- **solver reports** (``solver_info``) of the test blocks solved without saving their
  factors, and of those without a record.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..storage import store as zstore
from . import tasks
from .graph import InfluenceGraph, add_self_influence_tasks

FAN_IN = 32
"""Candidates merged by one top-k merge task."""

STREAM_BLOCKS = 1
"""At most this many consecutive train blocks are scored by one one-pass task, as one batch: the saved factors
are then read once per group of gradients held (``held_gradient_bytes``), not once per block, but the task
holds more. One: with 8 blocks per task and a quarter of the budget held, GPT-2-small's scoring workers
reached 8.8 GB (7.8 GB with one block of 4 sequences per task)."""


@dataclass
class StoreJob:
    """The tasks :func:`add_store_tasks` added and what they complete.

    Attributes:
        keys: the keys to compute (every write).
        finishes: per key, the ``(array, chunk)`` entries of the store's completion it marks
            done (for the driver's completion record).
        merges: the keys of the top-k writes (one per test block; for progress lines).
        counts: what the job computes, for ``last_run_``: ``chunks_computed``,
            ``chunks_skipped``, ``chunks_total``, ``self_influence_blocks_computed``,
            ``factor_blocks_solved``, ``factor_blocks_read``, ``topk_blocks_merged``.
    """

    keys: list = field(default_factory=list)
    finishes: dict = field(default_factory=dict)
    merges: set = field(default_factory=set)
    counts: dict = field(default_factory=dict)


def missing_chunks(graph: InfluenceGraph, done: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """``{(g, j): [test blocks of group g whose chunk (i, j) is not done]}`` from the done mask
    ``(n_test_blocks, n_train_blocks)``; only pairs with something missing."""
    out: dict[tuple[int, int], list[int]] = {}
    for g, members in enumerate(graph.plan.test_groups):
        member_rows = np.asarray(members)
        for j in map(int, np.nonzero(~done[member_rows].all(axis=0))[0]):
            out[(g, j)] = [i for i in members if not done[i, j]]
    return out


def add_store_tasks(
    graph: InfluenceGraph,
    group: Any,
    path: str,
    layout: zstore.StoreLayout,
    state: zstore.CompletionState,
    *,
    check_factors: bool = False,
    one_pass: bool = False,
    places: int = 1,
) -> StoreJob:
    """Add to ``graph`` the tasks that compute and write what the store lacks (see the module docstring).

    Args:
        group: the store (open for reading); ``path`` its path for the workers.
        state: its done state; chunks done with the current fit are skipped.
        check_factors: read and checksum the saved factors before trusting them (``verify``);
            else only their flags and (local stores) the existence of their files are checked.
        one_pass: score every test block in one pass over the training data (:func:`add_one_pass_tasks`;
            the store saves factors) instead of one pass per test group; ``places``: the tasks that
            run at once (one block's factors each, before it is saved).
    """
    plan, dsk, token = graph.plan, graph.dsk, graph.token
    flag = state.current
    rows, cols = plan.test_ranges, plan.train_ranges
    job = StoreJob()
    done = state.done("influences")
    missing = missing_chunks(graph, done)
    if one_pass:
        solved, loaded = add_one_pass_tasks(graph, group, path, job, missing, flag, check_factors, places)
    else:
        solved, loaded = add_group_tasks(graph, group, path, layout, job, missing, flag, check_factors)

    # self-influences of the train blocks not done
    self_missing = list(map(int, np.nonzero(~state.done("self_influences"))[0])) if layout.self_influences else []
    if self_missing:
        name = add_self_influence_tasks(graph, self_missing)
        for j in self_missing:
            key = (f"swrite-{token}", j)
            dsk[key] = (zstore.write_self_chunk, path, j, cols[j], (name, j), flag)
            job.keys.append(key)
            job.finishes[key] = [("self_influences", (j,))]

    # the top-k of the test blocks not done: candidates per chunk, merged in a tree, written
    topk_missing = list(map(int, np.nonzero(~state.done("top_k"))[0])) if layout.top_k else []
    for i in topk_missing:
        key = add_topk_tasks(
            dsk, token, path, i, rows[i], cols, layout.top_k or 0, flag, done[i], functools.partial(graph.chunk_key, i)
        )
        job.keys.append(key)
        job.finishes[key] = [("top_k", (i,))]
        job.merges.add(key)

    # the solver's reports: of blocks solved without saving factors (the saves write theirs),
    # and of blocks without a record that no save writes (solved for the record alone)
    if layout.solver_info:
        recorded = ~np.isnan(zstore.read_solver_info(group)).any(axis=1)
        unrecorded = {int(i) for i in np.nonzero(~recorded)[0]}
        saving = set(solved) if layout.factors else set()
        for i in sorted(((set(solved) | unrecorded) - saving) - loaded):
            if graph.solve_key(i) not in dsk:
                graph.add_factor_tasks([i])
            key = (f"solverinfo-{token}", i)
            dsk[key] = (zstore.write_solver_info, path, i, (tasks.pick, graph.solve_key(i), 1))
            job.keys.append(key)

    job.counts = {
        "chunks_computed": sum(name == "influences" for done in job.finishes.values() for name, _ in done),
        "chunks_skipped": int(done.sum()),
        "chunks_total": plan.num_chunks,
        "self_influence_blocks_computed": len(self_missing),
        "factor_blocks_solved": len(solved),
        "factor_blocks_read": len(loaded),
        "topk_blocks_merged": len(topk_missing),
    }
    graph.order_groups()  # one test group's factors at a time on the workers
    return job


def add_group_tasks(
    graph: InfluenceGraph,
    group: Any,
    path: str,
    layout: zstore.StoreLayout,
    job: StoreJob,
    missing: dict[tuple[int, int], list[int]],
    flag: int,
    check_factors: bool,
) -> tuple[list[int], set[int]]:
    """Add scoring by test groups to ``graph`` and ``job``: for each test group with a missing chunk its
    factors (read back, or solved and, with ``layout.factors``, saved), then one influence task per (group,
    train block) with a missing chunk and its write. Returns ``(solved, loaded)``: the test blocks solved and
    those whose saved factors are used."""
    plan, dsk, token = graph.plan, graph.dsk, graph.token
    rows, cols = plan.test_ranges, plan.train_ranges
    # factors of the test blocks of every group with a missing chunk: read back or solved;
    # one read task and one save task per test group (one opening of the store each)
    groups = sorted({g for g, _ in missing})
    needed = [i for g in groups for i in plan.test_groups[g]]
    loaded = zstore.saved_blocks(group, needed, flag, decode=check_factors) if layout.factors else set()
    solved = [i for i in needed if i not in loaded]
    graph.add_factor_tasks(solved)
    for g in groups:
        members = plan.test_groups[g]
        read = [i for i in members if i in loaded]
        if read:
            key: tuple = (f"factorread-{token}", g)
            dsk[key] = (zstore.read_factors, path, [(i, rows[i]) for i in read])
            for position, i in enumerate(read):
                dsk[graph.factor_key(i)] = (tasks.pick, key, position)
        save = [i for i in members if i not in loaded]
        if layout.factors and save:
            infos = [(tasks.pick, graph.solve_key(i), 1) for i in save] if graph.record_solves else None
            key = (f"factorsave-{token}", g)
            dsk[key] = (
                zstore.write_factors,
                path,
                [(i, rows[i]) for i in save],
                [graph.factor_key(i) for i in save],
                flag,
                infos,
            )
            job.keys.append(key)

    # the missing chunks: one influence task per (group, train block), one write of its missing chunks
    write = f"write-{token}"
    for (g, j), pending in missing.items():
        members_at = {i: pos for pos, i in enumerate(plan.test_groups[g])}
        targets = [(i, *rows[i], members_at[i]) for i in pending]
        key = (write, g, j)
        dsk[key] = (zstore.write_influence_chunks, path, j, cols[j], targets, graph.add_group_task(g, j), flag)
        job.keys.append(key)
        job.finishes[key] = [("influences", (i, j)) for i in pending]
    return solved, loaded


def add_one_pass_tasks(
    graph: InfluenceGraph,
    group: Any,
    path: str,
    job: StoreJob,
    missing: dict[tuple[int, int], list[int]],
    flag: int,
    check_factors: bool,
    places: int = 1,
) -> tuple[list[int], set[int]]:
    """Add one-pass scoring's tasks to ``graph`` and ``job``: the missing chunks of each train block scored
    against every test block at once, the factors read from the store by columns.

    Every test block's factors are read back where saved with the current fit, else solved and saved, one
    save per block (a worker holds a block's factors until they are written); then one
    :func:`~.tasks.influence_stream` task per train block with a missing chunk, after every save, scoring
    every test block (as in a clean run: a resume's chunks are bit-identical), and the write of its missing
    chunks.
    ``places``: the tasks that run at once (the cluster's threads); a block is solved once the block
    ``places`` before it is saved, so that a worker does not solve blocks ahead of their saves (the
    factor tasks are all ready at the start, and GPT-2-small's are 1 GB each).
    Returns ``(solved, loaded)``: the test blocks solved and those whose saved factors are used.
    """
    plan, dsk, token = graph.plan, graph.dsk, graph.token
    rows, cols = plan.test_ranges, plan.train_ranges
    pending: dict[int, list[int]] = {}
    for (_, j), blocks in missing.items():
        pending.setdefault(j, []).extend(blocks)
    # a train block is scored against every test block, also where only some of its chunks are missing: the
    # same task as in a clean run, so a resume's chunks are bit-identical to it (a product's rounding depends
    # on its shape)
    needed = list(range(len(plan.test_sizes))) if pending else []
    loaded = zstore.saved_blocks(group, needed, flag, decode=check_factors)
    solved = [i for i in needed if i not in loaded]
    graph.add_factor_tasks(solved)
    saves: list = []
    for n, i in enumerate(solved):
        infos = [(tasks.pick, graph.solve_key(i), 1)] if graph.record_solves else None
        key = (f"factorsave-{token}", i)
        dsk[key] = (zstore.write_factors, path, [(i, rows[i])], [graph.factor_key(i)], flag, infos)
        job.keys.append(key)
        if n >= places:  # solved once the block ``places`` before it is saved: one block's factors per place
            _wait_for(dsk, graph.solve_key(i), saves[n - places])
        saves.append(key)
    write = f"write-{token}"
    every = [(i, rows[i]) for i in needed]
    # fixed groups of consecutive train blocks (at least 8 groups where there are 8 blocks, for balance; from
    # the number of blocks alone), each scored whole where one of its blocks has a missing chunk: the same task
    # as in a clean run, so a resume's chunks are bit-identical to it
    n_blocks = len(plan.train_sizes)
    per = max(1, min(STREAM_BLOCKS, n_blocks // 8))
    for start in range(0, n_blocks, per):
        group = list(range(start, min(n_blocks, start + per)))
        if not any(j in pending for j in group):
            continue
        key = (f"stream-{token}", start)
        members = [graph.train.block_task(j) for j in group]
        dsk[key] = (tasks.influence_stream, graph.solver_key, path, every, members, graph.dtype, *saves)
        for position, j in enumerate(group):
            part = (tasks.pick, key, position)
            for i in needed:
                dsk[graph.chunk_key(i, j)] = (tasks.pick, part, i)
            if j not in pending:
                continue
            blocks = sorted(pending[j])
            out = (write, 0, j)
            dsk[out] = (zstore.write_influence_chunks, path, j, cols[j], [(i, *rows[i], i) for i in blocks], part, flag)
            job.keys.append(out)
            job.finishes[out] = [("influences", (i, j)) for i in blocks]
    return solved, loaded


def _wait_for(dsk: dict, key: Any, done: Any) -> None:
    """Task ``key`` of ``dsk`` runs only after ``done`` (an ordering dependency)."""
    dsk[key] = (tasks.after, dsk[key], done)


def add_topk_tasks(
    dsk: dict,
    token: str,
    path: str,
    i: int,
    row: tuple[int, int],
    cols: Sequence[tuple[int, int]],
    k: int,
    flag: int,
    row_done: np.ndarray,
    chunk: Callable[[int], Any],
) -> tuple:
    """Add to ``dsk`` the top-``k`` of test block ``i`` (store rows ``row``) and its write; returns
    the write's key.

    A candidates task per chunk ``(i, j)`` of its row (train columns ``cols[j]``): from the
    chunk's values ``(n_i, n_j)`` in memory, the key ``chunk(j)`` of this job, or read back from
    the store when ``row_done[j]`` (``row_done``: ``(n_train_blocks,)`` bool); then a merge tree
    of fan-in :data:`FAN_IN` and :func:`~dask_influence.storage.topk.write_topk` with the flag
    ``flag``. Keys are named with ``token``. Used by the calculator's store jobs and by
    :meth:`~dask_influence.GradientIndex.influences_to_zarr`.
    """
    level: list = []
    for j, col in enumerate(cols):
        key = (f"topkcand-{token}", i, j)
        if row_done[j]:
            dsk[key] = (zstore.chunk_candidates, path, row, col, k)
        else:
            dsk[key] = (zstore.candidates, chunk(j), col[0], k)
        level.append(key)
    depth = 0
    while len(level) > FAN_IN:
        depth += 1
        merged = []
        for start in range(0, len(level), FAN_IN):
            node = (f"topkmerge-{token}", i, depth, start // FAN_IN)
            dsk[node] = (zstore.merge, level[start : start + FAN_IN], k)
            merged.append(node)
        level = merged
    write = (f"topk-{token}", i)
    dsk[write] = (zstore.write_topk, path, i, row, (zstore.merge, level, k), flag)
    return write
