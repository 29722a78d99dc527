"""DaskInfluenceCalculator and SequentialInfluenceCalculator.

Both map a fitted solver over blocks of test and train data with the same graph
(:mod:`.graph`), and ``fit`` fits a solver over the train blocks (:mod:`.fitting`); the
Dask one runs it on a distributed client (the current one, or an embedded ``LocalCluster``
started and closed per call), the sequential one in this process with Dask's synchronous
scheduler. They give the same numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, cast

import numpy as np
import zarr

from .. import progress as _progress
from ..core.modes import InfluenceMode
from ..core.solvers.base import InfluenceModel
from ..errors import NotFittedError
from ..renamed import renamed
from ..storage import lock as zlock
from ..storage import store as zstore
from .clients import dask_client, given_or_current, trim_workers
from .graph import (
    InfluenceGraph,
    add_self_influence_tasks,
    build_influence_graph,
    output_dtype,
    plan_influence_graph,
    solver_fingerprint,
)
from .literals import broadcast_large, sent_once
from .sources import as_source
from .store_job import add_store_tasks

logger = logging.getLogger("dask_influence")

DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes of test factors held by one influence task


class _BlockCalculator:
    """Shared logic; subclasses say how a graph is executed."""

    def __init__(self, solver: InfluenceModel, *, progress: bool = True, memory_budget: int | str | None = "auto"):
        if not isinstance(solver, InfluenceModel):
            raise TypeError(f"solver must be a dask_influence solver (e.g. CgInfluence); got {type(solver).__name__}.")
        if memory_budget not in (None, "auto") and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0
        ):
            raise ValueError(
                f"memory_budget must be a positive number of bytes, 'auto' or None; got {memory_budget!r}."
            )
        self.solver = solver
        self.progress = bool(progress)
        self._metered = False
        self.memory_budget = memory_budget
        self.last_run_: dict[str, Any] = {}
        self.last_fit_: dict[str, Any] = {}
        self._fit_train: Any = None  # the train BlockSource of fit(), for CG's factors on the client
        self._fit_id: str | None = None
        self._refitted = False  # fit(refit=True) fitted the solver again (chunks of older fits are stale)
        self._on_done: Callable[[Any], None] | None = None  # called with each finished key of a job

    # -- fitting ----------------------------------------------------------------------
    def fit(
        self,
        train: Any,
        *,
        train_block_size: int | None = None,
        path: str | os.PathLike | None = None,
        refit: bool = False,
        verify_data: bool = True,
        block_size: int | None = None,
    ) -> InfluenceModel:
        """Fit the wrapped solver over the train blocks; returns the solver, fitted.

        Every pass of the fit over the training data is a sum of per-block results (curvature
        products ``(p, k)``, or Kronecker factors for EK-FAC) computed where the blocks are and
        added by a fixed tree, so the state equals ``solver.fit(train)`` to rounding.

        Args:
            train: the training data, in any form the calculator accepts (a DataLoader
                without shuffling, a Dataset with ``train_block_size``, arrays, dask arrays).
            train_block_size: training points per block (default: the loader's batch size;
                ``block_size=`` is its old spelling, with a ``RenamedWarning``).
            path: a file for the fitted state (e.g. ``fitting.fit_path_for(store)``). If it
                exists, it is restored instead of fitting, after checking that it holds
                this solver (class and hyperparameters) fitted with these model weights on
                this training data; a mismatch raises ``ValueError``. A fresh fit is saved there.
            refit: fit even if ``path`` exists, and replace it.
            verify_data: before reusing the fit at ``path``, read every train block to
                validate and checksum it (a pass over the training data). ``False`` (a
                resume, ``run --resume``): restore it without reading the data, checking the
                model weights, the solver and the data's size, blocks and feature shape,
                not its contents (:func:`~.fitting.restore_fit`). A fresh fit always validates.

        ``last_fit_`` reports whether the fit was reused, the passes over the data and the time.
        Each pass is reported as ``solver.fit`` reports it (:mod:`dask_influence.progress`;
        nothing with ``progress=False``), counting the samples of each worker's group of blocks
        as it finishes.
        """
        from .fitting import fit_with_blocks, restore_fit, saved_fit_exists

        where = f"{type(self).__name__}.fit"
        train_block_size = renamed(where, "block_size", block_size, "train_block_size", train_block_size)
        source = as_source(train, block_size=train_block_size, name="train", perturb=self.solver.objective.perturb)
        if not verify_data and path is not None and not refit and saved_fit_exists(path):
            self.last_fit_ = restore_fit(self.solver, source, path)  # no blocks loaded, no pass
        else:
            with self._train_blocks(source) as blocks, _progress.reporting(None if self.progress else False):
                self.last_fit_ = fit_with_blocks(self.solver, blocks, path=path, refit=refit)
        self._fit_train = source
        self._fit_id = getattr(self.solver, "fit_id_", None)  # to notice a later solver.fit()
        self._refitted = bool(refit) and not self.last_fit_["reused"]
        return self.solver

    @contextmanager
    def _train_blocks(self, source: Any) -> Iterator[Any]:
        from .fitting import LocalTrainBlocks

        with LocalTrainBlocks(self.solver, source) as blocks:
            yield blocks

    def _check_fitted(self) -> None:
        if not self.solver.is_fitted:
            raise NotFittedError(
                f"The {type(self.solver).__name__} is not fitted; call calc.fit(train) or "
                "solver.fit(train_loader) first."
            )

    # -- graph ------------------------------------------------------------------------
    def _graph(
        self,
        test: Any,
        train: Any,
        mode: Any,
        test_block_size: int | None,
        train_block_size: int | None,
        *,
        record_solves: bool = False,
        all_tasks: bool = True,
    ) -> InfluenceGraph:
        """The job's graph: every task (``all_tasks``), or none of its per-block tasks yet (a
        store job adds those it is missing, :mod:`.store_job`)."""
        mode = InfluenceMode.parse(mode)
        perturb = self.solver.objective.perturb
        # the inputs first (a shuffling loader is refused before the advice to fit the solver)
        test_src = as_source(test, block_size=test_block_size, name="test", perturb=perturb)
        train_src = as_source(train, block_size=train_block_size, name="train", perturb=perturb)
        self._check_fitted()
        budget = self._memory_budget()
        if test_block_size is None and budget is not None:  # a test block's factors (n, p) within the budget
            fits = max(1, budget // (2 * self.solver.num_params * np.dtype(output_dtype(self.solver)).itemsize))
            if max(test_src.block_sizes, default=0) > fits:
                logger.info(
                    "Test blocks of %d points: their factors (%d parameters each) fit the memory budget.",
                    fits,
                    self.solver.num_params,
                )
                test_src = as_source(test, block_size=fits, name="test", perturb=perturb)
        fitted = tuple(self.solver.feature_shape_ or ())
        for name, src in (("test", test_src), ("train", train_src)):
            if src.input_dtype is not None and tuple(src.feature_shape) != fitted:
                raise ValueError(
                    f"The {name} inputs have feature shape {tuple(src.feature_shape)} but the solver "
                    f"was fitted on {fitted}."
                )
        if mode is InfluenceMode.perturbation and (
            train_src.input_dtype is None or not np.issubdtype(train_src.input_dtype, np.floating)
        ):
            if perturb is None:
                raise ValueError(
                    "Perturbation influences differentiate in an input, but the solver's task names none; "
                    "pass Task(..., perturb='pixel_values') (a floating-point input) or use mode='up'."
                )
            raise TypeError(
                f"Perturbation influences need floating-point train inputs; got {train_src.input_dtype}"
                f"{'' if perturb == 0 else f' for the input {perturb!r}'}. "
                "Use mode='up' for integer inputs such as token ids."
            )
        build = build_influence_graph if all_tasks else plan_influence_graph
        graph = build(self.solver, test_src, train_src, mode, memory_budget=budget, record_solves=record_solves)
        if len(graph.plan.test_groups) > 1 and all_tasks:
            logger.warning(
                "Test factors exceed the per-task memory budget; %s, each group one pass over the training data "
                "(influences_to_zarr(scoring='one_pass') scores them in one pass).",
                graph.plan.describe(),
            )
        return graph

    def influences(
        self,
        test: Any,
        train: Any,
        mode: Any = "up",
        *,
        test_block_size: int | None = None,
        train_block_size: int | None = None,
    ) -> Any:
        """Influence of every train point on every test point.

        Returns ``(n_test, n_train)`` (``(n_test, n_train, *features)`` in perturbation
        mode), chunked as (test block, train block).
        """
        import dask.array as da  # imported when used: a store job needs no dask.array

        graph = self._graph(test, train, mode, test_block_size, train_block_size)
        return da.Array(self._lazy_graph(graph.dsk), graph.chunk_name, chunks=graph.chunks, dtype=graph.dtype)

    def self_influences(self, train: Any, *, train_block_size: int | None = None, block_size: int | None = None) -> Any:
        """``grad L(z)^T H^-1 grad L(z)`` for every train point: a lazy ``dask.array`` ``(n_train,)``
        chunked by train block (``train_block_size``: training points per block; ``block_size=`` is
        its old spelling, with a ``RenamedWarning``)."""
        where = f"{type(self).__name__}.self_influences"
        train_block_size = renamed(where, "block_size", block_size, "train_block_size", train_block_size)
        src = as_source(train, block_size=train_block_size, name="train", perturb=self.solver.objective.perturb)
        self._check_fitted()
        graph = plan_influence_graph(self.solver, src, src, InfluenceMode.up, memory_budget=None)
        name = add_self_influence_tasks(graph)
        import dask.array as da

        return da.Array(self._lazy_graph(graph.dsk), name, chunks=(graph.plan.train_sizes,), dtype=graph.dtype)

    def _lazy_graph(self, dsk: dict) -> dict:
        """The graph of a lazy result as it is returned (the Dask calculator broadcasts a large solver)."""
        return dsk

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
        verify: bool | str = True,
        break_lock: bool = False,
        refit: bool | None = None,
        wait_for_lock: float = 0.0,
        save_factors: bool | str = "auto",
        scoring: str = "auto",
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
            verify: with ``resume``, check the chunks already flagged done before trusting
                them. ``True`` (or ``"full"``) reads and decodes each flagged chunk once on
                this process (about one read of the store); ``"exists"`` only lists the chunk
                files (finds deleted chunks, not truncated ones); ``False`` trusts the flags.
                Damaged chunks are recomputed.
            break_lock: take the store's lock even while another job holds it. A stale lock
                (its heartbeat too old, or its process gone on this host) is taken without it.
            wait_for_lock: seconds to wait for a lock held by a live job (checked every few
                seconds) before refusing: a driver restarted by an orchestrator, whose old
                driver's heartbeat has not gone stale yet, then takes the lock and resumes.
            refit: the solver was fitted again (``dask-influence run --refit``): with
                ``resume``, every chunk computed with an earlier fit is recomputed, even if
                the fitted state came out the same, and a store recorded with another
                fitted state is accepted instead of refused. ``None`` (default): True when
                this calculator's ``fit(..., refit=True)`` fitted the solver. Each chunk's
                done flag records the fit generation it was computed with
                (:mod:`dask_influence.storage.fits`).
            save_factors: keep the test factors of each test block in the store (``factors``,
                ``(n_test, p)``, :mod:`dask_influence.storage.factors`), so that a resume
                reads them instead of solving again; a refit makes them stale. ``"auto"``
                (default): when they take at most as many bytes as the influences, or at
                most 1 GiB (a model of many parameters and few training points: not saved).
            scoring: how test points whose factors exceed one task's memory budget are scored.
                ``"groups"``: in groups that fit, each group one pass over the training data
                (its gradients computed again). ``"one_pass"``: every test point in one pass; the
                factors are saved in the store and each train block reads them back a slab of columns
                at a time (:meth:`~dask_influence.core.solvers.base.InfluenceModel.influences_from_factor_columns`),
                mode ``"up"`` only. ``"auto"`` (default): one pass where the factors need more than one group
                and the model has at least :data:`ONE_PASS_MIN_PARAMS` parameters, where a training
                point's gradient costs more than reading its share of the factors again.

        Returns:
            the zarr group. ``last_run_`` says how many chunks were computed, skipped and
            repaired, how many test blocks' factors were solved and read back, and what
            verification found.

        Raises:
            StoreError: the store exists without ``resume``/``overwrite``, was written by
                another configuration, or is locked by another job; the path is a file or
                cannot be written.
        """
        mode = InfluenceMode.parse(mode)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None; got {top_k!r}.")
        if top_k and mode is not InfluenceMode.up:
            raise ValueError("top_k needs mode='up' (perturbation influences have one value per feature).")
        verify_mode = zstore.verify_mode(verify)
        if not isinstance(break_lock, bool):
            raise TypeError(f"break_lock must be True or False; got {break_lock!r}.")
        graph = self._graph(  # no per-block tasks yet: only those of the missing work are added
            test,
            train,
            mode,
            test_block_size,
            train_block_size,
            record_solves=_records_solver_info(self.solver),
            all_tasks=False,
        )
        plan = graph.plan
        one_pass = _one_pass(scoring, plan, mode, self.solver.num_params)
        if len(plan.test_groups) > 1:
            logger.warning(
                "Test factors exceed the per-task memory budget; %s, %s.",
                plan.describe(),
                "scored in one pass over the training data, the factors saved in the store and read back by columns"
                if one_pass
                else "each group one pass over the training data",
            )
        top_k = min(top_k, plan.n_train) if top_k else None
        layout = zstore.StoreLayout(
            plan.test_sizes,
            plan.train_sizes,
            graph.feature_shape if mode is InfluenceMode.perturbation else None,
            graph.dtype,
            top_k,
            bool(self_influences),
            graph.record_solves,
            self.solver.num_params
            if _saves_factors(save_factors, plan, graph, self.solver.num_params) or one_pass
            else None,
        )
        config = self._config(graph, layout)
        path = os.fspath(store)
        zstore.check_path(path)
        fit = self._fit_identity(config, refit)
        with zlock.StoreLock(path, break_lock=break_lock, wait_seconds=wait_for_lock) as lock:
            generation = None if not resume else _generation_of(path)
            if resume:
                config = _with_recorded_names(config, path, type(self.solver.config).renamed)
            group = zstore.prepare_store(
                path, config=config, layout=layout, resume=resume, overwrite=overwrite, fit=fit
            )
            state = zstore.load_state(group)
            report = self._verify_store(group, path, verify_mode, state) if resume else None
            recorder = zstore.CompletionRecorder(group, state)
            recorder.flush(final=False)  # the state this run starts from (repairs included)
            job = add_store_tasks(
                graph,
                group,
                path,
                layout,
                state,
                check_factors=verify_mode == "full",
                one_pass=one_pass,
                places=self._places(),
            )
            self.last_run_ = {**job.counts, "plan": plan.describe(), "scoring": "one_pass" if one_pass else "groups"}
            self.last_run_.update(
                chunks_repaired=len(report.damaged.get("influences", [])) if report else 0,
                verify=report.as_dict() if report else None,
                lock_broken=lock.broken,
                completion=state.as_dict(),
                fit_generation=state.generation,
                new_fit=generation is not None and state.generation != generation,
            )
            merges = _MergeProgress(job.merges, layout.top_k)
            chunks = {key: sum(a == "influences" for a, _ in job.finishes.get(key, [])) for key in job.keys}
            reporter = _progress.Progress(_progress.resolve(None) if self.progress else False)
            meter = reporter.meter(
                f"Influences: chunks of {layout.shape[0]:,} test x {layout.shape[1]:,} training points",
                sum(chunks.values()),
                "chunks",
                force=True,
            )

            def on_done(key: Any) -> None:
                recorder.record(job.finishes.get(key, []))
                merges.done(key)
                if chunks.get(key):
                    meter.advance(chunks[key])

            self._on_done = on_done
            self._metered = reporter.show  # the chunks are reported: no Dask progress bar besides
            try:
                with _progress.silenced():  # the block tasks (their solves) run here with the sequential calculator
                    self._execute_graph(graph, job.keys)
                meter.finish()
            finally:
                self._on_done = None
                self._metered = False
                recorder.flush(final=False)  # what is known done, also after a failure
            lock.ensure_held()
            recorder.flush(final=True)
            self.last_run_["manifest_writes"] = recorder.writes
            extra: dict[str, Any] = {
                "test_groups": [list(g) for g in plan.test_groups],
                "last_run": {k: self.last_run_[k] for k in ("chunks_computed", "chunks_skipped", "chunks_repaired")},
            }
            if layout.solver_info:
                extra["solver_info"] = self._solver_info_attribute(group)
            zstore.mark_complete(group, extra, state)
            self.last_run_["completion_counts"] = state.counts()  # {array: (done, total)}: all done
        return zarr.open_group(path, mode="r")

    def _fit_identity(self, config: dict, refit: bool | None) -> zstore.FitIdentity:
        """The fit of this job: its fingerprint, the in-memory fit's id, and whether it is a refit."""
        fit_id = getattr(self.solver, "fit_id_", None)
        if refit is None:
            refit = self._refitted and fit_id == self._fit_id
        return zstore.FitIdentity(str(config["solver_fingerprint"]), fit_id, bool(refit))

    def _verify_store(
        self, group: zarr.Group, path: str, mode: str | None, state: zstore.CompletionState
    ) -> zstore.VerifyReport | None:
        """Check the done chunks of a store being resumed; clear the flags of damaged ones (in
        the store and in ``state``)."""
        if mode is None:
            return None
        report = zstore.verify_store(group, mode=mode, state=state)
        wrong = sum(len(v) for v in report.wrong_flags.values())
        if wrong:
            logger.warning("Resuming %s: the manifest marked %d chunk(s) done that their flags do not.", path, wrong)
        unreadable = sum(len(v) for v in report.unreadable_flags.values())
        if report.repaired or unreadable:
            logger.warning(
                "Resuming %s: %d chunk(s) flagged done are missing or damaged and %d done flag(s) are "
                "unreadable; they are recomputed (%s).",
                path,
                report.repaired,
                unreadable,
                report.as_dict()["damaged"],
            )
        if report.repaired or unreadable or wrong:
            zstore.repair(group, report, state)
        return report

    def _solver_info_attribute(self, group: zarr.Group) -> dict:
        """The ``solver_info`` attribute; warns when a test block missed the solver's tolerance."""
        from ..errors import ConvergenceWarning

        method = type(self.solver).__name__
        summary = zstore.solver_info_summary(
            zstore.read_solver_info(group), method=method, tolerance=getattr(self.solver, "rtol", None)
        )
        if summary.get("converged") is False:
            import warnings

            warnings.warn(
                f"{method} missed its tolerance (rtol={summary['tolerance']}) for {summary['not_converged']} "
                f"test point(s): largest {summary['measure']} {summary['max_relative_residual']:.3e} after at "
                f"most {summary['max_iterations']} iterations. The residuals are in the store's attributes "
                "('solver_info'). Raise maxiter or regularization, or use a preconditioner.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return summary

    def _config(self, graph: InfluenceGraph, layout: zstore.StoreLayout) -> dict:
        solver = self.solver
        params = {
            k: v
            for k, v in solver.config.to_dict().items()
            if isinstance(v, (bool, int, float, str, type(None))) and k not in solver.config.resource_fields
        }
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

    def _places(self) -> int:
        """Tasks that run at once (one here: the synchronous scheduler)."""
        return 1

    def _memory_budget(self) -> int | None:
        """Bytes one influence task may hold: the given budget, or 512 MiB for 'auto'."""
        return DEFAULT_MEMORY_BUDGET if self.memory_budget == "auto" else cast("int | None", self.memory_budget)

    def _execute_graph(self, graph: InfluenceGraph, keys: list) -> list:
        """Compute ``keys`` of a job's graph (the Dask calculator may solve test factors on the client
        first); ``self._on_done(key)``, when set, is called on this process as each of them finishes."""
        return self._execute(_needed(graph.dsk, keys), keys)

    def _execute(self, dsk: dict, keys: list) -> list:
        raise NotImplementedError


class _MergeProgress:
    """INFO lines on the ``dask_influence`` logger as the top-k merges of a job finish: the
    first, then at most one every ``every_seconds``, and the last."""

    def __init__(self, keys: set, k: int | None, every_seconds: float = 5.0):
        self.keys, self.k, self.every_seconds = keys, k, every_seconds
        self.finished = 0
        self._start = self._last = time.perf_counter()

    def done(self, key: Any) -> None:
        if key not in self.keys:
            return
        self.finished += 1
        now = time.perf_counter()
        if self.finished in (1, len(self.keys)) or now - self._last >= self.every_seconds:
            self._last = now
            logger.info(
                "Top-%s merged for %d of %d test block(s) in %.1f s.",
                self.k,
                self.finished,
                len(self.keys),
                now - self._start,
            )


def _needed(dsk: dict, keys: list) -> dict:
    """The tasks of ``dsk`` that ``keys`` depend on: a resume of a few chunks of a large store
    schedules a graph of their size, not the store's."""
    from dask.optimization import cull

    if not keys:
        return {}
    return cull(dsk, keys)[0]


FACTORS_AUTO_BYTES = 2**30
"""``save_factors="auto"`` saves the test factors up to this size, or up to the influences' size."""


def _saves_factors(save_factors: bool | str, plan: Any, graph: InfluenceGraph, num_params: int) -> bool:
    """Whether a job saves its test factors ``(n_test, num_params)`` (``influences_to_zarr(save_factors=...)``)."""
    if isinstance(save_factors, bool):
        return save_factors
    if save_factors != "auto":
        raise ValueError(f"save_factors must be True, False or 'auto'; got {save_factors!r}.")
    factor_values = plan.n_test * int(num_params)
    influence_values = plan.n_test * plan.n_train * max(1, int(np.prod(graph.feature_shape)))
    return factor_values * np.dtype(graph.dtype).itemsize <= FACTORS_AUTO_BYTES or factor_values <= influence_values


ONE_PASS_MIN_PARAMS = 2**24
"""``scoring="auto"`` scores in one pass on models of at least this many parameters (16.8M) whose test
factors need several groups: a group costs a forward and backward of every training point, at least
``6 p`` floating-point operations each, where re-reading a training block's share of the factors costs
``n_test p / n_block`` bytes (GPT-2-small, 16 test x 256 training sequences: one pass instead of 8)."""

SCORINGS = ("auto", "groups", "one_pass")


def _one_pass(scoring: str, plan: Any, mode: InfluenceMode, num_params: int) -> bool:
    """Whether a store job scores every test point in one pass (``influences_to_zarr(scoring=...)``)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(map(repr, SCORINGS))}; got {scoring!r}.")
    if scoring == "groups":
        return False
    if mode is not InfluenceMode.up:
        if scoring == "one_pass":
            raise ValueError(
                "scoring='one_pass' reads the factors by columns, which only mode='up' can; "
                "use scoring='groups' (or 'auto') for perturbation influences."
            )
        return False
    return scoring == "one_pass" or (len(plan.test_groups) > 1 and num_params >= ONE_PASS_MIN_PARAMS)


def _with_recorded_names(config: dict, path: str, renamed: Any) -> dict:
    """``config`` with a renamed hyperparameter (``renamed``: ``{old: new}``, ``SolverConfig.renamed``)
    under its old name where the existing store at ``path`` recorded it so: a store written before
    the rename resumes (its recorded parameters are compared with the solver's)."""
    if not renamed:
        return config
    try:
        attrs: Any = zarr.open_group(path, mode="r").attrs[zstore.ATTR]
        stored = dict(attrs.get("config", {}).get("parameters") or {})
    except Exception:
        return config
    back = {new: old for old, new in renamed.items() if old in stored and new not in stored}
    if not back:
        return config
    return {**config, "parameters": {back.get(k, k): v for k, v in config["parameters"].items()}}


def _generation_of(path: str) -> int | None:
    """The fit generation of an existing store (None without one)."""
    try:
        attrs: Any = zarr.open_group(path, mode="r").attrs[zstore.ATTR]
        return int(zstore.fit_record(attrs)["generation"])
    except Exception:
        return None


def _records_solver_info(solver: InfluenceModel) -> bool:
    """Iterative solvers (CG, LiSSA) report how their solves ended."""
    return bool(solver.reports_solves)


class SequentialInfluenceCalculator(_BlockCalculator):
    """Runs the block graph in this process (Dask's synchronous scheduler); no cluster.

    ``influences`` and ``self_influences`` return lazy dask arrays like the Dask
    calculator's; compute them with ``.compute(scheduler="synchronous")`` to stay in one
    process. ``influences_to_zarr`` runs synchronously with a plain progress bar.
    """

    def _execute(self, dsk: dict, keys: list) -> list:
        from contextlib import ExitStack

        from dask.callbacks import Callback
        from dask.diagnostics import ProgressBar
        from dask.local import get_sync

        if not keys:
            return []
        wanted, on_done = set(keys), self._on_done
        with ExitStack() as stack:
            if self.progress and not self._metered:
                stack.enter_context(ProgressBar())
            if on_done is not None:

                def posttask(key: Any, result: Any, dsk: Any, state: Any, worker: Any) -> None:
                    if key in wanted:
                        on_done(key)

                stack.enter_context(Callback(posttask=posttask))
            return get_sync(dsk, keys)


class DaskInfluenceCalculator(_BlockCalculator):
    """Runs the block graph on a Dask cluster.

    Args:
        solver: a fitted solver; it is shipped to each worker once (as one graph key that
            the scheduler can recompute if a worker is lost; one of more than 128 MiB of arrays,
            e.g. EK-FAC on a 124M-parameter model, is broadcast to the workers instead, so that
            neither the submitted graph nor the scheduler holds a copy:
            :func:`~dask_influence.mapping.literals.broadcast_large`).
        client: a ``distributed.Client``; ``None`` uses the current client if there is one,
            else starts an embedded ``LocalCluster`` (one single-threaded worker process per
            core) for each call and closes it afterwards.
        progress: show Dask's progress bar while a job runs.
        memory_budget: bytes one influence task may hold (its test factors and its block of
            output); test blocks beyond that are split into groups. ``"auto"``: a quarter of
            the smallest worker memory limit of the current client, at most 512 MiB;
            ``None``: one group.
        n_workers: workers of the embedded cluster (default: the number of cores).
        factors: where ``influences_to_zarr`` solves the test factors of a ``CgInfluence``:
            ``"client"``: one block CG per test block on the client, each iteration ONE sweep
            over the train blocks on the cluster (needs :meth:`fit`); ``"workers"``: in the
            factor tasks, each worker sweeping the whole training set alone per iteration;
            ``"auto"`` (default): ``"client"`` after :meth:`fit`, else ``"workers"``. Other
            solvers (LiSSA's solve draws random batches) always solve on the workers.

    A solver whose model is on CUDA runs its tasks with the resource ``GPU=1``; start
    workers with ``--resources GPU=1`` (one per GPU).
    """

    def __init__(
        self,
        solver: InfluenceModel,
        client: Any = None,
        *,
        progress: bool = True,
        memory_budget: int | str | None = "auto",
        n_workers: int | None = None,
        factors: str = "auto",
    ):
        super().__init__(solver, progress=progress, memory_budget=memory_budget)
        if factors not in ("auto", "client", "workers"):
            raise ValueError(f"factors must be 'auto', 'client' or 'workers'; got {factors!r}.")
        self.client = client
        self.n_workers = n_workers
        self.factors = factors

    @contextmanager
    def _train_blocks(self, source: Any) -> Iterator[Any]:
        from .fitting import ClusterTrainBlocks

        with self._client() as client, ClusterTrainBlocks(client, self.solver, source) as blocks:
            yield blocks

    def _check_fitted(self) -> None:
        super()._check_fitted()
        self._factors_on_client()  # refuses factors='client' without fit(), before a store is touched

    def _factors_on_client(self) -> bool:
        if self.factors == "workers" or not self.solver.solves_with_sweeps:
            return False
        if self._fit_train is None or getattr(self.solver, "fit_id_", None) != self._fit_id:
            if self.factors == "client":
                raise ValueError(
                    "factors='client' solves with the training data of the fit; call "
                    "calc.fit(train) first, or use factors='workers'."
                )
            return False
        return True

    def _solve_factors_on_client(self, client: Any, graph: InfluenceGraph, dsk: dict, keys: list) -> None:
        from .fitting import solve_factors_on_cluster

        def result(factors: np.ndarray, report: Any) -> Any:
            return (factors, zstore.solver_info_row(report, len(factors))) if graph.record_solves else factors

        self.last_run_["factor_blocks_on_client"] = solve_factors_on_cluster(
            self.solver, client, self._fit_train, graph, dsk, keys, result=result
        )

    def _places(self) -> int:
        """Tasks that run at once: the threads of the given or current client's workers (else the embedded
        cluster's workers)."""
        client = given_or_current(self.client)
        if client is None:
            return max(1, int(self.n_workers or os.cpu_count() or 1))
        return max(1, sum(int(w.get("nthreads") or 1) for w in client.scheduler_info().get("workers", {}).values()))

    def _memory_budget(self) -> int | None:
        if self.memory_budget != "auto":
            return cast("int | None", self.memory_budget)  # checked in __init__
        client = given_or_current(self.client)
        if client is None:
            return DEFAULT_MEMORY_BUDGET
        limits = [w.get("memory_limit") or 0 for w in client.scheduler_info().get("workers", {}).values()]
        limits = [x for x in limits if x > 0]
        return min([DEFAULT_MEMORY_BUDGET] + [x // 4 for x in limits])

    def _client(self) -> AbstractContextManager[Any]:
        """The given client, else the current one, else an embedded ``LocalCluster`` for the call."""
        return dask_client(self.client, self.n_workers)

    def _lazy_graph(self, dsk: dict) -> dict:
        """A lazy array's graph with a solver over ``BROADCAST_BYTES`` broadcast to the given or current
        client's workers (a future in the graph: the array is then computed on that client); without a
        client the graph keeps its literals (computed wherever the caller computes it)."""
        client = given_or_current(self.client)
        return dsk if client is None else broadcast_large(client, dsk)

    def _execute_graph(self, graph: InfluenceGraph, keys: list) -> list:
        if not keys:
            return []
        with self._client() as client:
            if self._factors_on_client():
                self._solve_factors_on_client(client, graph, graph.dsk, keys)
            return self._run(client, _needed(graph.dsk, keys), keys)

    def _execute(self, dsk: dict, keys: list) -> list:
        if not keys:
            return []
        with self._client() as client:
            return self._run(client, dsk, keys)

    def _run(self, client: Any, dsk: dict, keys: list) -> list:
        import threading

        from distributed import as_completed

        resources = {"GPU": 1} if self.solver.device.type == "cuda" else None
        trim_workers(client)  # what an earlier job (a fit: its blocks' activations) freed, before this one's
        with sent_once():  # the solver and an in-memory dataset are literals of the graph (broadcast if large)
            futures = client.get(broadcast_large(client, dsk), keys, sync=False, resources=resources)
        bar = None
        if self.progress and not self._metered:
            from distributed import progress

            bar = threading.Thread(target=progress, args=(futures,), daemon=True)
            bar.start()
        if self._on_done is not None:
            on_done = self._on_done
            for future in as_completed(futures, loop=client.loop):  # also a client not set as the default
                if future.status == "finished":
                    on_done(future.key)
                else:
                    break  # an error: gather raises it
        try:
            return client.gather(futures)
        finally:  # the bar's last words (it erases its line) come before the caller's, also on an error
            if bar is not None:
                bar.join(timeout=5)
