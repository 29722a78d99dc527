"""Layer-by-layer scoring of EK-FAC's factors against training gradients kept factored.

:func:`up_scores` reads one layer's block of flat factor rows ``(t, p)`` in place (strided views, never a
copy of the block) and contracts it with the layer's per-sample gradients of a chunk of training points,
given as the captured ``(g, a)`` pair or already formed ``(m, o, i)`` (a tied LM head). For GPT-2-small the
factors of a test group are ``t x 124M`` floats; a copy of each layer's block in matrix layout (a
transposed ``Conv1D`` weight, a bias column appended) held another 69% of them during scoring.
:func:`column_parts` cuts a layer's columns into slabs, each with the layer narrowed to it, for factors read
from a store by columns (the calculator's one-pass scoring).
:func:`self_contract` is the training point's own quadratic form in the layer's eigenbasis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .factor_columns import slabs
from .kronecker import KroneckerLayer, LayerFactors, layer_grads


def up_scores(layer: KroneckerLayer, flat: Tensor, piece: tuple[Tensor, Tensor] | Tensor) -> Tensor:
    """``<flat_t, grad_j>`` over ``layer``'s parameters for every factor row ``t`` and point ``j``: ``(t, m)``.

    Args:
        layer: where the layer's weight and bias sit in the flat vector and how the weight is laid out.
        flat: factor rows ``(t, p)``; only the layer's slices are read, as views.
        piece: ``(g (m, P, o), a (m, P, i))`` (``a``'s last column the bias's 1 when the layer has one), or the
            per-sample gradients ``(m, o, i)`` in matrix layout (a tied LM head).

    With one position the training gradients stay factored (``t * max(o, i) * m`` numbers); with several,
    the chunk's per-sample weight gradients are formed in the flat vector's layout.
    """
    t = flat.shape[0]
    scores = flat.new_zeros(t, _points(piece))
    d_in = layer.d_in_weight
    if layer.weight:
        w = flat[:, layer.weight[0] : layer.weight[1]]  # (t, o * d_in) or (t, d_in * o): a strided view
        if isinstance(piece, Tensor):
            grads = piece[:, :, :d_in]
            grads = grads.transpose(1, 2) if layer.transposed else grads
            scores += w @ grads.reshape(grads.shape[0], -1).T
        else:
            g, a = piece
            a_w = a[..., :d_in]
            if a.shape[1] == 1:
                scores += _single_position(w, layer, g[:, 0], a_w[:, 0])
            else:
                grads = layer_grads(a_w, g) if layer.transposed else layer_grads(g, a_w)
                scores += w @ grads.reshape(grads.shape[0], -1).T
    if layer.bias:
        b = flat[:, layer.bias[0] : layer.bias[1]]  # (t, o)
        bias_grads = piece[:, :, -1] if isinstance(piece, Tensor) else piece[0].sum(1)
        scores += b @ bias_grads.T
    return scores


Piece = tuple[Tensor, Tensor] | Tensor


def column_parts(
    layer: KroneckerLayer, rows: int, itemsize: int
) -> Iterator[tuple[KroneckerLayer, tuple[int, int], Callable[[Piece], Piece]]]:
    """``layer``'s columns of the flat vector in slabs of whole stored rows (at most
    :data:`~.factor_columns.SLAB_BYTES` for ``rows`` factor rows of ``itemsize`` bytes; the bias apart).

    Yields ``(part, (start, stop), narrow)``: ``up_scores(part, slab, narrow(piece))``, with ``slab`` the
    factors' columns ``start:stop`` ``(rows, stop - start)``, is the slab's share of ``up_scores(layer, flat,
    piece)``. A weight stored ``(o, i)`` is cut along ``o`` (``g``'s last axis, a formed gradient's rows), one
    stored ``(i, o)`` (``Conv1D``, an embedding) along ``i`` (``a``'s, a formed gradient's columns)."""
    if layer.weight:
        w0, w1 = layer.weight
        row = layer.d_out if layer.transposed else layer.d_in_weight
        for a, b in slabs(w0, w1, rows, itemsize, step=row):
            r0, r1 = (a - w0) // row, (b - w0) // row
            if layer.transposed:
                part = dataclasses.replace(layer, weight=(0, b - a), bias=None, d_in_weight=r1 - r0)
                yield part, (a, b), functools.partial(_narrow, axis="in", r0=r0, r1=r1)
            else:
                part = dataclasses.replace(layer, weight=(0, b - a), bias=None, d_out=r1 - r0)
                yield part, (a, b), functools.partial(_narrow, axis="out", r0=r0, r1=r1)
    if layer.bias:
        b0, b1 = layer.bias
        yield dataclasses.replace(layer, weight=None, bias=(0, b1 - b0)), (b0, b1), _same


def _narrow(piece: Piece, *, axis: str, r0: int, r1: int) -> Piece:
    """``piece`` restricted to the output rows ``r0:r1`` (``axis="out"``) or the input columns (``"in"``)."""
    if isinstance(piece, Tensor):  # (m, o, i)
        return piece[:, r0:r1] if axis == "out" else piece[:, :, r0:r1]
    g, a = piece
    return (g[..., r0:r1], a) if axis == "out" else (g, a[..., r0:r1])


def _same(piece: Piece) -> Piece:
    return piece


def _points(piece: tuple[Tensor, Tensor] | Tensor) -> int:
    return (piece if isinstance(piece, Tensor) else piece[0]).shape[0]


def _single_position(w: Tensor, layer: KroneckerLayer, g: Tensor, a: Tensor) -> Tensor:
    """``sum_{o,i} W_t[o, i] g_j[o] a_j[i]`` for the weight rows ``w`` ``(t, n_w)``, ``g`` ``(m, o)``, ``a``
    ``(m, i)``: ``(t, m)``. A batched product over the factor rows as ``(t, o, i)`` (or ``(t, i, o)``) views."""
    t, m = w.shape[0], g.shape[0]
    if layer.transposed:  # stored (d_in, o): W_t^T g_j first, then the inputs
        rows = w.reshape(t, layer.d_in_weight, layer.d_out)
        return (torch.bmm(rows, g.T.unsqueeze(0).expand(t, -1, m)) * a.T).sum(1)
    rows = w.reshape(t, layer.d_out, layer.d_in_weight)
    return (torch.bmm(rows, a.T.unsqueeze(0).expand(t, -1, m)) * g.T).sum(1)


def self_contract(factors: LayerFactors, inverse_diag: Tensor, piece: tuple[Tensor, Tensor] | Tensor) -> Tensor:
    """``vec(grad)^T (C + lambda I)^-1 vec(grad)`` per sample: ``(m,)``; ``piece`` is
    ``(g (m, P, o), a (m, P, i))`` or the per-sample gradients ``(m, o, i)`` (a tied LM head).

    ``inverse_diag`` is ``1 / (eigenvalues + lambda)`` ``(o, i)``. With one position this is
    ``sum_{o,i} g_rot[o]^2 inverse_diag[o, i] a_rot[i]^2``, without forming ``(m, o, i)``.
    """
    if isinstance(piece, Tensor):
        return (factors.rotate(piece).square() * inverse_diag).sum((1, 2))
    g, a = piece
    if a.shape[1] == 1:
        g_rot = factors.rotate_outputs(g[:, 0])
        a_rot = factors.rotate_inputs(a[:, 0])
        return ((g_rot.square() @ inverse_diag) * a_rot.square()).sum(1)
    rotated = factors.rotate(layer_grads(g, a))
    return (rotated.square() * inverse_diag).sum((1, 2))
