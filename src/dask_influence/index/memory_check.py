"""The gradient index's memory per worker, known before anything is written (issue 29 item 2).

:func:`build_estimate` sums what one worker holds for one training block of ``b`` samples: the
projected gradients ``(b, k)`` and their NumPy copy, one chunk's per-sample gradients
``(chunk, p)`` (or, for the Kronecker projection, a chunk's forward and backward), a dense
projection ``(p, k)`` where there is one, and in the curvature pass the ``(k, k)`` float64 sums of
:data:`~.build.FAN_IN` blocks with their total, plus the block's output-curvature roots
(``(r, b, c)`` for ``c`` outputs per sample: ``r = c`` exact roots, ``d`` sampled ones) or the
curvature-vector products of :data:`~.projector.CURVATURE_COLUMNS` columns.
A factored index (``storage="factored"``) holds a block's factors ``(b, r, sum k_o + k_i)`` and
their copy instead of its ``(b, k)`` gradients, plus, where a sample has more positions than
``r``, one chunk's largest layer ``(chunk, k_o, k_i)`` float64 three times for its SVD; its
queries an index block's factors beside the densified rows.
:func:`query_estimate` sums a query's: the ``(k, k)`` Cholesky factor, a test block's projected
gradients and factors ``(n, k)``, one chunk's per-sample gradients, an index block's gradients
``(b, k)`` and the scores ``(n, b)``. :func:`check` refuses in one line, naming the largest piece,
its bytes, the budget and the fix (a smaller block, or more memory where one sample does not fit).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import batches, memory
from ..core.projection import (
    SJLT_CACHE_BYTES,
    SJLT_CACHE_PARAMS,
    KroneckerProjection,
    OrthogonalProjection,
    SparseProjection,
)
from .projector import CURVATURE_COLUMNS, Projector

FAN_IN = 8
"""Curvature sums one reduce task of a build adds at once (:func:`~.build._curvature`'s tree)."""


def _outputs_per_sample(projector: Projector, first: Any) -> int:
    """``c``: the model's outputs for one sample (0 without outputs)."""
    if not projector.task.has_outputs:
        return 0
    with torch.no_grad():
        outputs = projector.functions.outputs(projector.theta, batches.slice_rows(first, 0, 1))
    return int(outputs[0].numel())


def build_estimate(
    projector: Projector,
    first: Any,
    block: int,
    preconditioner: str,
    curvature: str | None,
    ggn: Any,
    factor_rank: int | None = None,
) -> memory.MemoryEstimate:
    """One worker's peak for a training block of ``block`` samples shaped as ``first`` (see the module;
    ``factor_rank``: the ``r`` of a factored index)."""
    p, k = projector.spec.num_params, projector.dim
    size = memory.itemsize(projector.dtype)
    chunk = min(projector.chunk_size, block)
    per = projector.functions.activation_bytes(projector.theta, first)
    if factor_rank is not None and isinstance(projector.projection, KroneckerProjection):
        dims = projector.projection.layer_dims
        width = sum(ko + ki for ko, ki in dims)
        largest = max(ko * ki for ko, ki in dims)
        pieces = [
            (
                f"the projected gradient factors of a block and their copy (2 x ({block:,}, {factor_rank}, {width:,}))",
                2 * block * factor_rank * width * size,
            )
        ]
        if max(projector.positions(first)) > factor_rank:  # more positions than pairs: an SVD per layer
            pieces.append(
                (f"a chunk's largest layer for its SVD (3 x ({chunk:,}, {largest:,}) float64)", 3 * chunk * largest * 8)
            )
    else:
        pieces = [(f"the projected gradients of a block and their copy (2 x ({block:,}, {k:,}))", 2 * block * k * size)]
    if isinstance(projector.projection, KroneckerProjection):
        pieces.append(
            (f"a chunk's forward and backward (2 x {chunk:,} samples x {memory.short(per)})", 2 * chunk * per)
        )
    else:
        pieces.append((f"a chunk's per-sample gradients ({chunk:,}, {p:,})", memory.matrix_bytes(chunk, p, size)))
    if isinstance(projector.projection, OrthogonalProjection):
        pieces.append((f"the dense orthogonal projection ({p:,}, {k:,})", memory.matrix_bytes(p, k, size + 8)))
    pieces += _sketch_cache(projector)
    if preconditioner != "none":
        pieces.append((f"the curvature sums ({FAN_IN + 1} x ({k:,}, {k:,}) float64)", (FAN_IN + 1) * k * k * 8))
    if preconditioner == "curvature":  # the empirical Fisher sums the stored gradients: no second pass
        c = _outputs_per_sample(projector, first)
        kind = ggn.get("kind") if isinstance(ggn, dict) else ggn
        # with the loss gradients in the outputs beside them (one pass: Projector.gradients_and_ggn)
        if curvature == "ggn" and kind == "sampled":
            d = int(ggn["draws"])
            pieces.append(
                (
                    f"the sampled output-curvature roots and the loss's ({d} + 1 x {block:,} x {c:,})",
                    memory.matrix_bytes((d + 1) * block, c, size),
                )
            )
        elif curvature == "ggn" and 0 < c <= k:
            pieces.append(
                (
                    f"the exact output-curvature roots and the loss's ({c:,} + 1 x {block:,} x {c:,})",
                    memory.matrix_bytes((c + 1) * block, c, size),
                )
            )
        else:
            cols = min(CURVATURE_COLUMNS, k)
            pieces.append((f"the projection's columns and their product (2 x ({p:,}, {cols}))", 2 * p * cols * size))
            pieces.append(
                (
                    f"{memory.PRODUCT_PIECE} ({block:,} samples x {cols} vectors x {memory.PRODUCT_COPIES} x "
                    f"{memory.short(per)})",
                    memory.product_bytes(per, block, cols),
                )
            )
    return memory.MemoryEstimate.of(f"The index build (per worker, a block of {block:,})", pieces)


def _sketch_cache(projector: Projector) -> list[tuple[str, int]]:
    """The count sketch's hashes, kept per process for models up to ``SJLT_CACHE_PARAMS``."""
    p = projector.spec.num_params
    if not isinstance(projector.projection, SparseProjection) or p > SJLT_CACHE_PARAMS:
        return []
    return [(f"the count sketch's kept hashes ({p:,} x {SJLT_CACHE_BYTES} bytes)", p * SJLT_CACHE_BYTES)]


def query_estimate(
    projector: Projector, first: Any, test_block: int, train_block: int, factor_numbers: int = 0
) -> memory.MemoryEstimate:
    """One worker's peak in a query: a test block of ``test_block`` points against an index block of
    ``train_block`` (see the module; ``factor_numbers``: a factored index's ``r sum_l (k_o + k_i)``
    stored per point, read beside the densified rows)."""
    p, k = projector.spec.num_params, projector.dim
    size = memory.itemsize(projector.dtype)
    chunk = min(projector.chunk_size, test_block)
    if isinstance(projector.projection, KroneckerProjection):
        per = projector.functions.activation_bytes(projector.theta, first)
        grads = (f"a chunk's forward and backward (2 x {chunk:,} samples x {memory.short(per)})", 2 * chunk * per)
    else:
        grads = (f"a chunk's per-sample gradients ({chunk:,}, {p:,})", memory.matrix_bytes(chunk, p, size))
    pieces = [
        (f"the Cholesky factor ({k:,}, {k:,}) float64", k * k * 8),
        (
            f"a test block's projected gradients and factors ({test_block:,}, {k:,})",
            memory.matrix_bytes(test_block, k, size + 8),
        ),
        grads,
        (f"an index block's gradients ({train_block:,}, {k:,}) and their cast", memory.matrix_bytes(train_block, k, 8)),
        (f"the scores ({test_block:,}, {train_block:,})", memory.matrix_bytes(test_block, train_block, 8)),
    ]
    pieces += _sketch_cache(projector)
    if factor_numbers:
        pieces.append(
            (
                f"an index block's factors ({train_block:,}, {factor_numbers:,}) and their cast",
                memory.matrix_bytes(train_block, factor_numbers, 8),
            )
        )
    return memory.MemoryEstimate.of(f"The index query (per worker, a test block of {test_block:,})", pieces)


def check(
    estimate: memory.MemoryEstimate, one: memory.MemoryEstimate, budget: int | None, device: Any, knob: str
) -> None:
    """A one-line ``ValueError`` when ``estimate`` exceeds the budget (``None``: half the machine's
    memory): the fix is a smaller ``knob`` (a block size) when ``one`` (the same for one sample)
    fits, else a larger ``memory_budget``."""
    limit = memory.budget_of(budget, torch.device(device))
    if one.total > limit:
        one.check(limit, "Even one sample does not fit: pass a larger memory_budget, or a smaller projection_dim.")
    estimate.check(
        limit, f"Pass a smaller {knob} (one sample needs {memory.readable(one.total)}), or a larger memory_budget."
    )


def check_build(projector: Projector, first: Any, block: int, record: dict, budget: int | None) -> None:
    """:func:`check` of :func:`build_estimate` for the largest training block (``record``: the
    build's record, its ``preconditioner``, ``curvature`` and ``ggn_estimate``)."""
    rank = record.get("factor_rank") if record.get("storage") == "factored" else None
    args = (record["preconditioner"], record["curvature"], record["ggn_estimate"], rank)
    first = projector.batch(first)
    check(
        build_estimate(projector, first, block, *args),
        build_estimate(projector, first, 1, *args),
        budget,
        projector.device,
        "train_block_size",
    )


def check_query(projector: Projector, load_first: Any, test_sizes: Any, attributes: dict, budget: int | None) -> None:
    """:func:`check` of :func:`query_estimate` for the largest test block against the largest index
    block; ``load_first()`` gives the first test block (read only for the Kronecker projection)."""
    first = projector.batch(load_first()) if isinstance(projector.projection, KroneckerProjection) else None
    test_block = max(int(s) for s in test_sizes)
    train_block = max(int(s) for s in attributes["block_sizes"])
    numbers = 0
    if attributes.get("storage") == "factored":
        dims = attributes["projection"]["layer_dims"]
        numbers = int(attributes["factor_rank"]) * sum(int(ko) + int(ki) for ko, ki in dims)
    check(
        query_estimate(projector, first, test_block, train_block, numbers),
        query_estimate(projector, first, 1, train_block, numbers),
        budget,
        projector.device,
        "test_block_size",
    )
