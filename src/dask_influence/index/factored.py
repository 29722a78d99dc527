"""Factored storage of a Kronecker-projected gradient index (LoGra / LoRIF style).

With ``projection="kronecker"`` layer ``l``'s projected gradient of a sample is the
``(k_o, k_i)`` matrix ``M = sum_t u_t v_t^T``, ``u_t = P_out g_t`` ``(k_o,)`` and
``v_t = P_in a_t`` ``(k_i,)`` over the sample's ``T`` positions (``T = 1`` for a classifier,
the sequence length for a language model): its rank is at most ``min(T, k_o, k_i)``. A
factored index stores ``r`` pairs ``(u, v)`` per sample and layer, ``r (k_o + k_i)`` numbers
instead of ``k_o k_i``:

- ``factor_rank=None`` (exact): the positions' own pairs (positions whose ``u`` or ``v`` is
  zero, the padding and the unpredicted last position of a causal LM, dropped first), or,
  where a layer has more positions than ``min(k_o, k_i)``, its SVD to that rank (exact to
  rounding);
- ``factor_rank=r``: the best rank-``r`` part of ``M`` (Eckart-Young) from an SVD: of the
  ``(T, T)`` core ``R_u R_v^T`` of the QR factors of ``U^T`` and ``V^T`` where ``T`` is below
  ``min(k_o, k_i)`` (``M`` is never formed), else of ``M`` itself; the squared singular values
  left out are counted (:func:`factorize` returns them per sample).

Each pair is scaled to ``|u| = |v|`` (``sqrt`` of the singular value on each side) so that
float16 keeps the relative precision of both. :func:`densify` turns a chunk's factors back
into the ``(n, k)`` rows of the dense index (row-major ``(k_o, k_i)`` per layer, as
:meth:`~dask_influence.core.projection.KroneckerProjection.project_layer` lays them out).

On disk (:mod:`.layout`): ``factors_out`` ``(n, r, sum k_o)`` and ``factors_in``
``(n, r, sum k_i)`` in the index dtype, chunked by train block, and ``factors_dropped``
``(n_blocks, 2)`` float64 (per block the squared Frobenius norm left out and the total).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..storage.index_verify import FACTORED_ARRAYS as ARRAYS  # noqa: F401  (the arrays, per train block)

STORAGES = ("dense", "factored")


def offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each layer's columns (and the total at the end)."""
    out = [0]
    for size in sizes:
        out.append(out[-1] + int(size))
    return out


def exact_rank(layer_dims: Sequence[Sequence[int]], positions: Sequence[int]) -> int:
    """The rank that stores every layer exactly: ``max_l min(T_l, k_o, k_i)`` (``T_l`` the
    layer's positions per sample)."""
    return max(1, max(min(int(t), int(ko), int(ki)) for (ko, ki), t in zip(layer_dims, positions)))


def dense_dim(layer_dims: Sequence[tuple[int, int]]) -> int:
    """``k = sum_l k_o k_i``."""
    return sum(int(ko) * int(ki) for ko, ki in layer_dims)


def factored_numbers(layer_dims: Sequence[tuple[int, int]], rank: int) -> int:
    """Numbers stored per sample: ``r sum_l (k_o + k_i)``."""
    return int(rank) * sum(int(ko) + int(ki) for ko, ki in layer_dims)


def _balance(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(s u, v / s)`` with ``s = sqrt(|v| / |u|)`` per pair (``|s u| = |v / s|``); zero pairs stay zero."""
    nu, nv = u.norm(dim=-1, keepdim=True), v.norm(dim=-1, keepdim=True)
    both = (nu > 0) & (nv > 0)
    s = torch.where(both, (nv / torch.where(both, nu, torch.ones_like(nu))).sqrt(), torch.zeros_like(nu))
    return u * s, torch.where(both, v / torch.where(both, s, torch.ones_like(s)), torch.zeros_like(v))


def _pad(x: Tensor, rank: int) -> Tensor:
    """``x`` ``(n, m, d)`` cut or zero-padded to ``(n, rank, d)``."""
    if x.shape[1] >= rank:
        return x[:, :rank]
    return torch.cat([x, x.new_zeros(x.shape[0], rank - x.shape[1], x.shape[2])], dim=1)


def layer_factors(u: Tensor, v: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rank-``rank`` factors of ``M_n = sum_t u_nt v_nt^T`` for each sample ``n``.

    Args:
        u: ``(n, T, k_o)``: ``P_out g_t`` per position.
        v: ``(n, T, k_i)``: ``P_in a_t`` per position.
        rank: ``r``, the pairs kept.

    Returns:
        ``(u_r (n, r, k_o), v_r (n, r, k_i), dropped (n,), total (n,))`` float64 norms:
        ``sum_r u_r v_r^T`` is ``M`` (samples with at most ``r`` positions whose ``u`` and ``v``
        are both nonzero: their own pairs) or its best rank-``r`` part (an SVD), ``dropped``
        ``||M - sum_r u_r v_r^T||_F^2`` (0 for the positions' own pairs) and ``total``
        ``||M||_F^2``; ``u_r``, ``v_r`` in the dtype of ``u``.
    """
    n, t, ko = u.shape
    ki = v.shape[2]
    dtype = u.dtype
    out_u, out_v = u.new_zeros(n, rank, ko), u.new_zeros(n, rank, ki)
    dropped = torch.zeros(n, dtype=torch.float64, device=u.device)
    total = torch.zeros(n, dtype=torch.float64, device=u.device)
    if n == 0:
        return out_u, out_v, dropped, total
    active = (u.abs().amax(-1) > 0) & (v.abs().amax(-1) > 0)  # (n, T): padding positions masked out
    counts = active.sum(1)
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)  # active positions first, in order
    m = max(int(counts.max()), 1)
    keep = torch.gather(active, 1, order[:, :m]).unsqueeze(-1).to(dtype)
    cu = torch.gather(u, 1, order[:, :m, None].expand(n, m, ko)) * keep  # (n, m, k_o)
    cv = torch.gather(v, 1, order[:, :m, None].expand(n, m, ki)) * keep
    own = counts <= rank
    if bool(own.any()):
        a, b = cu[own].double(), cv[own].double()
        total[own] = ((a @ a.transpose(1, 2)) * (b @ b.transpose(1, 2))).sum((1, 2))
        bu, bv = _balance(cu[own], cv[own])
        out_u[own], out_v[own] = _pad(bu, rank), _pad(bv, rank)
    if not bool(own.all()):
        rest = ~own
        a, b = cu[rest].double(), cv[rest].double()  # (n', m, k_o), (n', m, k_i)
        if m < min(ko, ki):  # the (m, m) core of the QR factors: M is never formed
            qa, ra = torch.linalg.qr(a.transpose(1, 2))  # (n', k_o, m), (n', m, m)
            qb, rb = torch.linalg.qr(b.transpose(1, 2))
            w, s, zh = torch.linalg.svd(ra @ rb.transpose(1, 2))
            left, right = qa @ w, qb @ zh.transpose(1, 2)  # (n', k_o, m), (n', k_i, m)
        else:
            left, s, zh = torch.linalg.svd(a.transpose(1, 2) @ b, full_matrices=False)  # M (n', k_o, k_i)
            right = zh.transpose(1, 2)
        kept = min(rank, s.shape[1])
        root = s[:, :kept].clamp_min(0).sqrt()
        out_u[rest] = _pad((left[:, :, :kept] * root[:, None]).transpose(1, 2), rank).to(dtype)
        out_v[rest] = _pad((right[:, :, :kept] * root[:, None]).transpose(1, 2), rank).to(dtype)
        total[rest] = (s * s).sum(1)
        dropped[rest] = (s[:, kept:] ** 2).sum(1)
    return out_u, out_v, dropped, total


def factorize(pieces: Sequence[tuple[Tensor, Tensor]], rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every layer's factors side by side.

    Args:
        pieces: per layer ``(u (n, T_l, k_o), v (n, T_l, k_i))`` (:func:`layer_factors`).
        rank: ``r``.

    Returns:
        ``(factors_out (n, r, sum k_o), factors_in (n, r, sum k_i), dropped (n,), total (n,))``:
        the squared Frobenius norms summed over the layers.
    """
    parts = [layer_factors(u, v, rank) for u, v in pieces]
    dropped = torch.stack([p[2] for p in parts]).sum(0)
    total = torch.stack([p[3] for p in parts]).sum(0)
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2), dropped, total


def densify(
    factors_out: np.ndarray, factors_in: np.ndarray, layer_dims: Sequence[tuple[int, int]], dtype: Any = np.float32
) -> np.ndarray:
    """The dense rows ``(n, k)`` of factors ``(n, r, sum k_o)`` and ``(n, r, sum k_i)``: per layer
    ``sum_r u_r v_r^T`` flattened row-major, the layers side by side (the layout of the dense
    index). Computed in ``dtype`` (float32 for float16 factors; float64 when asked)."""
    dtype = np.dtype(dtype)
    work = np.float64 if dtype == np.float64 else np.float32
    fo = torch.from_numpy(np.asarray(factors_out, dtype=work))
    fi = torch.from_numpy(np.asarray(factors_in, dtype=work))
    n = fo.shape[0]
    ko_at = offsets([ko for ko, _ in layer_dims])
    ki_at = offsets([ki for _, ki in layer_dims])
    out = torch.empty(n, dense_dim(layer_dims), dtype=fo.dtype)
    at = 0
    for index, (ko, ki) in enumerate(layer_dims):
        u = fo[:, :, ko_at[index] : ko_at[index + 1]]
        v = fi[:, :, ki_at[index] : ki_at[index + 1]]
        out[:, at : at + ko * ki] = torch.bmm(u.transpose(1, 2), v).reshape(n, ko * ki)
        at += ko * ki
    return out.numpy().astype(dtype, copy=False)


def check_storage(storage: str, factor_rank: int | None, projection: Any) -> None:
    """Refuse a storage that cannot be built, in one line naming the fix."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be 'dense' or 'factored'; got {storage!r}.")
    if factor_rank is not None and (
        isinstance(factor_rank, bool) or not isinstance(factor_rank, int) or factor_rank < 1
    ):
        raise ValueError(f"factor_rank must be None (exact) or a positive int; got {factor_rank!r}.")
    if storage == "dense" and factor_rank is not None:
        raise ValueError(f"factor_rank={factor_rank} applies to storage='factored' only; pass storage='factored'.")
    kind = projection.get("kind") if isinstance(projection, dict) else projection
    if storage == "factored" and kind != "kronecker":
        raise ValueError(
            f"storage='factored' stores each layer's Kronecker-projected gradient as low-rank factors and needs "
            f"projection='kronecker'; got projection={kind!r}. Pass projection='kronecker' or storage='dense'."
        )
