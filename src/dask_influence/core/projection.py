"""Seeded random projections of per-sample gradients, ``(n, p) -> (n, k)``.

A projection ``P`` ``(k, p)`` is never stored: every worker regenerates the same one from its
seed, in pieces of ``PIECE`` parameter coordinates (the numbers depend only on the seed, the
piece and the sizes; never on the device, the model dtype or the worker). Kinds:

- ``"sjlt"``: a sparse Johnson-Lindenstrauss transform (count sketch): coordinate ``i`` is
  added with a random sign to one random output ``h(i)``. ``E[<Px, Py>] = <x, y>``; applying
  it costs ``O(n p)`` and its description ``O(p)`` memory: the default for any ``p``.
- ``"gaussian"``: i.i.d. ``N(0, 1/k)`` entries, generated piece by piece (``O(n p k)``).
- ``"orthogonal"``: ``k <= p`` orthonormal rows (a QR of a Gaussian matrix): with ``k = p``
  an exact rotation, which makes the index reproduce the exact solvers (tests, validation).
  Dense: for small ``p`` only.
- ``"kronecker"``: per Linear / Conv2d / Conv1D / Embedding layer with weight matrix
  ``(o, i)``, ``P_l = P_out ⊗ P_in`` with Gaussian factors ``(k_o, o)`` and ``(k_i, i)``: the
  layer's gradient ``sum_t g_t a_t^T`` projects as ``sum_t (P_out g_t)(P_in a_t)^T``, from the
  layer's output gradients and inputs, so no per-sample gradient is ever formed
  (:class:`KroneckerProjection`; the rest of the parameters are left out, as EK-FAC does).

``describe()`` is what an index records; :func:`from_record` rebuilds the projection.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

PIECE = 1 << 16
"""Parameter coordinates generated per piece."""

CACHE_ENTRIES = 1 << 25
"""A dense projection with at most this many entries is generated once per process and kept."""

SJLT_CACHE_PARAMS = 1 << 28
"""A count sketch of at most this many parameter coordinates keeps its hashes once generated
(:data:`SJLT_CACHE_BYTES` per coordinate: an int32 bucket and an int8 sign; GPT-2-small's 124M
parameters: 619 MB per process). Regenerating them cost as much as the projection itself for
each chunk of a 124M-parameter model (0.4 ms of draws against 0.2 ms of ``index_add_`` per
piece of 65,536 coordinates and 2 samples)."""
SJLT_CACHE_BYTES = 5

KINDS = ("sjlt", "gaussian", "orthogonal", "kronecker")


def _generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``parts`` (stable across processes and machines)."""
    digest = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def _pieces(p: int) -> list[tuple[int, int]]:
    return [(a, min(a + PIECE, p)) for a in range(0, p, PIECE)]


class Projection:
    """A seeded ``(k, p)`` projection of flat per-sample gradients.

    Args:
        num_params: ``p``, the length of the flat gradient.
        dim: ``k``, the projected dimension.
        seed: any int; the same seed gives the same projection everywhere.
    """

    kind: ClassVar[str] = ""

    def __init__(self, num_params: int, dim: int, seed: int):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"projection_dim must be a positive int; got {dim!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}.")
        self.num_params, self.dim, self.seed = int(num_params), int(dim), int(seed)
        self._cache: dict[Any, Any] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}  # regenerated where it is used
        return state

    def describe(self) -> dict[str, Any]:
        """Plain values that rebuild the projection (:func:`from_record`)."""
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "num_params": self.num_params}

    def project(self, grads: Tensor) -> Tensor:
        """``grads @ P^T``: ``(n, p) -> (n, k)`` in the dtype of ``grads``."""
        raise NotImplementedError

    def columns(self, start: int, stop: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Rows ``start:stop`` of ``P``, transposed: ``(p, stop - start)``."""
        raise NotImplementedError

    def _check(self, grads: Tensor) -> None:
        if grads.ndim != 2 or grads.shape[1] != self.num_params:
            raise ValueError(f"expected gradients of shape (n, {self.num_params}); got {tuple(grads.shape)}.")


class SparseProjection(Projection):
    """Count sketch: ``(P x)_r = sum_{i: h(i) = r} s(i) x_i`` with random ``h(i)`` and ``s(i) = ±1``."""

    kind = "sjlt"

    def _piece(self, index: int, a: int, b: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Piece ``index``'s buckets ``(b - a,)`` int64 and signs ``(b - a,)`` int8 on ``device``
        (kept as int32 and int8 for models up to :data:`SJLT_CACHE_PARAMS`; ``index_add_`` takes
        int64 indices: int32 ones were 15x slower here)."""
        key = ("piece", index, str(device))
        if key not in self._cache:
            gen = _generator(self.seed, "sjlt", self.dim, index)
            buckets = torch.randint(0, self.dim, (b - a,), generator=gen)
            signs = torch.randint(0, 2, (b - a,), generator=gen).to(torch.int8) * 2 - 1
            if self.num_params > SJLT_CACHE_PARAMS:
                return buckets.to(device), signs.to(device)
            self._cache[key] = (buckets.to(device=device, dtype=torch.int32), signs.to(device))
        buckets, signs = self._cache[key]
        return buckets.long(), signs

    def project(self, grads: Tensor) -> Tensor:
        """``grads @ P^T``: ``(n, p) -> (n, k)``."""
        self._check(grads)
        out = torch.zeros(grads.shape[0], self.dim, dtype=grads.dtype, device=grads.device)
        for index, (a, b) in enumerate(_pieces(self.num_params)):
            buckets, signs = self._piece(index, a, b, grads.device)
            out.index_add_(1, buckets, grads[:, a:b] * signs.to(grads.dtype))
        return out

    def columns(self, start: int, stop: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Rows ``start:stop`` of ``P``, transposed: ``(p, stop - start)``."""
        out = torch.zeros(self.num_params, stop - start, dtype=dtype, device=device)
        for index, (a, b) in enumerate(_pieces(self.num_params)):
            buckets, signs = self._piece(index, a, b, device)
            rows = torch.nonzero((buckets >= start) & (buckets < stop)).squeeze(1)
            out[a + rows, buckets[rows] - start] = signs[rows].to(dtype)
        return out


class GaussianProjection(Projection):
    """I.i.d. ``N(0, 1/k)`` entries, generated in float32 piece by piece (cast to the gradients' dtype)."""

    kind = "gaussian"

    def _piece(self, index: int, a: int, b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = ("piece", index, dtype, str(device))
        if key in self._cache:
            return self._cache[key]
        gen = _generator(self.seed, "gaussian", self.dim, index)
        piece = (torch.randn(b - a, self.dim, generator=gen) / math.sqrt(self.dim)).to(dtype=dtype, device=device)
        if self.num_params * self.dim <= CACHE_ENTRIES:
            self._cache[key] = piece
        return piece

    def project(self, grads: Tensor) -> Tensor:
        """``grads @ P^T``: ``(n, p) -> (n, k)``."""
        self._check(grads)
        out = torch.zeros(grads.shape[0], self.dim, dtype=grads.dtype, device=grads.device)
        for index, (a, b) in enumerate(_pieces(self.num_params)):
            out += grads[:, a:b] @ self._piece(index, a, b, grads.dtype, grads.device)
        return out

    def columns(self, start: int, stop: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Rows ``start:stop`` of ``P``, transposed: ``(p, stop - start)``."""
        return torch.cat(
            [self._piece(i, a, b, dtype, device)[:, start:stop] for i, (a, b) in enumerate(_pieces(self.num_params))]
        )


class OrthogonalProjection(Projection):
    """``k <= p`` orthonormal rows: ``Q^T`` of the QR of a ``(p, k)`` Gaussian matrix (in float64)."""

    kind = "orthogonal"
    MAX_ENTRIES: ClassVar[int] = 1 << 26

    def __init__(self, num_params: int, dim: int, seed: int):
        super().__init__(num_params, dim, seed)
        if self.dim > self.num_params:
            raise ValueError(
                f"An orthogonal projection has at most p = {self.num_params} rows; got projection_dim={dim}. "
                "Use projection='sjlt' or a smaller projection_dim."
            )
        if self.dim * self.num_params > self.MAX_ENTRIES:
            raise ValueError(
                f"An orthogonal projection is dense: {self.dim} x {self.num_params} entries is too many; "
                "use projection='sjlt' (the default) or 'kronecker'."
            )

    def _q(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = ("q", dtype, str(device))
        if key not in self._cache:
            gen = _generator(self.seed, "orthogonal", self.dim)
            q, r = torch.linalg.qr(torch.randn(self.num_params, self.dim, generator=gen).double())
            q = q * torch.sign(torch.diagonal(r))  # a unique Q whatever the LAPACK's sign choices
            self._cache[key] = q.to(dtype=dtype, device=device)
        return self._cache[key]

    def project(self, grads: Tensor) -> Tensor:
        """``grads @ Q``: ``(n, p) -> (n, k)``."""
        self._check(grads)
        return grads @ self._q(grads.dtype, grads.device)

    def columns(self, start: int, stop: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Columns ``start:stop`` of ``Q``: ``(p, stop - start)``."""
        return self._q(dtype, device)[:, start:stop]


class KroneckerProjection(Projection):
    """Per layer ``P_out ⊗ P_in`` (Gaussian factors, ``N(0, 1/k_o)`` and ``N(0, 1/k_i)``).

    Args:
        layers: per layer ``(name, o, i)``, ``(o, i)`` the shape of its parameter matrix
            (weight columns and a bias column; see :class:`~.kronecker.KroneckerLayer`).
        dim: the total ``k`` asked for; each layer gets a share proportional to ``o * i``,
            as ``k_o * k_i`` with ``k_o / k_i`` close to ``o / i``. The real total is
            :attr:`dim` after construction (at least one per layer).
        layer_dims: the ``(k_o, k_i)`` per layer instead (a recorded projection).
    """

    kind = "kronecker"

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int,
        layers: list[tuple[str, int, int]],
        layer_dims: list[tuple[int, int]] | None = None,
    ):
        super().__init__(num_params, dim, seed)
        if not layers:
            raise ValueError(
                "projection='kronecker' needs Linear, Conv2d, Conv1D or Embedding layers with trainable "
                "weights; this model has none. Use projection='sjlt'."
            )
        self.layers = [(str(name), int(o), int(i)) for name, o, i in layers]
        self.layer_dims = [tuple(map(int, d)) for d in layer_dims] if layer_dims else self._split(dim)
        self.dim = sum(ko * ki for ko, ki in self.layer_dims)

    def _split(self, dim: int) -> list[tuple[int, int]]:
        sizes = [o * i for _, o, i in self.layers]
        total = sum(sizes)
        dims = []
        for (_, o, i), size in zip(self.layers, sizes):
            share = max(1.0, dim * size / total)
            ko = min(o, max(1, round(math.sqrt(share * o / i))))
            ki = min(i, max(1, round(share / ko)))
            dims.append((ko, ki))
        return dims

    def describe(self) -> dict[str, Any]:
        """The base description plus the layers and their ``(k_o, k_i)``."""
        return {
            **super().describe(),
            "layers": [list(layer) for layer in self.layers],
            "layer_dims": [list(d) for d in self.layer_dims],
        }

    def factors(self, index: int, *, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(P_out (k_o, o), P_in (k_i, i))`` of layer ``index``."""
        key = ("layer", index, dtype, str(device))
        if key not in self._cache:
            name, o, i = self.layers[index]
            ko, ki = self.layer_dims[index]
            gen = _generator(self.seed, "kronecker", name, o, i, ko, ki)
            p_out = torch.randn(ko, o, generator=gen) / math.sqrt(ko)
            p_in = torch.randn(ki, i, generator=gen) / math.sqrt(ki)
            self._cache[key] = (p_out.to(dtype=dtype, device=device), p_in.to(dtype=dtype, device=device))
        return self._cache[key]

    def offsets(self) -> list[int]:
        """Start of each layer's block in the projected vector (and the total at the end)."""
        out = [0]
        for ko, ki in self.layer_dims:
            out.append(out[-1] + ko * ki)
        return out

    def project_layer(self, index: int, g: Tensor, a: Tensor) -> Tensor:
        """Projected per-sample gradients of layer ``index`` from its output gradients ``g``
        ``(n, T, o)`` and inputs ``a`` ``(n, T, i)``: ``(n, k_o * k_i)``, row-major ``(k_o, k_i)``."""
        p_out, p_in = self.factors(index, dtype=g.dtype, device=g.device)
        return torch.einsum("nto,nti->noi", g @ p_out.T, a @ p_in.T).reshape(g.shape[0], -1)

    def project(self, grads: Tensor) -> Tensor:
        """Refused: see :meth:`project_layer`."""
        raise TypeError(
            "A Kronecker projection projects layer inputs and output gradients (project_layer), "
            "not flat gradients; the index's projector does this."
        )

    def layer_columns(self, index: int, start: int, stop: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Rows ``start:stop`` of layer ``index``'s block ``P_out ⊗ P_in`` as matrices ``(c, o, i)``."""
        p_out, p_in = self.factors(index, dtype=dtype, device=device)
        ki = p_in.shape[0]
        rows = torch.arange(start, stop, device=device)
        return p_out[rows // ki].unsqueeze(2) * p_in[rows % ki].unsqueeze(1)


def from_record(record: dict[str, Any]) -> Projection:
    """The projection described by ``record`` (:meth:`Projection.describe`)."""
    kind = record.get("kind")
    args = (int(record["num_params"]), int(record["dim"]), int(record["seed"]))
    if kind == "sjlt":
        return SparseProjection(*args)
    if kind == "gaussian":
        return GaussianProjection(*args)
    if kind == "orthogonal":
        return OrthogonalProjection(*args)
    if kind == "kronecker":
        layers = [(str(n), int(o), int(i)) for n, o, i in record["layers"]]
        dims = [(int(a), int(b)) for a, b in record["layer_dims"]]
        return KroneckerProjection(*args, layers=layers, layer_dims=dims)
    raise ValueError(f"projection must be one of {', '.join(KINDS)}; got {kind!r}.")
