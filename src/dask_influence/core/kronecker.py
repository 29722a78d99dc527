"""Kronecker-factored curvature of one layer: capture, factors, eigenbases, solves, contractions.

Conventions for one layer (``o = d_out``, ``i = d_in``):

- The layer's trainable parameters form a matrix ``M`` of shape ``(o, i)``: the weight as
  ``(d_out, d_in_weight)`` (a Conv2d kernel ``(C_out, C_in, kh, kw)`` is ``(C_out, C_in*kh*kw)``)
  with the bias appended as a last column when it is trainable. Two supported layers store
  their weight transposed, and ``M`` is the transpose of what they store: Hugging Face's
  ``Conv1D`` (GPT-2; ``y = x W + b`` with ``W`` stored ``(d_in, d_out)``) and
  ``nn.Embedding`` (``W`` stored ``(V, d)``, so ``M = W^T`` is ``(d, V)``; no bias).
- A sample enters the layer at ``P`` positions (1 for a plain linear layer, the sequence
  length or the number of convolution patches otherwise). At position ``t`` it has the
  input ``a_t`` ``(i,)`` (a trailing 1 for the bias column) and the output gradient ``g_t``
  ``(o,)``; its gradient in ``M`` is ``sum_t g_t a_t^T``.
- An embedding's input at a position is the one-hot ``(V,)`` of the token id there (all
  zeros for ``padding_idx``, whose row torch never updates), so its ``A`` is DIAGONAL (the
  token frequencies): it is kept as a vector, its eigenbasis is the identity
  (``LayerFactors.q_a is None``) and no ``V x V`` matrix is formed or eigendecomposed.
- Vectorization is row-major in ``M``, so ``vec(g a^T) = g (x) a`` and the curvature block is
  approximated by ``G (x) A``. For the transposed layers the flat parameter vector holds
  ``M^T`` row-major (as ``Tensor.reshape`` flattens the stored weight);
  :meth:`KroneckerLayer.to_matrix` and :meth:`KroneckerLayer.write_matrix` transpose.
- ``A = E_n[(1/P) sum_t a_t a_t^T]`` and ``G = E_n[sum_r sum_t g_rt g_rt^T]``, where ``r``
  runs over the columns of a square root of the loss's Hessian in the model outputs (the
  exact Fisher/GGN), or over random vectors whose outer products have that Hessian as their
  expectation (the sampled Fisher, :mod:`.sampled_fisher`). With ``A = Q_A diag(l_A) Q_A^T`` and
  ``G = Q_G diag(l_G) Q_G^T``, K-FAC's curvature is diagonal in the basis ``Q_G (x) Q_A``
  with eigenvalues ``l_G[o] l_A[i]``; EK-FAC replaces them by the exact second moments of
  the rotated per-sample gradients, ``E_n[sum_r (Q_G^T grad_r M Q_A)[o, i]^2]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NotPositiveDefiniteError
from .serialization import serializable


@serializable
@dataclass(frozen=True)
class LayerFactors:
    """The fitted Kronecker eigenbasis of one layer and the curvature's diagonal in it.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        q_a, lambda_a: eigenvectors ``(i, i)`` and eigenvalues ``(i,)`` of ``A``. ``q_a`` is
            ``None`` when ``A`` is diagonal (an embedding's one-hot inputs): the eigenbasis is
            then the identity and ``lambda_a`` is ``A``'s diagonal, in input order (not sorted).
        q_g, lambda_g: eigenvectors ``(o, o)`` and eigenvalues ``(o,)`` of ``G``. ``q_g`` is
            ``None`` when ``G`` is kept diagonal (the memory fallback of a very wide output side,
            e.g. an untied LM head's ``V x V``): the eigenbasis is the identity and ``lambda_g`` is
            ``G``'s diagonal, in output order.
        corrected: ``(o, i)`` EK-FAC eigenvalues, or ``None`` when fitted without the
            eigenvalue correction.
    """

    name: str
    q_a: Tensor | None
    lambda_a: Tensor
    q_g: Tensor | None
    lambda_g: Tensor
    corrected: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(o, i)``, the shape of the layer's parameter matrix."""
        return int(self.lambda_g.shape[0]), int(self.lambda_a.shape[0])

    @property
    def a_factor(self) -> Tensor:
        """``A`` ``(i, i)``, rebuilt from its eigendecomposition (dense, also when diagonal)."""
        if self.q_a is None:
            return torch.diag(self.lambda_a)
        return (self.q_a * self.lambda_a) @ self.q_a.T

    @property
    def g_factor(self) -> Tensor:
        """``G`` ``(o, o)``, rebuilt from its eigendecomposition (dense, also when diagonal)."""
        if self.q_g is None:
            return torch.diag(self.lambda_g)
        return (self.q_g * self.lambda_g) @ self.q_g.T

    def eigenvalues(self, corrected: bool) -> Tensor:
        """The curvature's diagonal in the Kronecker eigenbasis: ``(o, i)``."""
        if not corrected:
            return torch.outer(self.lambda_g, self.lambda_a)
        if self.corrected is None:
            raise ValueError(
                f"Layer '{self.name}' was fitted without the eigenvalue correction; refit with "
                "update_diagonal=True to use EK-FAC, or set update_diagonal=False for K-FAC."
            )
        return self.corrected

    def rotate(self, m: Tensor) -> Tensor:
        """``Q_G^T m Q_A`` for ``m`` ``(k, o, i)``: ``(k, o, i)``."""
        out = m if self.q_g is None else self.q_g.T @ m
        return out if self.q_a is None else out @ self.q_a

    def unrotate(self, m: Tensor) -> Tensor:
        """``Q_G m Q_A^T`` for ``m`` ``(k, o, i)``: ``(k, o, i)``."""
        out = m if self.q_g is None else self.q_g @ m
        return out if self.q_a is None else out @ self.q_a.T

    def rotate_inputs(self, a: Tensor) -> Tensor:
        """Inputs ``a`` ``(..., i)`` in the eigenbasis of ``A``: ``a Q_A`` ``(..., i)`` (``a`` itself when diagonal)."""
        return a if self.q_a is None else a @ self.q_a.to(a.dtype)

    def rotate_outputs(self, g: Tensor) -> Tensor:
        """Output gradients ``g`` ``(..., o)`` in the eigenbasis of ``G``: ``g Q_G`` (``g`` itself when diagonal)."""
        return g if self.q_g is None else g @ self.q_g.to(g.dtype)

    def apply_power(self, m: Tensor, *, power: float, regularization: float, corrected: bool) -> Tensor:
        """``(C + regularization I)^power`` applied to ``m`` ``(k, o, i)``, ``C`` the layer's curvature.

        ``power=-1`` is the solve, ``power=1`` the product; returns ``(k, o, i)``. With a diagonal
        output side (an LM head's vocabulary) the rows are independent and run in slabs of
        :data:`APPLY_ROWS`: the head of a 50,257-token GPT-2 held five ``(k, V, i)`` and two
        ``(V, i)`` temporaries at once (1.5 GB for two test sequences at ``i = 768``), now a slab's.
        """
        values = self.eigenvalues(corrected)
        if self.q_g is not None:
            rotated = self.rotate(m)
            rotated.mul_((values + regularization).pow_(power))
            return self.unrotate(rotated)
        out = torch.empty_like(m)
        for start in range(0, m.shape[1], APPLY_ROWS):
            rows = slice(start, start + APPLY_ROWS)
            part = m[:, rows] if self.q_a is None else m[:, rows] @ self.q_a
            part = part * (values[rows] + regularization).pow_(power)
            out[:, rows] = part if self.q_a is None else part @ self.q_a.T
        return out


APPLY_ROWS = 4096
"""Rows of a layer with a diagonal output side that :meth:`LayerFactors.apply_power` treats at once."""


def check_layer_positive(factors: LayerFactors, regularization: float, corrected: bool, solver: str) -> None:
    """Raise :class:`NotPositiveDefiniteError` unless the layer's damped eigenvalues are safely > 0.

    The eigenvalues cannot be negative: EK-FAC's corrected ones are means of squares (summed in
    float64), K-FAC's products of eigenvalues clipped at zero. So with ``regularization > 0``
    every damped eigenvalue is at least ``regularization`` and nothing is refused, whatever the
    layer's width and dtype (a test scaled by ``o * i * eps * max`` asked GPT-2-small's
    ``c_fc`` in float32 for 28% of its largest eigenvalue). Only ``regularization = 0`` is
    checked: the smallest eigenvalue must clear the rounding level of the float64 factors,
    ``max(o, i) * eps64 * max`` (and the dtype's ``tiny``, so that ``1 / d`` is finite).
    """
    diag = factors.eigenvalues(corrected)
    values = diag.double()
    finite = bool(torch.isfinite(values).all())
    smallest_raw = float(values.min()) if values.numel() else 0.0
    if finite and smallest_raw >= 0 and regularization > 0:
        return
    scale = float(values.abs().max()) if values.numel() else 0.0
    level = max(max(factors.shape) * torch.finfo(torch.float64).eps * scale, torch.finfo(diag.dtype).tiny)
    smallest = smallest_raw + regularization
    if finite and smallest > level:
        return
    mean = float(values.clamp_min(0).mean()) if values.numel() else 0.0
    # Kronfluence's default damping: 0.1 x the mean eigenvalue (any positive value is accepted)
    suggestion = float(f"{max(0.1 * mean, 2 * (level - smallest_raw), 1e-8):.1g}")
    raise NotPositiveDefiniteError(
        f"The {'EK-FAC' if corrected else 'K-FAC'} curvature of layer '{factors.name}' plus "
        f"regularization*I is singular: its smallest eigenvalue is {smallest:.3e} (largest "
        f"{scale:.3e}, mean {mean:.3e}; regularization={regularization:g}). Cross-entropy curvature always "
        f"has a null direction, so pass a positive regularization, e.g. regularization={suggestion:g} "
        f"(0.1 x the mean eigenvalue): {solver}(model, loss, regularization={suggestion:g}).",
        smallest_eigenvalue=smallest,
        suggested_regularization=suggestion,
    )


SQUARE_SUM_TILE = 1 << 20
"""Elements of one tile of :func:`add_square_sum`: its squares stay in the cache."""


def add_square_sum(total: Tensor, x: Tensor) -> None:
    """``total += sum_rows x^2`` for ``x`` ``(N, F)`` and a float64 ``total`` ``(F,)``, in place.

    Tile by tile (about :data:`SQUARE_SUM_TILE` elements: up to 64 rows, or more where ``F`` is
    small): each tile's column sums of squares are formed in ``x``'s dtype and added to the float64
    ``total``, so nothing of ``x``'s size is allocated and each tile's squares are summed while in
    the cache. ``torch.einsum("to,to->o")`` over a ``(512, 50,257)`` block of LM-head gradients ran
    as 50,257 tiny products (311 ms, one thread) and ``x.square().sum(0, dtype=float64)`` converts
    every square (205 ms); this takes 20-30 ms. Sums of at most ``max(64, TILE / F)`` squares are
    rounded in ``x``'s dtype: a relative error of about ``1e-7`` in float32 (the einsum summed
    every row so).
    """
    n, f = x.shape
    rows = min(n, max(64, SQUARE_SUM_TILE // max(f, 1)))
    cols = max(4096, SQUARE_SUM_TILE // max(rows, 1))
    for r in range(0, n, rows):
        for c in range(0, f, cols):
            tile = x[r : r + rows, c : c + cols]
            total[c : c + cols] += torch.linalg.vecdot(tile, tile, dim=0)


GRAM_BAND = 512
"""Rows of one band of :func:`add_lower_gram`."""


def add_lower_gram(total: Tensor, x: Tensor, scale: float = 1.0) -> None:
    """``total += scale x^T x`` on and below the diagonal, for ``x`` ``(N, m)`` and a float64 ``total``
    ``(m, m)``, in place; the entries above the diagonal blocks of :data:`GRAM_BAND` rows are left as
    they are (zero in a factor sum), those of the diagonal blocks are added too.

    A factor's sum is only ever read by ``torch.linalg.eigh`` (:func:`eigen_factor`), which reads
    the lower triangle. So for a wide ``m`` the product is formed in bands of :data:`GRAM_BAND`
    rows, each up to its diagonal block: 58% of the full product's multiply-adds for GPT-2-small's
    3,072-wide factors, the covariance pass's largest cost after its forward and backward. Each
    band is formed in ``x``'s dtype and added to the float64 sum (no float64 copy of ``x``).
    """
    m = x.shape[1]
    if m <= GRAM_BAND:
        product = x.T @ x
        total += product if scale == 1.0 else product.mul_(scale)
        return
    for r in range(0, m, GRAM_BAND):
        end = min(r + GRAM_BAND, m)
        band = x[:, r:end].T @ x[:, :end]  # (rows, end): the band's entries up to its diagonal block
        total[r:end, :end] += band if scale == 1.0 else band.mul_(scale)


class LayerShape(tuple):
    """``(o, i)`` of a layer's parameter matrix, a plain tuple to every reader, that also says
    whether the layer's ``A`` is diagonal (``diagonal_a``): :class:`FactorSums` built from a
    :attr:`KroneckerLayer.shape` then keeps ``A`` as its diagonal ``(i,)``."""

    diagonal_a: bool

    def __new__(cls, o: int, i: int, diagonal_a: bool = False) -> LayerShape:
        """``(o, i)`` with the flag ``diagonal_a``."""
        shape = super().__new__(cls, (o, i))
        shape.diagonal_a = diagonal_a
        return shape

    def __getnewargs__(self) -> tuple[int, int, bool]:
        return self[0], self[1], self.diagonal_a


class FactorSums:
    """Running float64 sums of ``A`` and ``G`` over the training samples of one layer.

    ``a`` is ``(i, i)`` (its lower triangle: the entries above the diagonal stay zero, see
    :func:`add_lower_gram`), or its diagonal ``(i,)`` for a layer whose inputs are one-hot (an
    embedding), where the off-diagonal entries are exactly zero, or for a side too wide for
    its dense factor (the memory fallback); ``g`` is ``(o, o)`` (lower triangle), or its diagonal ``(o,)``
    (the memory fallback of a wide output side).

    Args:
        shape: ``(o, i)``; a :class:`LayerShape` (:attr:`KroneckerLayer.shape`) also says
            whether ``A`` is diagonal.
        diagonal_a: keep only ``A``'s diagonal; ``None``: as ``shape`` says (``False`` for a
            plain tuple).
        diagonal_g: keep only ``G``'s diagonal.
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, int],
        device: torch.device,
        diagonal_a: bool | None = None,
        diagonal_g: bool = False,
    ):
        o, i = shape
        if diagonal_a is None:
            diagonal_a = bool(getattr(shape, "diagonal_a", False))
        self.name = name
        self.a = torch.zeros((i,) if diagonal_a else (i, i), dtype=torch.float64, device=device)
        self.g = torch.zeros((o,) if diagonal_g else (o, o), dtype=torch.float64, device=device)

    @property
    def diagonal_a(self) -> bool:
        """Whether only ``A``'s diagonal is kept (``a`` is ``(i,)``)."""
        return self.a.ndim == 1

    @property
    def diagonal_g(self) -> bool:
        """Whether only ``G``'s diagonal is kept (``g`` is ``(o,)``)."""
        return self.g.ndim == 1

    @classmethod
    def from_totals(cls, name: str, a: Tensor, g: Tensor) -> FactorSums:
        """Sums accumulated elsewhere, e.g. per-block sums added up on a cluster.

        Args:
            a: the sum ``(i, i)`` of the inputs' second moments over the training samples, or
                its diagonal ``(i,)`` for a layer with one-hot inputs.
            g: the sum ``(o, o)`` of the output gradients' second moments, or its diagonal ``(o,)``.
        """
        sums = cls.__new__(cls)  # no zero matrices to allocate and drop
        sums.name, sums.a, sums.g = name, a.double(), g.double().to(a.device)
        return sums

    def add(self, g: Tensor, a: Tensor) -> None:
        """Add a batch: ``g`` ``(n, r, P, o)`` output gradients, ``a`` ``(n, P, i)`` inputs.

        The batch's products are formed in the inputs' dtype (no float64 copies of ``g`` and
        ``a``, which are the largest tensors of the pass) and added to the float64 sums.
        With a diagonal ``A`` only ``sum_t a_t^2`` (the token counts of one-hot inputs) is formed.
        """
        flat_a = a.reshape(-1, a.shape[-1])
        flat_g = g.reshape(-1, g.shape[-1])
        if self.diagonal_a:
            counts = torch.zeros_like(self.a)
            add_square_sum(counts, flat_a)
            self.a += counts.div_(a.shape[1])
        else:
            add_lower_gram(self.a, flat_a, 1.0 / a.shape[1])  # in-place adds upcast: no float64 temporaries
        if self.diagonal_g:
            add_square_sum(self.g, flat_g)
        else:
            add_lower_gram(self.g, flat_g)


def eigen_factor(total: Tensor, argument: tuple[int, torch.dtype]) -> tuple[Tensor | None, Tensor]:
    """``(Q, lambda)`` of one factor's sum ``total`` divided by ``n`` (in place), ``argument = (n, dtype)``.

    A matrix ``(m, m)`` is eigendecomposed in its own dtype (float64 sums; ``eigh`` reads the lower
    triangle) and the results are returned in ``dtype``, the eigenvalues clipped at 0 (a sum of
    squares: negative values are rounding). A diagonal factor ``(m,)`` is its own eigendecomposition:
    ``Q`` is ``None`` (the identity). Module-level: the cluster's fit runs it on the workers
    (:class:`~.blocks.Each`).
    """
    n, dtype = argument
    total.div_(n)
    if total.ndim == 1:
        return None, total.clamp_min(0).to(dtype)
    values, vectors = torch.linalg.eigh(total, UPLO="L")  # the sums hold their lower triangles (add_lower_gram)
    return vectors.to(dtype), values.clamp_min(0).to(dtype)


def corrected_eigenvalue_sum(factors: LayerFactors, g: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
    """``sum_n sum_r (Q_G^T (sum_t g_nrt a_nt^T) Q_A)^2`` over a batch: ``(o, i)`` float64.

    Args:
        g: ``(n, r, P, o)`` output gradients, one per square-root column ``r``.
        a: ``(n, P, i)`` layer inputs.
        out: a float64 ``(o, i)`` sum (contiguous) to add into in place, as a pass over the training
            data does block after block; ``None``: a new one.

    With one position the rotated gradient is an outer product and its square is the outer
    product of squares, so nothing of size ``(n, o, i)`` is formed.
    """
    g_rot = factors.rotate_outputs(g)  # in the batch's dtype: only the sum is float64
    a_rot = factors.rotate_inputs(a)
    if out is None:
        out = torch.zeros(factors.shape, dtype=torch.float64, device=g.device)
    if a.shape[1] == 1:
        out += torch.einsum("nro,ni->oi", g_rot[:, :, 0].square(), a_rot[:, 0].square())
        return out
    for r in range(g.shape[1]):
        grads = layer_grads(g_rot[:, r], a_rot)
        add_square_sum(out.view(-1), grads.reshape(grads.shape[0], -1))
    return out


def rotated_square_sum(factors: LayerFactors, grads: Tensor, out: Tensor | None = None) -> Tensor:
    """``sum_n (Q_G^T grads_n)^2`` of per-sample gradients ``grads`` ``(n, o, i)`` already in ``A``'s
    eigenbasis (``grads_n Q_A``, as :func:`tied_layer_grads` forms them): ``(o, i)`` float64, what
    :func:`corrected_eigenvalue_sum` adds for gradients formed elsewhere. Added into ``out`` (float64
    ``(o, i)``, contiguous) in place when given (:func:`add_square_sum`), and returned."""
    rot = grads if factors.q_g is None else factors.q_g.T.to(grads.dtype) @ grads
    if out is None:
        out = torch.zeros(rot.shape[1:], dtype=torch.float64, device=rot.device)
    add_square_sum(out.view(-1), rot.reshape(rot.shape[0], -1))
    return out


def tied_layer_grads(
    head: tuple[Tensor, Tensor], use: tuple[Tensor, Tensor], r: int, inputs_basis: Tensor | None = None
) -> Tensor:
    """Per-sample gradients ``(n, V, i)`` of a tied LM head's weight ``W`` ``(V, d)`` through both of
    its uses, for vector ``r``: the head's ``sum_p g_p a_p^T`` plus the embedding's.

    The head is ``(g (n, r, P, V), a (n, P, i))`` (``i = d``, or ``d + 1`` with a bias of its own,
    to which the embedding adds nothing). The embedding's share ``sum_q onehot_q g_q^T`` adds each
    position's output gradient ``g_q`` ``(d,)`` to the row of its token, so it is an
    ``index_add_`` of ``Q x d`` numbers
    where the joined product costs ``V x Q x i`` multiply-adds (13 GFLOP for four GPT-2
    sequences of 128 tokens, half the layer's work). Padding rows (all-zero one-hots) add nothing.

    Args:
        head: the head's ``(g (n, r, P, V), a (n, P, i))``.
        use: the embedding's ``(g (n, r, Q, d), a)``, ``a`` its one-hot inputs ``(n, Q, V)`` or its
            token ids ``(n, Q)`` (integers, ``-1`` at padding: :meth:`KroneckerLayer.token_ids`).
        r: which back-propagated vector.
        inputs_basis: ``Q_A`` ``(i, i)`` to return ``grads Q_A`` instead (the input side in
            ``A``'s eigenbasis), rotating the ``P + Q`` positions' inputs rather than the
            ``V x i`` result; ``None``: unrotated.
    """
    g_head, a_head = head
    g_use, a_use = use
    rows = g_use[:, r]  # (n, Q, d)
    if a_use.is_floating_point():
        present, ids = a_use.max(dim=-1)  # (n, Q): the token of each position, 0 weight at padding
    else:
        present, ids = a_use >= 0, a_use.clamp_min(0)
    rows = (rows * present.unsqueeze(-1).to(rows.dtype)).to(a_head.dtype)
    d = rows.shape[-1]
    if inputs_basis is not None:
        basis = inputs_basis.to(a_head.dtype)
        a_head, rows = a_head @ basis, rows @ basis[:d]  # a head bias column adds nothing for the embedding
    grads = layer_grads(g_head[:, r], a_head)  # (n, V, i)
    n, vocab, width = grads.shape
    at = (ids + torch.arange(n, device=ids.device).unsqueeze(1) * vocab).reshape(-1)
    grads.view(n * vocab, width)[:, : rows.shape[-1]].index_add_(0, at, rows.reshape(-1, rows.shape[-1]))
    return grads


def layer_grads(g: Tensor, a: Tensor) -> Tensor:
    """Per-sample gradients ``sum_t g_t a_t^T`` of one layer.

    ``g`` ``(n, P, o)`` and ``a`` ``(n, P, i)``; returns ``(n, o, i)``.
    """
    if a.shape[1] == 1:
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.einsum("npo,npi->noi", g, a)


# -- capturing g and a in one batched forward/backward -----------------------------------------
LayerKind = Literal["linear", "conv2d", "conv1d", "embedding"]


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a supported layer, or ``None`` for a module K-FAC cannot factor.

    ``"linear"``: ``nn.Linear`` (and subclasses); ``"conv2d"``: ``nn.Conv2d``;
    ``"conv1d"``: Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), recognized by
    its class name, module and 2-D ``weight`` without importing ``transformers`` (an optional
    dependency); ``"embedding"``: ``nn.Embedding``. Refusals of unsupported settings (a
    grouped convolution, an embedding with ``max_norm``) are the caller's.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    cls = type(module)
    if (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.ndim == 2
    ):
        return "conv1d"
    return None


@dataclass(frozen=True)
class KroneckerLayer:
    """Where one supported layer's trainable parameters sit in the flat vector, and its shapes.

    Attributes:
        name, module: the module and its name in ``model.named_modules()``.
        weight, bias: ``(start, stop)`` of the trainable weight / bias in the flat vector, or
            ``None`` when that parameter is frozen (or absent).
        d_out: output features (Linear, Conv1D), channels (Conv2d) or the embedding size.
        d_in_weight: input columns of the weight (``C_in*kh*kw`` for Conv2d, the vocabulary
            size ``V`` for an embedding).
        kind: see :func:`layer_kind`. ``"conv1d"`` and ``"embedding"`` store their weight
            transposed, ``(d_in_weight, d_out)``; ``"embedding"`` has one-hot inputs and a
            diagonal ``A``.
        tied_use: for an LM head whose weight ``(V, d)`` is tied to a token embedding (GPT-2's
            ``lm_head`` and ``wte``; EK-FAC's ``tied="head"``), that embedding's layer: it is
            captured beside the head, and its use's gradient is added to the head's
            (:func:`tied_layer_grads`); its factors are not formed. ``None`` otherwise.
    """

    name: str
    module: nn.Module = field(repr=False)
    weight: tuple[int, int] | None
    bias: tuple[int, int] | None
    d_out: int
    d_in_weight: int
    kind: LayerKind = "linear"
    tied_use: KroneckerLayer | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls, name: str, module: nn.Module, weight: tuple[int, int] | None, bias: tuple[int, int] | None
    ) -> KroneckerLayer:
        """The layer for a supported ``module`` (see :func:`layer_kind`), its shapes read from its weight."""
        kind = layer_kind(module)
        if kind is None:
            raise ValueError(f"Layer '{name}' ({type(module).__name__}) is not a layer K-FAC can factor.")
        w = cast(Tensor, module.weight)
        if kind in ("conv1d", "embedding"):  # stored (d_in, d_out)
            d_out, d_in_weight = int(w.shape[1]), int(w.shape[0])
        else:
            d_out, d_in_weight = int(w.shape[0]), int(w[0].numel())
        return cls(name=name, module=module, weight=weight, bias=bias, d_out=d_out, d_in_weight=d_in_weight, kind=kind)

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is ``M``'s weight part transposed, ``(d_in_weight, d_out)``."""
        return self.kind in ("conv1d", "embedding")

    @property
    def diagonal_a(self) -> bool:
        """Whether ``A`` is diagonal: an embedding, whose inputs are one-hot."""
        return self.kind == "embedding"

    @property
    def shape(self) -> LayerShape:
        """``(o, i)`` of the layer's parameter matrix: trainable weight columns, then bias.

        A :class:`LayerShape`: a plain tuple that also carries :attr:`diagonal_a`.
        """
        i = (self.d_in_weight if self.weight else 0) + (1 if self.bias else 0)
        return LayerShape(self.d_out, i, self.diagonal_a)

    def to_matrix(self, flat: Tensor) -> Tensor:
        """The layer's block of ``flat`` ``(k, p)`` as matrices ``(k, o, i)``: a view of ``flat`` for a
        weight laid out ``(o, i)`` without a bias (an LM head: no copy of its ``(k, V, i)``), else a
        copy (callers only read it)."""
        if self.weight and not self.bias and not self.transposed:
            return flat[:, self.weight[0] : self.weight[1]].reshape(flat.shape[0], self.d_out, -1)
        k, parts = flat.shape[0], []
        if self.weight:
            w = flat[:, self.weight[0] : self.weight[1]]
            if self.transposed:
                parts.append(w.reshape(k, self.d_in_weight, self.d_out).transpose(1, 2))
            else:
                parts.append(w.reshape(k, self.d_out, -1))
        if self.bias:
            parts.append(flat[:, self.bias[0] : self.bias[1]].reshape(k, self.d_out, 1))
        return torch.cat(parts, dim=2)

    def write_matrix(self, m: Tensor, flat: Tensor) -> None:
        """Write matrices ``m`` ``(k, o, i)`` into the layer's block of ``flat`` ``(k, p)``."""
        k = m.shape[0]
        if self.weight:
            w = m[:, :, : self.d_in_weight]
            if self.transposed:
                w = w.transpose(1, 2)
            flat[:, self.weight[0] : self.weight[1]] = w.reshape(k, -1)
        if self.bias:
            flat[:, self.bias[0] : self.bias[1]] = m[:, :, -1]

    @property
    def min_input_ndim(self) -> int:
        """The fewest dimensions of a batch-first input: token ids ``(n,)`` may be 1-D."""
        return 1 if self.kind == "embedding" else 2

    def inputs(self, x: Tensor) -> Tensor:
        """The layer input at each position, with a 1 for the bias: ``(n, P, i)``.

        For an embedding ``x`` holds token ids ``(n, ...)``, and the input is their one-hot
        ``(n, P, V)`` in the weight's dtype, zero at ``padding_idx`` (torch leaves the
        padding row's gradient zero).
        """
        n = x.shape[0]
        if self.kind == "embedding":
            embedding = cast(nn.Embedding, self.module)
            ids = x.reshape(n, -1)
            a = torch.zeros(*ids.shape, self.d_in_weight, dtype=embedding.weight.dtype, device=x.device)
            a.scatter_(2, ids.unsqueeze(2), 1.0)
            if embedding.padding_idx is not None:
                a[..., embedding.padding_idx] = 0.0
            return a
        if self.kind == "conv2d":
            x = _conv_patches(cast(nn.Conv2d, self.module), x)
        else:
            x = x.reshape(n, -1, x.shape[-1])
        parts = [x] if self.weight else [x[..., :0]]
        if self.bias:
            parts.append(torch.ones_like(x[..., :1]))
        return torch.cat(parts, dim=-1)

    def token_ids(self, x: Tensor) -> Tensor:
        """An embedding's token ids ``x`` ``(n, ...)`` by position: ``(n, P)`` int64, ``-1`` at
        ``padding_idx`` (what :meth:`inputs` one-hots, without the ``(n, P, V)`` tensor)."""
        if self.kind != "embedding":
            raise ValueError(f"Layer '{self.name}' is not an embedding; it has no token ids.")
        ids = x.reshape(x.shape[0], -1).to(torch.int64)
        padding = cast(nn.Embedding, self.module).padding_idx
        return ids if padding is None else ids.masked_fill(ids == padding, -1)

    def output_grads(self, grad: Tensor) -> Tensor:
        """The gradient in the layer output, by position: ``(n, P, o)``."""
        n = grad.shape[0]
        if self.kind == "conv2d":
            return grad.reshape(n, self.d_out, -1).transpose(1, 2)
        return grad.reshape(n, -1, self.d_out)


def _conv_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The receptive fields of a Conv2d input ``(n, C, H, W)``: ``(n, L, C*kh*kw)``."""
    pads: list[int] = []  # F.pad order: last dimension first
    for d in (1, 0):
        k, dil = conv.kernel_size[d], conv.dilation[d]
        if conv.padding == "same":
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            pads += [0, 0]
        else:
            padding = cast("tuple[int, ...]", conv.padding)  # not a string: "same" and "valid" are handled above
            pads += [padding[d], padding[d]]
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return cols.transpose(1, 2)


class Capture:
    """Forward hooks that record each layer's inputs and put a zero probe on its output.

    The gradient in a probe is the gradient in the layer output, whatever happens to that
    output afterwards (in-place activations included). A layer called several times per
    forward contributes all its calls as extra positions. An embedding called with ids of
    batch size 1 in a larger batch (position ids ``(1, T)`` that the model broadcasts over
    the batch, as GPT-2 does) returns its output expanded to the batch, one copy per sample.

    A probe is a zero scalar expanded to the output's shape (no zero tensor of the output's size:
    the LM head's ``(n, T, V)`` fill cost as much as its add); the gradient in it is taken at the
    expansion, never summed to the scalar.

    Args:
        layers: the layers to watch.
        n: the batch size; a layer whose input does not lead with it is refused.
        ids: embedding layers among ``layers`` whose inputs are recorded as their token ids
            ``(n, P)`` int64 (``-1`` at ``padding_idx``) instead of one-hots ``(n, P, V)`` (a tied
            LM head's embedding use, whose one-hots of a 50,257-token vocabulary are 100 MB for
            four sequences of 128 tokens and only ever read for their ids).
    """

    def __init__(self, layers: Sequence[KroneckerLayer], n: int, ids: Sequence[KroneckerLayer] = ()):
        self.layers = list(layers)
        self.n = n
        self._ids = {id(layer) for layer in ids}
        if any(layer.kind != "embedding" for layer in ids):
            raise ValueError("Capture(ids=...) takes embedding layers only.")
        self.inputs: list[list[Tensor]] = [[] for _ in self.layers]
        self.probes: list[list[Tensor]] = [[] for _ in self.layers]
        self._handles: list = []

    def __enter__(self) -> Capture:
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        layer = self.layers[index]
        as_ids = id(layer) in self._ids

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = args[0]
            if layer.kind == "embedding" and x.ndim >= 2 and x.shape[0] == 1 and output.shape[0] == 1:
                # ids shared by the whole batch (GPT-2's position ids (1, T)): every sample reads
                # the same rows, and the output, broadcast later, becomes one copy per sample so
                # that each sample's gradient in it is kept apart
                x, output = x.expand(self.n, *x.shape[1:]), output.expand(self.n, *output.shape[1:])
            if x.ndim < layer.min_input_ndim or x.shape[0] != self.n:
                raise ValueError(
                    f"Layer '{layer.name}' received an input of shape {tuple(x.shape)} whose first "
                    f"dimension is not the batch of {self.n} samples; K-FAC needs batch-first "
                    "inputs. Freeze this layer (requires_grad_(False)) or leave it out of layers=."
                )
            self.inputs[index].append(layer.token_ids(x.detach()) if as_ids else layer.inputs(x.detach()))
            probe = output.new_zeros((), requires_grad=True).expand(output.shape)
            self.probes[index].append(probe)
            return output + probe

        return hook

    def collect(self, outputs: Tensor, vectors: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Back-propagate each of ``vectors`` ``(r, n, *outputs.shape[1:])`` from ``outputs``.

        Returns per layer ``(g, a)``: ``g`` ``(n, r, P, o)`` the gradients in the layer's
        output of ``<vectors[r, j], outputs[j]>`` for each sample ``j``, and ``a`` ``(n, P, i)``.
        """
        flat = [p for probes in self.probes for p in probes]
        for layer, probes in zip(self.layers, self.probes):
            if not probes:
                raise ValueError(
                    f"Layer '{layer.name}' has trainable parameters but its forward was never "
                    "called (its parameters are used directly by another module); freeze it "
                    "with requires_grad_(False) or leave it out of layers=."
                )
        rs = vectors.shape[0]
        out: list[Tensor | None] = [None] * len(self.layers)  # g per layer, filled one r at a time
        for r in range(rs):
            grads = torch.autograd.grad(outputs, flat, vectors[r], retain_graph=r < rs - 1, allow_unused=True)
            at = 0
            for index, (layer, probes) in enumerate(zip(self.layers, self.probes)):
                calls = range(at, at + len(probes))
                at += len(probes)
                parts = [layer.output_grads(torch.zeros_like(flat[c]) if grads[c] is None else grads[c]) for c in calls]
                g_r = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                if rs == 1:  # one vector: no copy into a stacked tensor
                    out[index] = g_r.unsqueeze(1)
                    continue
                if out[index] is None:
                    out[index] = g_r.new_empty((g_r.shape[0], rs) + tuple(g_r.shape[1:]))
                out[index][:, r] = g_r  # type: ignore[index]
            del grads
        return [
            (g.detach(), inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1))  # type: ignore[union-attr]
            for g, inputs in zip(out, self.inputs)
        ]
