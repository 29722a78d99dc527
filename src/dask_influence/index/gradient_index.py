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
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from dask.base import tokenize
from torch import nn

from .. import progress as _progress
from ..core.projection import KroneckerProjection
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
from ..storage.index_info import suggested_dim
from . import factored, inputs, layout, memory_check, runner, tasks
from .projector import LEADING_ROOTS_MAX_OUTPUTS, Projector

PRECONDITIONERS = ("curvature", "fisher", "none")
DEFAULT_MEMORY_BUDGET = 512 * 2**20
FAN_IN = 8


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
        _check_regularization(regularization)
        factored.check_storage(storage, factor_rank, projection)
        _check_draws(ggn_draws)
        verify_mode = _verify_mode(verify)
        runner.check_client(client)
        projector = Projector(model, task, projection, projection_dim, seed, layers=layers)
        auto_dtype, dtype = dtype == "auto", _auto_dtype(projector) if dtype == "auto" else dtype
        if preconditioner == "curvature" and curvature == "ggn" and not projector.task.has_outputs:
            raise ValueError(
                f"preconditioner='curvature' with curvature='ggn' needs the task's outputs; the task "
                f"{projector.task.name!r} has none. Pass curvature='hessian', preconditioner='fisher', "
                "or a Task with outputs and output_loss."
            )
        source = as_source(train, block_size=train_block_size, name="train", perturb=projector.task.perturb)
        sizes = tuple(int(s) for s in source.block_sizes)
        if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:  # uneven dask chunks: one block per chunk
            source = as_source(train, block_size=max(sizes), name="train", perturb=projector.task.perturb)
            sizes = tuple(int(s) for s in source.block_sizes)
        first = _load_block(source, 0)
        path = os.fspath(path)
        _trial(projector, first, path)  # before anything at ``path`` is created, resumed or deleted
        rank = _factor_rank(projector, first, factor_rank) if storage == "factored" else None
        record = {
            "kind": "gradient_index",
            "model_checksum": projector.model_checksum(),
            "num_params": projector.spec.num_params,
            "task": projector.task.describe(),
            "task_loss": projector.task.loss_id(),
            "projection": projector.describe_projection(),
            "dim": projector.dim,
            "dtype": dtype,
            "n_train": sum(sizes),
            "block_sizes": list(sizes),
            "data_digest": layout.block_digest(first),
            "inputs": inputs.describe(first, projector.task.pairs, projector.task.perturb),
            "preconditioner": preconditioner,
            "curvature": curvature if preconditioner == "curvature" else None,
            "regularization_setting": regularization,
            "ggn_estimate": _ggn_estimate(projector, first, preconditioner, curvature, ggn_draws, seed, sum(sizes)),
            "storage": storage,
            **({"factor_rank": rank} if rank is not None else {}),
        }
        memory_check.check_build(projector, first, max(sizes), record, memory_budget)  # before anything is written
        zstore.check_path(path)
        with zlock.StoreLock(path, break_lock=break_lock):
            group, resumed = _prepare(
                path,
                record,
                sizes,
                projector.dim,
                dtype,
                resume=resume,
                overwrite=overwrite,
                auto=ggn_draws == "auto",
                auto_dtype=auto_dtype,
            )
            dtype = str(record["dtype"])
            report = layout.verify(group, mode=verify_mode) if resumed and verify_mode else None
            if report is not None:
                layout.repair(group, report)
            done = layout.done_blocks(group)
            ranges = ranges_from_sizes(sizes)
            token = tokenize(record["model_checksum"], record["projection"], path)
            proj_key = f"projector-{token}"
            dsk: dict = {proj_key: (unbox, Literal(projector, token)), **source.graph()}
            keys = []
            for j in map(int, np.nonzero(~done)[0]):
                keys.append((f"index-{token}", j))
                dsk[keys[-1]] = (tasks.write_projected, proj_key, source.block_task(j), path, j, ranges[j], rank)
            gpu = projector.device.type == "cuda"
            passes = 1 if preconditioner == "none" else 2
            with _progress.reporting(progress) as reporter, dask_client(client, n_workers) as active:
                todo = {key: sizes[key[1]] for key in keys}
                meter = reporter.meter(
                    f"Index build: pass 1 of {passes} (projected gradients, dim {projector.dim:,})",
                    sum(todo.values()),
                    "samples",
                    force=True,
                )
                runner.run(active, dsk, keys, gpu=gpu, meter=meter, counts=todo)
                meter.finish()
                stored = layout.attributes(group)
                if keys or not stored.get("curvature_done"):
                    what = f"{curvature} curvature" if preconditioner == "curvature" else f"{preconditioner} curvature"
                    summing = (
                        None
                        if preconditioner == "none"
                        else reporter.meter(f"Index build: pass 2 of 2 ({what})", sum(sizes), "samples", force=True)
                    )
                    curv = _curvature(active, dsk, proj_key, source, path, record, ranges, gpu, summing)
                    if summing is not None:
                        summing.finish()
                    stored_as = layout.curvature_dtype(dtype)
                    lam = _regularization(regularization, preconditioner, curv)
                    chol = cholesky_factor(curv, lam)  # stored instead of C: queries at lambda skip it
                    layout.write_curvature(group, curv if chol is None else chol, stored_as)
                    layout.update(
                        group,
                        curvature_done=True,
                        regularization=lam,
                        curvature_dtype=stored_as,
                        curvature_form="matrix" if chol is None else "cholesky",
                        curvature_factor_lambda=lam,
                        **effective_dimension(curv, lam, preconditioner, chol),
                    )
            if not bool(layout.done_blocks(group).all()):
                raise StoreError(
                    f"The index {path!r} is missing blocks after its build; run the build again to resume."
                )
            if rank is not None:
                layout.update(group, factor_dropped=layout.factor_dropped(path, group))
            layout.update(group, complete=True, completed=layout.now(), blocks_written=len(keys))
        index = cls(path, projector, client=client, n_workers=n_workers)
        _warn_small_k(index.attributes)
        index.last_run_ = {"blocks_written": len(keys), "blocks_skipped": len(sizes) - len(keys)}
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
        verify_mode = _verify_mode(verify)
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
        _check_regularization(lam)
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
        memory_check.check_query(
            self.projector, lambda: _load_block(source, 0), source.block_sizes, self.attributes, self.memory_budget
        )
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


def cholesky_factor(curvature: np.ndarray, lam: float) -> np.ndarray | None:
    """The lower Cholesky factor ``L`` ``(k, k)`` float64 of ``C + lambda I``, or ``None`` where that
    is not positive definite (a projected Hessian with ``lambda`` below its lowest eigenvalue)."""
    c = torch.from_numpy(np.asarray(curvature, dtype=np.float64))
    chol, info = torch.linalg.cholesky_ex(c + lam * torch.eye(c.shape[0], dtype=c.dtype))
    return chol.numpy() if int(info) == 0 else None


def effective_dimension(
    curvature: np.ndarray, lam: float, preconditioner: str, chol: np.ndarray | None = None
) -> dict[str, Any]:
    """The effective dimension of the projected curvature and what it says about ``k``.

    ``effective_dimension_projected`` is ``d_k = tr(C (C + lambda I)^-1)`` of the stored ``C``
    ``(k, k)`` (from the Cholesky factor ``L`` of ``C + lambda I``, ``chol`` where the caller has it:
    ``k - lambda ||L^-1||_F^2``; the eigenvalues, clipped at 0, where ``C + lambda I`` is
    indefinite), at most ``k``.
    ``effective_dimension`` estimates the full curvature's ``d`` from it: a random projection
    to ``k`` dimensions of a curvature with ``d`` directions above ``lambda`` keeps about
    ``d_k = d k / (k + d)`` of them, so ``d ~ d_k k / (k - d_k)`` (``None``: ``d_k`` within 0.5
    of ``k``, saturated). Measured on an MLP and a 2-layer GPT-2 it overestimates the true
    ``d`` by 1.4-2x where ``k >= 2 d``: a conservative guide. Empty for ``preconditioner="none"``.
    """
    if preconditioner == "none" or lam <= 0:
        return {}
    k = curvature.shape[0]
    chol = cholesky_factor(curvature, lam) if chol is None else chol
    if chol is not None:
        inverse = torch.linalg.solve_triangular(torch.from_numpy(chol), torch.eye(k, dtype=torch.float64), upper=False)
        d_k = float(k - lam * (inverse * inverse).sum())
    else:
        e = torch.linalg.eigvalsh(torch.from_numpy(np.asarray(curvature, dtype=np.float64))).clamp_min(0)
        d_k = float((e / (e + lam)).sum())
    d_k = min(max(d_k, 0.0), float(k))
    estimate = d_k * k / (k - d_k) if k - d_k > 0.5 else None
    return {"effective_dimension_projected": d_k, "effective_dimension": estimate}


def _warn_small_k(attributes: dict) -> None:
    """Warn when ``k`` is below the estimated effective dimension, naming the ``k`` to choose."""
    better = suggested_dim(attributes)
    if better is None:
        return
    k, d_k = int(attributes["dim"]), attributes["effective_dimension_projected"]
    estimate = attributes["effective_dimension"]
    found = (
        f"the estimated effective dimension of the curvature is {min(estimate, attributes['num_params']):,.0f}"
        if estimate is not None
        else "the projected curvature is saturated (all its directions lie above lambda)"
    )
    warnings.warn(
        f"projection_dim={k} is too small for regularization={attributes['regularization']:.3g}: {found} "
        f"(tr(C (C + lambda I)^-1) = {d_k:,.1f} of k = {k}), so the index loses directions the influences need. "
        f"Build with projection_dim={better}{' or more' if estimate is None else ''} (or a larger regularization).",
        UserWarning,
        stacklevel=3,
    )


def _auto_dtype(projector: Projector) -> str:
    """``dtype="auto"``: float16 (2 bytes per dimension and point), float32 for a float64 model."""
    return "float32" if projector.dtype == torch.float64 else "float16"


def _out_dtype(projector: Projector) -> str:
    return "float64" if projector.dtype == torch.float64 else "float32"


def _check_regularization(value: Any) -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"regularization must be a number >= 0 or 'auto'; got {value!r}.")


def _verify_mode(verify: Any) -> str | None:
    """``verify`` of :meth:`GradientIndex.build` as ``"full"``, ``"exists"`` or ``None``."""
    if verify is True or verify == "full":
        return "full"
    if verify is False or verify is None:
        return None
    if verify == "exists":
        return "exists"
    raise ValueError(f"verify must be True, False, 'full' or 'exists'; got {verify!r}.")


def _regularization(setting: float | str, preconditioner: str, curvature: np.ndarray) -> float:
    """The stored ``lambda``: ``setting``, or for ``"auto"`` :func:`_auto_regularization` (``0`` with
    ``preconditioner="none"``, whose scores are then the plain inner products ``phi_i . phi_j``)."""
    if setting != "auto":
        return float(setting)
    return 0.0 if preconditioner == "none" else _auto_regularization(curvature)


AUTO_DRAWS = 8
"""The most labels drawn per sample by ``ggn_draws="auto"`` (measured: docs/gradient-index.md)."""
AUTO_DRAWS_PER_DIM = 8
"""``ggn_draws="auto"`` draws ``AUTO_DRAWS_PER_DIM * k / n_train`` labels per sample (1 to
``AUTO_DRAWS``): about 8 drawn gradients per projected dimension keep the sampled GGN within
0.02 of Pearson of the exact one at under 2x the empirical Fisher's build (the width-16 GPT-2 of
``benchmarks/index_peers.py``, 256 sequences: 0.945 / 0.974 against the exact 0.962 / 0.992 at
k = 256 / 1,024, builds 1.5-2.0x the Fisher's; 16 draws: 0.954 / 0.984 at 2.2-2.7x)."""


AUTO_TRACE = 0.95
"""``ggn_draws="auto"`` on a classifier of at most :data:`AUTO_DRAWS` classes sums the GGN over
each sample's leading output-curvature roots holding this share of the trace
(:func:`~.projector.leading_roots`; measured in docs/gradient-index.md)."""


def _check_draws(value: Any) -> None:
    if value == "auto" or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"ggn_draws must be 'auto', None or an int >= 0; got {value!r}.")


def auto_draws(k: int, n_train: int) -> int:
    """The labels ``ggn_draws="auto"`` draws per sample: ``ceil(AUTO_DRAWS_PER_DIM * k / n_train)``,
    1 to ``AUTO_DRAWS``."""
    return int(min(AUTO_DRAWS, max(1, -(-AUTO_DRAWS_PER_DIM * k // max(n_train, 1)))))


def _ggn_estimate(
    projector: Projector,
    first: Any,
    preconditioner: str,
    curvature: str,
    draws: int | str | None,
    seed: int,
    n_train: int,
) -> str | dict | None:
    """How the index sums its GGN: ``"exact"`` or ``{"kind": "sampled", "draws": d, "seed": seed}``
    (``None`` for another preconditioner or curvature).

    Raises:
        ValueError: ``ggn_draws`` asks for the sampled Fisher where the loss has none.
    """
    if preconditioner != "curvature" or curvature != "ggn" or not draws:
        return None if preconditioner != "curvature" or curvature != "ggn" else "exact"
    from ..core import batches

    can, c = projector.sampling(batches.slice_rows(tuple(first) if isinstance(first, list) else first, 0, 8))
    if draws == "auto":  # up to 64 outputs (a classifier): the leading exact roots; beyond: sampled labels
        draws = auto_draws(projector.dim, n_train) if can and c > LEADING_ROOTS_MAX_OUTPUTS else 0
        if not draws:
            return {"kind": "leading", "trace": AUTO_TRACE} if 2 < c <= LEADING_ROOTS_MAX_OUTPUTS else "exact"
    if not can:
        raise ValueError(
            f"ggn_draws={draws} draws labels from the model's predictive distribution, which is known for "
            "softmax cross-entropy, the causal-LM task and mean squared error; this task's loss has none. "
            "Pass ggn_draws=0 (the exact GGN)."
        )
    return {"kind": "sampled", "draws": int(draws), "seed": int(seed)}


def _factor_rank(projector: Projector, first: Any, factor_rank: int | None) -> int:
    """The ``r`` a factored index stores: ``factor_rank`` (at most the largest ``min(k_o, k_i)``, beyond
    which every layer is exact), or the exact rank ``max_l min(T_l, k_o, k_i)`` of the first block's
    positions (:func:`~.factored.exact_rank`)."""
    from ..core import batches

    projection = projector.projection
    assert isinstance(projection, KroneckerProjection)
    dims = projection.layer_dims
    if factor_rank is not None:
        return min(int(factor_rank), max(min(ko, ki) for ko, ki in dims))
    rows = batches.slice_rows(tuple(first) if isinstance(first, list) else first, 0, 1)
    return factored.exact_rank(dims, projector.positions(rows))


TRIAL_ROWS = 2
"""Training points projected on the driver before a build creates, resumes or deletes anything."""


def _trial(projector: Projector, block: Any, path: str) -> None:
    """Project the first ``TRIAL_ROWS`` points of the first training block: data that the model
    and task cannot take is refused before an existing index is touched.

    Raises:
        ValueError: naming the batch's shapes and dtypes, the error, and that nothing was written.
    """
    from ..core import batches

    rows = batches.slice_rows(tuple(block) if isinstance(block, list) else block, 0, TRIAL_ROWS)
    try:
        projector.project(rows)
    except Exception as err:
        if type(err).__module__ == "dask_influence.errors":  # the library's own one-line errors (NaN data, ...)
            raise
        record = inputs.describe(rows, projector.task.pairs, None)["leaves"]
        shapes = ", ".join(
            f"{inputs._label(k, projector.task.pairs, 'train')} (n, {', '.join(map(str, v['shape']))}) {v['dtype']}"
            .replace("(n, )", "(n,)")
            for k, v in record.items()
        )  # fmt: skip
        raise ValueError(
            f"The model and {'loss' if projector.task.pairs else 'task'} could not be evaluated on the first "
            f"training batch ({shapes}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            f"Nothing was written; the index path {path!r} is left as it was."
        ) from err


def _auto_regularization(curvature: np.ndarray) -> float:
    """``0.01 * trace(C) / k`` (relative damping; at least a tiny positive number)."""
    k = curvature.shape[0]
    return max(0.01 * abs(float(np.trace(curvature))) / k, 1e-12)


def _load_block(source: Any, j: int) -> Any:
    from dask.local import get_sync

    return get_sync({**source.graph(), "block": source.block_task(j)}, "block")


def _prepare(
    path: str,
    record: dict,
    sizes: tuple[int, ...],
    dim: int,
    dtype: str,
    *,
    resume: bool,
    overwrite: bool,
    auto: bool = False,
    auto_dtype: bool = False,
) -> tuple[Any, bool]:
    """The index group to build into, and whether it is an existing one being resumed."""
    existing = layout.existing_kind(path)
    if existing == "other":
        layout.refuse_other(path)
    if existing == "index" and not overwrite:
        if not resume:
            raise StoreError(
                f"The gradient index {path!r} already exists; pass resume=True to complete it or "
                "overwrite=True to replace it."
            )
        group = layout.open_index(path, mode="r+")
        stored = layout.attributes(group)
        if "storage" not in stored:  # an index built before the factored storage: dense
            stored["storage"] = "dense"
            if record.get("storage") == "dense":
                layout.update(group, storage="dense")
        if "ggn_estimate" not in stored:  # an index built before the sampled Fisher: an exact GGN
            stored["ggn_estimate"] = "exact" if record.get("ggn_estimate") is not None else None
            layout.update(group, ggn_estimate=stored["ggn_estimate"])
        if auto:  # ggn_draws="auto" resumes the index as it was built
            record["ggn_estimate"] = stored["ggn_estimate"]
        if auto_dtype:  # so does dtype="auto"
            record["dtype"] = stored.get("dtype", record["dtype"])
        added = {k: v for k, v in record.items() if k in layout.ADDED_LATER and k not in stored}
        layout.check_record(path, stored, {k: v for k, v in record.items() if k not in added}, "this build")
        if added:  # an index built before these were recorded: recorded now
            layout.update(group, **added)
        return group, True
    try:
        return layout.create(path, record, sizes, dim, dtype), False
    except OSError as err:
        raise StoreError(f"Cannot write the gradient index {path!r}: {err.strerror or err}.") from None


def _curvature(
    client: Any,
    dsk: dict,
    proj_key: str,
    source: Any,
    path: str,
    record: dict,
    ranges: Any,
    gpu: bool,
    meter: _progress.Meter | None = None,
) -> np.ndarray:
    """The preconditioner's undamped curvature ``C`` ``(k, k)``: a reduction tree over blocks."""
    kind, n, k = record["preconditioner"], record["n_train"], record["dim"]
    if kind == "none":
        return np.eye(k)
    token = tokenize(record["model_checksum"], record["projection"], kind, path)
    leaves: list[tuple] = []
    for j, rows in enumerate(ranges):
        leaves.append((f"ixcurv-{token}", j))
        if kind == "fisher":
            dsk[leaves[-1]] = (tasks.gram_block, path, rows)
        else:
            weight = (rows[1] - rows[0]) / n
            sampled = record.get("ggn_estimate")
            sampled = sampled if isinstance(sampled, dict) else None
            dsk[leaves[-1]] = (
                tasks.curvature_block, proj_key, source.block_task(j), record["curvature"], weight, sampled, rows[0]
            )  # fmt: skip
    level, keys = 0, leaves
    while len(keys) > 1:
        grouped = [keys[i : i + FAN_IN] for i in range(0, len(keys), FAN_IN)]
        keys = [(f"ixsum-{token}", level, g) for g in range(len(grouped))]
        for key, members in zip(keys, grouped):
            dsk[key] = (tasks.total, *members)
        level += 1
    counts = {leaf: rows[1] - rows[0] for leaf, rows in zip(leaves, ranges)}
    (total,) = runner.run(client, dsk, keys, gpu=gpu and kind == "curvature", meter=meter, counts=counts)
    total = np.asarray(total, dtype=np.float64)
    if kind == "fisher":
        total = total / n
    return (total + total.T) / 2
