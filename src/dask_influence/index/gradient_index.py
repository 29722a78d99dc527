"""``GradientIndex``: projected training gradients built once on the cluster, queried many times.

Build: each train block's per-sample loss gradients are projected to ``k`` dimensions
(:mod:`dask_influence.core.projection`) by a Dask task that writes them to the index's
``gradients`` array ``(n_train, k)`` and flags the block; a build that stops resumes with the
blocks not flagged. Then one pass sums the preconditioner's curvature ``C`` ``(k, k)``:

- ``"curvature"``: ``P H P^T`` (``curvature="ggn"``: the projected Gauss-Newton, else the
  projected Hessian) of the mean training loss, from ``k`` curvature-vector products per block;
- ``"fisher"``: ``Phi^T Phi / n``, the projected empirical Fisher, from the index itself
  (no pass over the data; the TRAK preconditioner);
- ``"none"``: the identity (plain projected-gradient similarity: not an influence).

Query: ``influence[i, j] = phi(test_i)^T (C + lambda I)^-1 phi_j`` with ``phi(test_i) = P grad
f(test_i)`` (the task's measurement), ``phi_j`` the stored row: the test gradients are
projected and solved once per test block, then scored against the index chunk by chunk on
the workers; the training data is not needed. With ``k = p`` and ``projection="orthogonal"``
this is exactly the influence of the same curvature: only the compression approximates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from dask.base import tokenize
from torch import nn

from .. import progress as _progress
from ..errors import StoreError
from ..mapping.clients import dask_client
from ..mapping.literals import Literal, unbox
from ..mapping.plan import BlockPlan, ranges_from_sizes
from ..mapping.sources import as_source
from ..mapping.store_job import add_topk_tasks
from ..mapping.tasks import pick
from ..renamed import renamed, warn_renamed
from ..storage import lock as zlock
from ..storage import store as zstore
from . import build as _build
from . import factored, inputs, layout, memory_check, runner, tasks
from .projector import Projector

PRECONDITIONERS = ("curvature", "fisher", "none")
DEFAULT_MEMORY_BUDGET = 512 * 2**20


@dataclass(frozen=True)
class TopK:
    """Per test point the ``k`` most helpful and most harmful training points, most extreme first.

    Attributes:
        helpful_indices, harmful_indices: ``(n_test, k)`` int64 training indices.
        helpful_values, harmful_values: ``(n_test, k)`` their influences.
    """

    helpful_indices: np.ndarray
    helpful_values: np.ndarray
    harmful_indices: np.ndarray
    harmful_values: np.ndarray


class GradientIndex:
    """A gradient index on disk and the model it belongs to (use :meth:`build` or :meth:`open`).

    Args:
        path: the index's zarr group.
        projector: the model, task and projection (checked against the index).
        client: where queries run: a ``distributed.Client``, ``None`` (the current client, else
            an embedded ``LocalCluster`` per call) or ``"sync"`` (this process, no Dask cluster).
        n_workers: workers of the embedded cluster (default: the number of cores).

    Attributes:
        memory_budget: bytes one worker may hold in a query (``None``: half the machine's memory);
            a test block beyond it is refused in one line before any work
            (:mod:`~.memory_check`). :meth:`build` sets it to its own.
    """

    memory_budget: int | None = None

    def __init__(
        self, path: str | os.PathLike, projector: Projector, *, client: Any = None, n_workers: int | None = None
    ):
        runner.check_client(client)
        self.path = os.fspath(path)
        self.projector = projector
        self.client = client
        self.n_workers = n_workers
        self.group: Any = layout.open_index(self.path)
        self.attributes = layout.attributes(self.group)
        self.last_run_: dict[str, Any] = {}
        self._factors: dict[float, np.ndarray] = {}  # lambda -> the Cholesky factor of C + lambda I

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        task: Any,
        train: Any,
        path: str | os.PathLike,
        *,
        projection_dim: int = 1024,
        projection: str = "sjlt",
        seed: int = 0,
        dtype: str = "auto",
        preconditioner: str = "curvature",
        curvature: str = "ggn",
        regularization: float | str = "auto",
        ggn_draws: int | str | None = "auto",
        train_block_size: int | None = None,
        layers: list[str] | None = None,
        resume: bool = True,
        overwrite: bool = False,
        verify: bool | str = True,
        break_lock: bool = False,
        client: Any = None,
        n_workers: int | None = None,
        progress: bool | None = None,
        block_size: int | None = None,
        memory_budget: int | None = None,
        storage: str = "dense",
        factor_rank: int | None = None,
    ) -> GradientIndex:
        """Project every training point's loss gradient into the index at ``path`` and sum the preconditioner.

        Args:
            model, task: the trained model and its :class:`~dask_influence.Task` (or a pair loss).
            train: the training data (anything the mapping layer accepts: a sequential
                DataLoader, a Dataset with ``train_block_size``, arrays or dask arrays).
            train_block_size: training points per block, one Dask task and one chunk of the
                index each (default: the loader's batch size; a dask array's chunks).
                ``block_size=`` is its old spelling (a ``RenamedWarning``).
            projection_dim: ``k``.
            projection: ``"sjlt"`` (sparse, any ``p``), ``"gaussian"``, ``"orthogonal"`` (dense,
                small ``p``; exact at ``k = p``) or ``"kronecker"`` (per layer, no per-sample
                gradient formed). See :mod:`dask_influence.core.projection`.
            dtype: of the stored gradients: ``"float16"`` halves the size of ``"float32"``;
                ``"auto"`` (default): ``"float16"`` (measured: under 2e-7 of Pearson lost), and
                ``"float32"`` for a float64 model. A resumed index keeps its own.
            preconditioner: ``"curvature"`` (``P H P^T``, default), ``"fisher"`` (``Phi^T Phi / n``)
                or ``"none"``.
            curvature: ``"ggn"`` or ``"hessian"`` for ``preconditioner="curvature"``.
            ggn_draws: how the GGN is summed: ``0``/``None`` exactly (``c`` projected backward
                passes per sample for ``c`` outputs, or ``k`` GGN-vector products), a positive
                int ``d``: the true Fisher from ``d`` labels drawn per sample from the model's
                predictive distribution (``d`` backward passes per sample, an unbiased
                estimate; :mod:`dask_influence.core.sampled_fisher`), ``"auto"`` (default):
                ``d = ceil(8 k / n_train)`` draws (1 to 8) where the loss's sampled Fisher
                is known and ``c > 64`` (a causal LM); with ``3 <= c <= 64`` (a classifier:
                sampling a 10-class MLP's GGN lost 0.1 of Pearson even at 16 draws) the leading
                exact roots that hold 95% of the output curvature's trace
                (:func:`~.projector.leading_roots`: within 0.001 of the exact GGN's Pearson on
                a 10-class MLP, at 1.2-1.5x the empirical Fisher's build); else exact. A resumed
                index keeps its own.
            regularization: ``lambda`` added at query time; ``"auto"`` is ``0.01 * trace(C) / k``
                (``0`` with ``preconditioner="none"``: plain projected-gradient similarity).
                A query may pass another.
            resume: complete an existing index built the same way (only its missing blocks);
                an index built another way is refused.
            overwrite: replace whatever index is at ``path`` (after projecting a first batch of
                ``train``, so that data the model cannot take never deletes a good index).
            verify: with ``resume``, check the blocks flagged written before trusting them:
                ``True``/``"full"`` (default) reads every chunk once (checksums), ``"exists"``
                only lists the chunk files, ``False`` trusts the flags. Missing or damaged
                blocks (and a damaged curvature) are recomputed; ``last_run_["verify"]`` says
                what was found.
            progress: report each pass (the projected gradients, the curvature): samples done of
                ``n_train``, rate, ETA; ``None``: see :mod:`dask_influence.progress`.
            storage: ``"dense"`` (default): each point's ``(k,)`` projected gradient; ``"factored"``
                (``projection="kronecker"`` only): per layer ``r`` pairs ``(u (k_o,), v (k_i,))`` whose
                ``sum_r u_r v_r^T`` is the layer's projected gradient, ``r sum_l (k_o + k_i)`` numbers
                per point instead of ``sum_l k_o k_i`` (a classifier: ``r = 1``); queries densify
                each index chunk as they read it (:mod:`~.factored`). A resumed index keeps its own.
            factor_rank: with ``storage="factored"``: ``None`` (default) stores every layer exactly
                (``r`` the positions per sample ``T``, at most ``min(k_o, k_i)``); an int ``r`` keeps
                each layer's best rank-``r`` part (an SVD) and records the share of the Frobenius
                norm it drops (``attributes["factor_dropped"]``).
            memory_budget: bytes one worker may hold (``None``: half the machine's memory, 80% of
                the GPU's). The build's peak per worker is estimated from the shapes before
                anything is written (:func:`~.memory_check.build_estimate`: a block's projected
                gradients, a chunk's per-sample gradients, the ``(k, k)`` sums, the block's
                output-curvature roots or products) and refused in one line beyond it; the
                index's queries keep it.

        Returns:
            the index, ready to query. ``last_run_`` says how many blocks were written and
            repaired.

        Raises:
            StoreError: ``path`` holds something else, or an index built with another model,
                task, projection or data (without ``overwrite``), or is locked by another job.
            ValueError: the model and task cannot be evaluated on the first training batch
                (nothing is written or deleted).
        """
        train_block_size = renamed(
            "GradientIndex.build", "block_size", block_size, "train_block_size", train_block_size
        )
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"preconditioner must be one of {', '.join(map(repr, PRECONDITIONERS))}; got {preconditioner!r}."
            )
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian'; got {curvature!r}.")
        if dtype != "auto" and dtype not in layout.DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(layout.DTYPES)}; got {dtype!r}.")
        _build.check_regularization(regularization)
        factored.check_storage(storage, factor_rank, projection)
        _build.check_draws(ggn_draws)
        runner.check_client(client)
        built = _build.write_index(
            model, task, train, path, projection_dim=projection_dim, projection=projection, seed=seed,
            dtype=dtype, preconditioner=preconditioner, curvature=curvature, regularization=regularization,
            ggn_draws=ggn_draws, train_block_size=train_block_size, layers=layers, storage=storage,
            factor_rank=factor_rank, resume=resume, overwrite=overwrite, verify=verify, break_lock=break_lock,
            client=client, n_workers=n_workers, progress=progress, memory_budget=memory_budget,
        )  # fmt: skip
        path, projector, keys, sizes, report = built.path, built.projector, built.written, built.sizes, built.report
        index = cls(path, projector, client=client, n_workers=n_workers)
        _build.warn_small_k(index.attributes)
        index.last_run_ = {"blocks_written": keys, "blocks_skipped": len(sizes) - keys}
        index.memory_budget = memory_budget
        if report is not None:
            index.last_run_["blocks_repaired"] = len(layout.damaged_blocks(report))
            index.last_run_["verify"] = report.as_dict()
        return index

    @classmethod
    def open(
        cls, path: str | os.PathLike, model: nn.Module, task: Any, *, client: Any = None, n_workers: int | None = None
    ) -> GradientIndex:
        """The complete index at ``path`` for querying with ``model`` and ``task``.

        Raises:
            StoreError: no index at ``path``, an incomplete one, or one built with another
                model (parameters), task or projection.
        """
        path = os.fspath(path)
        group = layout.open_index(path)
        stored = layout.attributes(group)
        if not stored.get("complete"):
            raise StoreError(f"The gradient index {path!r} is incomplete; run its build again (it resumes).")
        layout.check_intact(path, group)
        projection = dict(stored["projection"])
        projector = Projector(model, task, projection)
        layout.check_record(
            path,
            stored,
            {
                "model_checksum": projector.model_checksum(),
                "task_loss": projector.task.loss_id(),
                "projection": projector.describe_projection(),
            },
            "this model and task",
        )
        return cls(path, projector, client=client, n_workers=n_workers)

    # -- properties -----------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        """The number of indexed training points."""
        return int(self.attributes["n_train"])

    @property
    def dim(self) -> int:
        """``k``, the projected dimension."""
        return int(self.attributes["dim"])

    @property
    def regularization(self) -> float:
        """The ``lambda`` queries use unless they pass another (``0`` for ``preconditioner="none"``
        with ``"auto"``, also in an index built before that rule)."""
        if self.attributes.get("preconditioner") == "none" and self.attributes.get("regularization_setting") == "auto":
            return 0.0
        return float(self.attributes["regularization"])

    def curvature_matrix(self) -> np.ndarray:
        """The undamped curvature ``C`` ``(k, k)`` as float64 (verified: a damaged one raises a
        ``StoreError`` naming it). An index stores the Cholesky factor ``L`` of ``C + lambda_0 I``
        (``lambda_0`` its build's regularization) where that is positive definite, else ``C``; in
        float32 unless the index is float64. ``C`` is then ``L L^T - lambda_0 I``: rounding of
        about ``6e-8 (|C| + lambda_0)`` in float32."""
        stored = layout.read_curvature(self.path, self.group)
        if self.attributes.get("curvature_form") != "cholesky":
            return stored
        factor = torch.from_numpy(stored)
        c = factor @ factor.T
        c.diagonal().sub_(float(self.attributes["curvature_factor_lambda"]))
        return c.numpy()

    def gradients(self) -> np.ndarray:
        """The stored projected training gradients ``(n_train, k)`` (read whole, every chunk verified:
        small indexes only)."""
        dtype = layout.stored_dtype(self.group)
        return layout.read_gradients(self.path, (0, self.n_train), self.group).astype(dtype)

    # -- queries ------------------------------------------------------------------------------
    def influences(
        self,
        test: Any,
        *,
        test_block_size: int | None = None,
        regularization: float | None = None,
        progress: bool | None = None,
        block_size: int | None = None,
    ) -> np.ndarray:
        """``(n_test, n_train)`` influences of the indexed training points on ``test``, computed on the
        cluster and returned in memory (NumPy; see docs/api.md, "What influences returns").

        ``test_block_size``: test points per block (one factor task each; default: the loader's
        batch size; ``block_size=`` is its old spelling). ``progress``: report the index blocks
        scored; ``None``: see :mod:`dask_influence.progress`."""
        test_block_size = _test_block_size("influences", block_size, test_block_size)
        dsk, factor_keys, _, _, dtype = self._factor_graph(test, test_block_size, regularization)
        ranges = ranges_from_sizes(tuple(self.attributes["block_sizes"]))
        keys = []
        for j, rows in enumerate(ranges):
            keys.append(("ixscore", j))
            dsk[keys[-1]] = (tasks.score_group, factor_keys, self.path, rows, dtype)
        with _progress.reporting(progress) as reporter, dask_client(self.client, self.n_workers) as active:
            meter = reporter.meter("Index query: influences", self.n_train, "training points")
            counts = {key: rows[1] - rows[0] for key, rows in zip(keys, ranges)}
            parts = runner.run(active, dsk, keys, gpu=self._gpu, meter=meter, counts=counts)
            meter.finish()
        return np.concatenate([np.concatenate(p, axis=0) for p in parts], axis=1)

    def top_k(
        self,
        test: Any,
        k: int,
        *,
        test_block_size: int | None = None,
        regularization: float | None = None,
        block_size: int | None = None,
    ) -> TopK:
        """Per test point the ``k`` most helpful and harmful training points, merged exactly chunk by chunk
        (memory per task ``O(n_block * (k + chunk))``; the full matrix is never held)."""
        test_block_size = _test_block_size("top_k", block_size, test_block_size)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int; got {k!r}.")
        k = min(k, self.n_train)
        dsk, factor_keys, _, _, dtype = self._factor_graph(test, test_block_size, regularization)
        ranges = list(ranges_from_sizes(tuple(self.attributes["block_sizes"])))
        keys: list = []
        for i, fkey in enumerate(factor_keys):
            keys.append(("ixtopk", i))
            dsk[keys[-1]] = (_topk_block, fkey, self.path, ranges, k, dtype)
        with dask_client(self.client, self.n_workers) as active:
            parts = runner.run(active, dsk, keys, gpu=self._gpu)
        return TopK(*(np.concatenate([p[n] for p in parts]) for n in range(4)))

    def influence_factors(
        self,
        test: Any,
        *,
        test_block_size: int | None = None,
        regularization: float | None = None,
        block_size: int | None = None,
    ) -> np.ndarray:
        """The projected influence factors ``(C + lambda I)^-1 P grad f(test)`` for each test point:
        ``(n_test, k)`` float64 (the solvers' ``influence_factors`` in the index's ``k`` dimensions;
        ``influences = influence_factors @ gradients().T``). ``test_block_size``: test points per
        block (``block_size=`` is its old spelling)."""
        test_block_size = _test_block_size("influence_factors", block_size, test_block_size)
        dsk, factor_keys, *_ = self._factor_graph(test, test_block_size, regularization, "float64")
        with dask_client(self.client, self.n_workers) as active:
            return np.concatenate(runner.run(active, dsk, factor_keys, gpu=self._gpu))

    def factors(self, test: Any, **kwargs: Any) -> np.ndarray:
        """The old spelling of :meth:`influence_factors` (a ``RenamedWarning``; removed in the next release)."""
        warn_renamed("GradientIndex.factors", "GradientIndex.influence_factors")
        return self.influence_factors(test, **kwargs)

    def scores(
        self,
        test: Any,
        *,
        test_block_size: int | None = None,
        regularization: float | None = None,
        block_size: int | None = None,
    ) -> Any:
        """The influences on ``test`` as the scores of an evaluation (``di.evaluate.lds(index.scores(test), ...)``):
        answered from the test factors and one read of the index, never the full matrix."""
        from .scores import IndexScores

        test_block_size = _test_block_size("scores", block_size, test_block_size)
        lam = self.regularization if regularization is None else float(regularization)
        factors = self.influence_factors(test, test_block_size=test_block_size, regularization=lam)
        return IndexScores(self, factors, lam)

    def self_influences(self, *, regularization: float | None = None) -> np.ndarray:
        """``phi_j^T (C + lambda I)^-1 phi_j`` for every indexed training point: ``(n_train,)``."""
        chol, _ = self._cholesky(regularization)
        dtype = _out_dtype(self.projector)
        dsk: dict = {"ixchol": chol}
        keys = []
        for j, rows in enumerate(ranges_from_sizes(tuple(self.attributes["block_sizes"]))):
            keys.append(("ixself", j))
            dsk[keys[-1]] = (tasks.self_block, self.path, rows, "ixchol", dtype)
        with dask_client(self.client, self.n_workers) as active:
            return np.concatenate(runner.run(active, dsk, keys))

    def influences_to_zarr(
        self,
        test: Any,
        store: str | os.PathLike,
        *,
        top_k: int | None = None,
        self_influences: bool = False,
        resume: bool = False,
        overwrite: bool = False,
        test_block_size: int | None = None,
        regularization: float | None = None,
        verify: bool | str = True,
        break_lock: bool = False,
        memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
        progress: bool | None = None,
        block_size: int | None = None,
    ) -> zarr.Group:
        """Write ``(n_test, n_train)`` influences to an influence store (the layout of
        ``DaskInfluenceCalculator.influences_to_zarr``, so ``inspect``, ``rank``, ``plot`` and
        ``evaluate`` read it), chunked (test block, index block); optional top-k and self-influences.

        Args:
            resume: complete an existing store of the same query, computing only chunks not
                flagged done. overwrite: replace it.
            test_block_size: test points per block: the store's chunks are (test block, index
                block) (default: the loader's batch size; ``block_size=`` is its old spelling).
            verify: with ``resume``, check the chunks flagged done as
                ``DaskInfluenceCalculator.influences_to_zarr`` does (``True``/``"full"``: read and
                decode them; ``"exists"``: list their files; ``False``: trust the flags) and
                recompute damaged ones; ``last_run_["chunks_repaired"]`` counts them.
            memory_budget: bytes one scoring task may hold (its factors and output block).
            progress: report the chunks written (of those to compute), rate and ETA; ``None``:
                see :mod:`dask_influence.progress`.

        Returns:
            the store's zarr group (read-only).
        """
        test_block_size = _test_block_size("influences_to_zarr", block_size, test_block_size)
        verify_mode = zstore.verify_mode(verify)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None; got {top_k!r}.")
        dsk, factor_keys, test_sizes, lam, dtype = self._factor_graph(test, test_block_size, regularization)
        train_sizes = tuple(int(s) for s in self.attributes["block_sizes"])
        plan = BlockPlan.build(
            test_sizes,
            train_sizes,
            bytes_per_test_point=2 * (self.dim + max(train_sizes)) * np.dtype(dtype).itemsize,
            memory_budget=memory_budget,
        )
        top_k = min(top_k, self.n_train) if top_k else None
        store_layout = zstore.StoreLayout(plan.test_sizes, plan.train_sizes, None, dtype, top_k, bool(self_influences))
        fingerprint = self._fingerprint(lam)
        config = {
            "method": "GradientIndex",
            "parameters": {
                "index": self.path,
                "projection": self.attributes["projection"]["kind"],
                "projection_dim": self.dim,
                "preconditioner": self.attributes["preconditioner"],
                "curvature": self.attributes.get("curvature"),
                "index_dtype": self.attributes["dtype"],
            },
            "regularization": lam,
            "mode": "up",
            "shape": list(store_layout.shape),
            "test_block_sizes": list(plan.test_sizes),
            "train_block_sizes": list(plan.train_sizes),
            "dtype": dtype,
            "top_k": top_k,
            "self_influences": bool(self_influences),
            "solver_fingerprint": fingerprint,
            "num_params": self.projector.spec.num_params,
            "n_train_fit": self.n_train,
        }
        path = os.fspath(store)
        zstore.check_path(path)
        with zlock.StoreLock(path, break_lock=break_lock) as lock:
            group = zstore.prepare_store(
                path,
                config=config,
                layout=store_layout,
                resume=resume,
                overwrite=overwrite,
                fit=zstore.FitIdentity(fingerprint),
            )
            state = zstore.load_state(group)
            report = zstore.verify_store(group, mode=verify_mode, state=state) if resume and verify_mode else None
            found = report is not None and (
                report.repaired or any(report.unreadable_flags.values()) or any(report.wrong_flags.values())
            )
            if report is not None and found:
                zstore.repair(group, report, state)  # their flags cleared: recomputed below
            recorder = zstore.CompletionRecorder(group, state)
            recorder.flush(final=False)
            keys, finishes = self._pending(dsk, factor_keys, plan, store_layout, state, path, dtype)
            self.last_run_["chunks_repaired"] = len(report.damaged.get("influences", [])) if report else 0
            self.last_run_["verify"] = report.as_dict() if report else None
            counts = {key: len(finishes[key]) for key in keys if key[0] == "ixwrite"}
            try:
                with _progress.reporting(progress) as reporter, dask_client(self.client, self.n_workers) as active:
                    meter = reporter.meter(
                        f"Index query: influence chunks ({sum(test_sizes):,} test x {self.n_train:,} indexed points)",
                        sum(counts.values()),
                        "chunks",
                        force=True,
                    )
                    runner.run(
                        active,
                        dsk,
                        keys,
                        on_done=lambda key: recorder.record(finishes.get(key, [])),
                        gpu=self._gpu,
                        meter=meter,
                        counts=counts,
                    )
                    meter.finish()
            finally:
                recorder.flush(final=False)
            lock.ensure_held()
            recorder.flush(final=True)
            zstore.mark_complete(group, {"test_groups": [list(g) for g in plan.test_groups]}, state)
        return zarr.open_group(path, mode="r")

    # -- helpers ------------------------------------------------------------------------------
    @property
    def _gpu(self) -> bool:
        return self.projector.device.type == "cuda"

    def _fingerprint(self, lam: float) -> str:
        keys = ("model_checksum", "projection", "created", "preconditioner", "curvature", "n_train", "dtype")
        record = {k: self.attributes.get(k) for k in keys}
        return hashlib.sha256(json.dumps([record, lam, self.path], sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]

    def _cholesky(self, regularization: float | None) -> tuple[np.ndarray, float]:
        """The lower Cholesky factor of ``C + lambda I`` ``(k, k)`` float64 and ``lambda`` (factored
        once per ``lambda`` and index object: later queries reuse it)."""
        lam = self.regularization if regularization is None else float(regularization)
        _build.check_regularization(lam)
        if lam not in self._factors:
            self._factors = {lam: self._factor(lam)}  # one factor kept: k x k float64
        return self._factors[lam], lam

    def _factor(self, lam: float) -> np.ndarray:
        if self.attributes.get("curvature_form") == "cholesky" and lam == self.attributes["curvature_factor_lambda"]:
            return layout.read_curvature(self.path, self.group)  # the build's factor: one read, no factorization
        c = torch.from_numpy(self.curvature_matrix())
        chol, info = torch.linalg.cholesky_ex(c + lam * torch.eye(c.shape[0], dtype=c.dtype))
        if int(info) != 0:
            lowest = float(torch.linalg.eigvalsh(c)[0])
            raise ValueError(
                f"The index's projected curvature plus regularization={lam:g} is not positive definite "
                f"(its smallest eigenvalue is {lowest:.3g}); pass regularization > "
                f"{max(-lowest, 0) * 1.5 + 1e-12:.3g}, "
                "or build the index with curvature='ggn' (positive semi-definite for convex losses)."
            )
        return chol.numpy()

    def _factor_graph(
        self, test: Any, block_size: int | None, regularization: float | None, factor_dtype: str | None = None
    ) -> tuple[dict, list, tuple[int, ...], float, str]:
        """The graph of the test factors ``(n_block, k)`` per test block (in ``factor_dtype``, by default
        the output dtype: float32 for a float32 model), with its keys, the test block sizes,
        ``lambda`` and the output dtype."""
        out = _out_dtype(self.projector)
        chol, lam = self._cholesky(regularization)
        source = as_source(test, block_size=block_size, name="test", perturb=self.projector.task.perturb)
        recorded = self.attributes.get("inputs")
        inputs.check_source(recorded, source, self.projector.task.pairs)  # early, on the driver
        first = lambda: _build.load_block(source, 0)  # noqa: E731  (loaded only if the check needs it)
        memory_check.check_query(self.projector, first, source.block_sizes, self.attributes, self.memory_budget)
        token = tokenize(self._fingerprint(lam), source.token, factor_dtype or out)
        proj_key, chol_key = f"projector-{token}", f"chol-{token}"
        dsk: dict = {
            proj_key: (unbox, Literal(self.projector, token)),
            chol_key: (unbox, Literal(chol, token)),
            **source.graph(),
        }
        keys = []
        for i in range(len(source.block_sizes)):
            keys.append((f"ixfactors-{token}", i))
            block = source.block_task(i)
            dsk[keys[-1]] = (tasks.factor_block, proj_key, chol_key, block, recorded, factor_dtype or out)
        return dsk, keys, tuple(int(s) for s in source.block_sizes), lam, out

    def _pending(
        self, dsk: dict, factor_keys: list, plan: BlockPlan, store_layout: Any, state: Any, path: str, dtype: str
    ) -> tuple[list, dict]:
        """Write tasks for the chunks, self-influence blocks and top-k rows not done in ``state``."""
        done, flag = state.done("influences"), state.current
        rows, cols = plan.test_ranges, plan.train_ranges
        keys: list = []
        finishes: dict = {}
        for g, members in enumerate(plan.test_groups):
            for j in map(int, np.nonzero(~done[np.asarray(members)].all(axis=0))[0]):
                score = ("ixscore", g, j)
                dsk[score] = (tasks.score_group, [factor_keys[i] for i in members], self.path, cols[j], dtype)
                targets = [(i, *rows[i], pos) for pos, i in enumerate(members) if not done[i, j]]
                key: tuple = ("ixwrite", g, j)
                dsk[key] = (zstore.write_influence_chunks, path, j, cols[j], targets, score, flag)
                keys.append(key)
                finishes[key] = [("influences", (i, j)) for i, *_ in targets]
                for i, *_, pos in targets:  # chunk (i, j): test block i's rows of the group's scores
                    dsk[("ixchunk", i, j)] = (pick, score, pos)
        if store_layout.self_influences:
            chol_key = next(k for k in dsk if isinstance(k, str) and k.startswith("chol-"))
            for j in map(int, np.nonzero(~state.done("self_influences"))[0]):
                key = ("ixswrite", j)
                dsk[("ixself", j)] = (tasks.self_block, self.path, cols[j], chol_key, dtype)
                dsk[key] = (zstore.write_self_chunk, path, j, cols[j], ("ixself", j), flag)
                keys.append(key)
                finishes[key] = [("self_influences", (j,))]
        if store_layout.top_k:  # candidates of the chunks in memory (read back if done before), merged
            for i in map(int, np.nonzero(~state.done("top_k"))[0]):
                key = add_topk_tasks(
                    dsk, "ix", path, i, rows[i], cols, store_layout.top_k, flag, done[i], functools.partial(_chunk, i)
                )
                keys.append(key)
                finishes[key] = [("top_k", (i,))]
        self.last_run_ = {
            "chunks_computed": sum(len(v) for k, v in finishes.items() if k[0] == "ixwrite"),
            "chunks_total": plan.num_chunks,
        }
        return keys, finishes


def _test_block_size(method: str, block_size: int | None, test_block_size: int | None) -> int | None:
    """``test_block_size`` of ``GradientIndex.<method>``, given by its name or by its old spelling ``block_size``."""
    return renamed(
        f"GradientIndex.{method}", "block_size", block_size, "test_block_size", test_block_size, stacklevel=4
    )


def _chunk(i: int, j: int) -> tuple:
    """The key of chunk ``(i, j)`` of a query store's job: ``(n_i, n_j)`` (:meth:`GradientIndex._pending`)."""
    return ("ixchunk", i, j)


def _topk_block(factors: np.ndarray, path: str, ranges: list[tuple[int, int]], k: int, dtype: str) -> tuple:
    """Top-``k`` helpful and harmful training points of one test block, merged chunk by chunk with
    the stores' top-k selection (:mod:`dask_influence.storage.topk`):
    ``(helpful_idx, helpful_val, harmful_idx, harmful_val)``, each ``(n_block, k)``."""
    from ..storage import topk

    best = None
    for rows in ranges:
        part = topk.candidates(tasks.score_group([factors], path, rows, dtype)[0], rows[0], k)
        best = part if best is None else topk.merge([best, part], k)
    assert best is not None  # an index has at least one block
    return best


def _out_dtype(projector: Projector) -> str:
    return "float64" if projector.dtype == torch.float64 else "float32"
