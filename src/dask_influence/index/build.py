"""Building a gradient index: the two passes over the training data and what the build decides.

:func:`write_index` does the work of :meth:`~.gradient_index.GradientIndex.build` once its arguments
are checked: the projector, the index's record (model, task, projection, data, preconditioner,
how the GGN is summed, storage), the memory check, then under the store's lock

1. pass 1: each train block's projected gradients ``(n_b, k)`` (or their per-layer factors) written
   and flagged by a Dask task (:func:`~.tasks.write_projected`); a resumed build writes only the
   blocks not flagged;
2. pass 2: the preconditioner's curvature ``C`` ``(k, k)`` summed over blocks in a reduction tree
   (:func:`_curvature`), its regularization chosen, the Cholesky factor of ``C + lambda I``
   stored (``C`` where that is indefinite) and the effective dimension recorded.

The helpers here (the regularization rule, the GGN's estimate, the trial on the first batch,
the effective dimension) are what the build records; the queries live in
:mod:`.gradient_index`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dask.base import tokenize
from torch import nn

from .. import progress as _progress
from ..core.projection import KroneckerProjection
from ..errors import StoreError
from ..mapping.clients import dask_client
from ..mapping.literals import Literal, broadcast_large, unbox
from ..mapping.plan import ranges_from_sizes
from ..mapping.sources import as_source
from ..mapping.tasks import pick
from ..storage import lock as zlock
from ..storage import store as zstore
from ..storage.index_info import suggested_dim
from . import factored, inputs, layout, memory_check, runner, tasks
from .projector import LEADING_ROOTS_MAX_OUTPUTS, Projector


@dataclass
class Built:
    """What :func:`write_index` did: the projector of the index at ``path``, the block sizes, the
    blocks written in this call, and the verification report of a resumed index (or ``None``)."""

    projector: Projector
    path: str
    sizes: tuple[int, ...]
    written: int
    report: Any


def write_index(
    model: nn.Module,
    task: Any,
    train: Any,
    path: str | os.PathLike,
    *,
    projection_dim: int,
    projection: str,
    seed: int,
    dtype: str,
    preconditioner: str,
    curvature: str,
    regularization: float | str,
    ggn_draws: int | str | None,
    train_block_size: int | None,
    layers: list[str] | None,
    storage: str,
    factor_rank: int | None,
    resume: bool,
    overwrite: bool,
    verify: bool | str,
    break_lock: bool,
    client: Any,
    n_workers: int | None,
    progress: bool | None,
    memory_budget: int | None,
) -> Built:
    """Build (or resume) the index at ``path``: the arguments of
    :meth:`~.gradient_index.GradientIndex.build`, checked there (see its docstring)."""
    verify_mode = zstore.verify_mode(verify)
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
    first = load_block(source, 0)
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
        keys, fused = [], {}
        # the GGN (one forward per sample for both) and the empirical Fisher (the gradients squared as they are
        # written) are summed in the gradients' pass, with the dense storage
        ggn = preconditioner == "curvature" and curvature == "ggn"
        one_pass = (ggn or preconditioner == "fisher") and rank is None
        sampled = record["ggn_estimate"] if isinstance(record["ggn_estimate"], dict) else None
        for j in map(int, np.nonzero(~done)[0]):
            keys.append((f"index-{token}", j))
            block = source.block_task(j)
            if one_pass:
                fused[j] = (f"indexpass-{token}", j)
                dsk[fused[j]] = (
                    (
                        tasks.write_projected_with_ggn,
                        proj_key,
                        block,
                        path,
                        j,
                        ranges[j],
                        sizes[j] / sum(sizes),
                        sampled,
                    )
                    if ggn
                    else (tasks.write_projected_with_gram, proj_key, block, path, j, ranges[j], dtype)
                )
                dsk[keys[-1]] = (pick, fused[j], 0)
            else:
                dsk[keys[-1]] = (tasks.write_projected, proj_key, block, path, j, ranges[j], rank)
        gpu = projector.device.type == "cuda"
        passes = 1 if preconditioner == "none" or one_pass else 2
        with _progress.reporting(progress) as reporter, dask_client(client, n_workers) as active:
            if active != runner.SYNC:  # a large projector is sent once for both passes, not per pass
                dsk = broadcast_large(active, dsk)
            todo = {key: sizes[key[1]] for key in keys}
            if not one_pass:
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
                title = (
                    f"Index build: one pass (projected gradients, dim {projector.dim:,}, and the "
                    f"{'GGN' if ggn else 'empirical Fisher'})"
                    if one_pass
                    else f"Index build: pass 2 of 2 ({what})"
                )
                summing = None if preconditioner == "none" else reporter.meter(title, sum(sizes), "samples", force=True)
                curv = _curvature(active, dsk, proj_key, source, path, record, ranges, gpu, summing, fused, keys)
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
            raise StoreError(f"The index {path!r} is missing blocks after its build; run the build again to resume.")
        if rank is not None:
            layout.update(group, factor_dropped=layout.factor_dropped(path, group))
        layout.update(group, complete=True, completed=layout.now(), blocks_written=len(keys))
    return Built(projector, path, sizes, len(keys), report)


FAN_IN = memory_check.FAN_IN
"""Curvature sums one reduce task adds at once (the memory estimate counts as many)."""


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


def warn_small_k(attributes: dict) -> None:
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


def check_regularization(value: Any) -> None:
    """Refuse a ``regularization`` that is neither ``"auto"`` nor a number ``>= 0``."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"regularization must be a number >= 0 or 'auto'; got {value!r}.")


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


def check_draws(value: Any) -> None:
    """Refuse a ``ggn_draws`` that is neither ``"auto"``, ``None`` nor an int ``>= 0``."""
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


def load_block(source: Any, j: int) -> Any:
    """Block ``j`` of ``source`` loaded in this process (a batch of numpy arrays)."""
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
    fused: dict[int, tuple] | None = None,
    written: list | None = None,
) -> np.ndarray:
    """The preconditioner's undamped curvature ``C`` ``(k, k)``: a reduction tree over blocks.

    ``fused``: the blocks whose part the gradients' pass computes (:func:`tasks.write_projected_with_ggn` or
    :func:`tasks.write_projected_with_gram`, its key per block), computed here with the reduction and the
    ``written`` keys (their flags)."""
    kind, n, k = record["preconditioner"], record["n_train"], record["dim"]
    if kind == "none":
        return np.eye(k)
    fused, written = fused or {}, written or []
    token = tokenize(record["model_checksum"], record["projection"], kind, path)
    leaves: list[tuple] = []
    for j, rows in enumerate(ranges):
        leaves.append((f"ixcurv-{token}", j))
        if j in fused:
            dsk[leaves[-1]] = (pick, fused[j], 1)
        elif kind == "fisher":
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
    total = runner.run(client, dsk, keys + written, gpu=gpu and kind == "curvature", meter=meter, counts=counts)[0]
    total = np.asarray(total, dtype=np.float64)
    if kind == "fisher":
        total = total / n
    return (total + total.T) / 2
