"""Kronecker-factored curvature of one layer: capture, factors, eigenbases, solves, contractions.

Conventions for one layer (``o = d_out``, ``i = d_in``):

- The layer's trainable parameters form a matrix ``M`` of shape ``(o, i)``: the weight as
  ``(d_out, d_in_weight)`` (a Conv2d kernel ``(C_out, C_in, kh, kw)`` is ``(C_out, C_in*kh*kw)``)
  with the bias appended as a last column when it is trainable.
- A sample enters the layer at ``P`` positions (1 for a plain linear layer, the sequence
  length or the number of convolution patches otherwise). At position ``t`` it has the
  input ``a_t`` ``(i,)`` (a trailing 1 for the bias column) and the output gradient ``g_t``
  ``(o,)``; its gradient in ``M`` is ``sum_t g_t a_t^T``.
- Vectorization is row-major, as ``Tensor.reshape`` flattens the weight, so
  ``vec(g a^T) = g (x) a`` and the curvature block is approximated by ``G (x) A``.
- ``A = E_n[(1/P) sum_t a_t a_t^T]`` and ``G = E_n[sum_r sum_t g_rt g_rt^T]``, where ``r``
  runs over the columns of a square root of the loss's Hessian in the model outputs (the
  exact Fisher/GGN, no sampling). With ``A = Q_A diag(l_A) Q_A^T`` and
  ``G = Q_G diag(l_G) Q_G^T``, K-FAC's curvature is diagonal in the basis ``Q_G (x) Q_A``
  with eigenvalues ``l_G[o] l_A[i]``; EK-FAC replaces them by the exact second moments of
  the rotated per-sample gradients, ``E_n[sum_r (Q_G^T grad_r M Q_A)[o, i]^2]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NotPositiveDefiniteError
from .eigen import definiteness
from .serialization import serializable


@serializable
@dataclass(frozen=True)
class LayerFactors:
    """The fitted Kronecker eigenbasis of one layer and the curvature's diagonal in it.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        q_a, lambda_a: eigenvectors ``(i, i)`` and eigenvalues ``(i,)`` of ``A``.
        q_g, lambda_g: eigenvectors ``(o, o)`` and eigenvalues ``(o,)`` of ``G``.
        corrected: ``(o, i)`` EK-FAC eigenvalues, or ``None`` when fitted without the
            eigenvalue correction.
    """

    name: str
    q_a: Tensor
    lambda_a: Tensor
    q_g: Tensor
    lambda_g: Tensor
    corrected: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(o, i)``, the shape of the layer's parameter matrix."""
        return int(self.q_g.shape[0]), int(self.q_a.shape[0])

    @property
    def a_factor(self) -> Tensor:
        """``A`` ``(i, i)``, rebuilt from its eigendecomposition."""
        return (self.q_a * self.lambda_a) @ self.q_a.T

    @property
    def g_factor(self) -> Tensor:
        """``G`` ``(o, o)``, rebuilt from its eigendecomposition."""
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
        return self.q_g.T @ m @ self.q_a

    def unrotate(self, m: Tensor) -> Tensor:
        """``Q_G m Q_A^T`` for ``m`` ``(k, o, i)``: ``(k, o, i)``."""
        return self.q_g @ m @ self.q_a.T

    def apply_power(self, m: Tensor, *, power: float, regularization: float, corrected: bool) -> Tensor:
        """``(C + regularization I)^power`` applied to ``m`` ``(k, o, i)``, ``C`` the layer's curvature.

        ``power=-1`` is the solve, ``power=1`` the product; returns ``(k, o, i)``.
        """
        diag = self.eigenvalues(corrected) + regularization
        return self.unrotate(self.rotate(m) * diag.pow(power))


def check_layer_positive(factors: LayerFactors, regularization: float, corrected: bool, solver: str) -> None:
    """Raise :class:`NotPositiveDefiniteError` unless the layer's damped eigenvalues are safely > 0."""
    diag = factors.eigenvalues(corrected).to(factors.q_a.dtype)
    smallest, threshold, scale = definiteness(diag, regularization)
    if smallest > threshold:
        return
    diag = diag.double()
    # large enough to clear the threshold (p * eps * scale, which matters in float32 for wide layers)
    suggestion = float(f"{max(1e-3 * scale, 2 * (threshold - float(diag.min())), 1e-8):.1g}")
    if float(diag.min()) + suggestion <= threshold:
        suggestion *= 2
    raise NotPositiveDefiniteError(
        f"The {'EK-FAC' if corrected else 'K-FAC'} curvature of layer '{factors.name}' plus "
        f"regularization*I is singular: its smallest eigenvalue is {smallest:.3e} (largest "
        f"{scale:.3e}; regularization={regularization:g}). Cross-entropy curvature always has a "
        f"null direction, so pass regularization={suggestion:g} or larger, e.g. "
        f"{solver}(model, loss, regularization={suggestion:g}).",
        smallest_eigenvalue=smallest,
        suggested_regularization=suggestion,
    )


class FactorSums:
    """Running float64 sums of ``A`` and ``G`` over the training samples of one layer."""

    def __init__(self, name: str, shape: tuple[int, int], device: torch.device):
        o, i = shape
        self.name = name
        self.a = torch.zeros(i, i, dtype=torch.float64, device=device)
        self.g = torch.zeros(o, o, dtype=torch.float64, device=device)

    @classmethod
    def from_totals(cls, name: str, a: Tensor, g: Tensor) -> FactorSums:
        """Sums accumulated elsewhere, e.g. per-block sums added up on a cluster.

        Args:
            a: the sum ``(i, i)`` of the inputs' second moments over the training samples.
            g: the sum ``(o, o)`` of the output gradients' second moments.
        """
        sums = cls.__new__(cls)  # no zero matrices to allocate and drop
        sums.name, sums.a, sums.g = name, a.double(), g.double().to(a.device)
        return sums

    def add(self, g: Tensor, a: Tensor) -> None:
        """Add a batch: ``g`` ``(n, r, P, o)`` output gradients, ``a`` ``(n, P, i)`` inputs.

        The batch's products are formed in the inputs' dtype (no float64 copies of ``g`` and
        ``a``, which are the largest tensors of the pass) and added to the float64 sums.
        """
        flat_a = a.reshape(-1, a.shape[-1])
        flat_g = g.reshape(-1, g.shape[-1])
        self.a += (flat_a.T @ flat_a).div_(a.shape[1])  # in-place adds upcast: no float64 temporaries
        self.g += flat_g.T @ flat_g

    def eigh(self, n: int, dtype: torch.dtype) -> LayerFactors:
        """Divide by ``n`` and eigendecompose both factors (float64); results in ``dtype``.

        Consumes the sums (divided in place, then released), so that a fit holds at most
        one layer's float64 eigendecomposition at a time. ``eigh`` reads the lower triangle.
        """
        a, g = self.a.div_(n), self.g.div_(n)
        self.a = self.g = None  # type: ignore[assignment]
        lambda_a, q_a = torch.linalg.eigh(a)
        del a
        q_a, lambda_a = q_a.to(dtype), lambda_a.clamp_min(0).to(dtype)  # PSD: clip rounding noise
        lambda_g, q_g = torch.linalg.eigh(g)
        del g
        q_g, lambda_g = q_g.to(dtype), lambda_g.clamp_min(0).to(dtype)
        return LayerFactors(self.name, q_a, lambda_a, q_g, lambda_g)


def corrected_eigenvalue_sum(factors: LayerFactors, g: Tensor, a: Tensor) -> Tensor:
    """``sum_n sum_r (Q_G^T (sum_t g_nrt a_nt^T) Q_A)^2`` over a batch: ``(o, i)``.

    In the batch's dtype with one position, float64 with several; callers add it to float64 sums.

    Args:
        g: ``(n, r, P, o)`` output gradients, one per square-root column ``r``.
        a: ``(n, P, i)`` layer inputs.

    With one position the rotated gradient is an outer product and its square is the outer
    product of squares, so nothing of size ``(n, o, i)`` is formed.
    """
    g_rot = g @ factors.q_g.to(g.dtype)  # in the batch's dtype: only the batch's sum is float64
    a_rot = a @ factors.q_a.to(a.dtype)
    if a.shape[1] == 1:
        return torch.einsum("nro,ni->oi", g_rot[:, :, 0].square(), a_rot[:, 0].square())
    out = torch.zeros(factors.shape, dtype=torch.float64, device=g.device)
    for r in range(g.shape[1]):
        out += layer_grads(g_rot[:, r], a_rot).square().sum(0)
    return out


def layer_grads(g: Tensor, a: Tensor) -> Tensor:
    """Per-sample gradients ``sum_t g_t a_t^T`` of one layer.

    ``g`` ``(n, P, o)`` and ``a`` ``(n, P, i)``; returns ``(n, o, i)``.
    """
    if a.shape[1] == 1:
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.einsum("npo,npi->noi", g, a)


def up_contract(f: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """``<f_t, sum_p g_jp a_jp^T>`` for all pairs of factor rows ``t`` and points ``j``.

    ``f`` ``(t, o, i)``, ``g`` ``(m, P, o)``, ``a`` ``(m, P, i)``; returns ``(t, m)``.

    With one position the training gradients stay factored: the contraction runs over the
    smaller of ``o`` and ``i`` first, holding ``t * m * min(o, i)`` numbers. With several
    positions the layer's per-sample gradients ``(m, o, i)`` are formed for this chunk.
    """
    t, o, i = f.shape
    m = g.shape[0]
    if a.shape[1] != 1:
        return f.reshape(t, o * i) @ layer_grads(g, a).reshape(m, o * i).T
    g1, a1 = g[:, 0], a[:, 0]
    if o <= i:
        tmp = (f.reshape(t * o, i) @ a1.T).reshape(t, o, m)
        return (tmp * g1.T).sum(1)
    tmp = (f.transpose(1, 2).reshape(t * i, o) @ g1.T).reshape(t, i, m)
    return (tmp * a1.T).sum(1)


def self_contract(factors: LayerFactors, inverse_diag: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """``vec(grad)^T (C + lambda I)^-1 vec(grad)`` per sample from ``g`` ``(m, P, o)``, ``a`` ``(m, P, i)``: ``(m,)``.

    ``inverse_diag`` is ``1 / (eigenvalues + lambda)`` ``(o, i)``. With one position this is
    ``sum_{o,i} g_rot[o]^2 inverse_diag[o, i] a_rot[i]^2``, without forming ``(m, o, i)``.
    """
    if a.shape[1] == 1:
        g_rot = g[:, 0] @ factors.q_g
        a_rot = a[:, 0] @ factors.q_a
        return ((g_rot.square() @ inverse_diag) * a_rot.square()).sum(1)
    rotated = factors.rotate(layer_grads(g, a))
    return (rotated.square() * inverse_diag).sum((1, 2))


# -- capturing g and a in one batched forward/backward -----------------------------------------
@dataclass(frozen=True)
class KroneckerLayer:
    """Where one supported layer's trainable parameters sit in the flat vector, and its shapes.

    Attributes:
        name, module: the module and its name in ``model.named_modules()``.
        weight, bias: ``(start, stop)`` of the trainable weight / bias in the flat vector, or
            ``None`` when that parameter is frozen (or absent).
        d_out: output features (Linear) or channels (Conv2d).
        d_in_weight: input columns of the weight (``C_in*kh*kw`` for Conv2d).
    """

    name: str
    module: nn.Module = field(repr=False)
    weight: tuple[int, int] | None
    bias: tuple[int, int] | None
    d_out: int
    d_in_weight: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(o, i)`` of the layer's parameter matrix: trainable weight columns, then bias."""
        return self.d_out, (self.d_in_weight if self.weight else 0) + (1 if self.bias else 0)

    def to_matrix(self, flat: Tensor) -> Tensor:
        """The layer's block of ``flat`` ``(k, p)`` as matrices ``(k, o, i)``."""
        k, parts = flat.shape[0], []
        if self.weight:
            parts.append(flat[:, self.weight[0] : self.weight[1]].reshape(k, self.d_out, -1))
        if self.bias:
            parts.append(flat[:, self.bias[0] : self.bias[1]].reshape(k, self.d_out, 1))
        return torch.cat(parts, dim=2)

    def write_matrix(self, m: Tensor, flat: Tensor) -> None:
        """Write matrices ``m`` ``(k, o, i)`` into the layer's block of ``flat`` ``(k, p)``."""
        k = m.shape[0]
        if self.weight:
            flat[:, self.weight[0] : self.weight[1]] = m[:, :, : self.d_in_weight].reshape(k, -1)
        if self.bias:
            flat[:, self.bias[0] : self.bias[1]] = m[:, :, -1]

    def inputs(self, x: Tensor) -> Tensor:
        """The layer input at each position, with a 1 for the bias: ``(n, P, i)``."""
        n = x.shape[0]
        if isinstance(self.module, nn.Conv2d):
            x = _conv_patches(self.module, x)
        else:
            x = x.reshape(n, -1, x.shape[-1])
        parts = [x] if self.weight else [x[..., :0]]
        if self.bias:
            parts.append(torch.ones_like(x[..., :1]))
        return torch.cat(parts, dim=-1)

    def output_grads(self, grad: Tensor) -> Tensor:
        """The gradient in the layer output, by position: ``(n, P, o)``."""
        n = grad.shape[0]
        if isinstance(self.module, nn.Conv2d):
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
    forward contributes all its calls as extra positions.

    Args:
        layers: the layers to watch.
        n: the batch size; a layer whose input does not lead with it is refused.
    """

    def __init__(self, layers: Sequence[KroneckerLayer], n: int):
        self.layers = list(layers)
        self.n = n
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

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = args[0]
            if x.ndim < 2 or x.shape[0] != self.n:
                raise ValueError(
                    f"Layer '{layer.name}' received an input of shape {tuple(x.shape)} whose first "
                    f"dimension is not the batch of {self.n} samples; K-FAC needs batch-first "
                    "inputs. Freeze this layer (requires_grad_(False)) or leave it out of layers=."
                )
            self.inputs[index].append(layer.inputs(x.detach()))
            probe = torch.zeros_like(output, requires_grad=True)
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
                if out[index] is None:
                    out[index] = g_r.new_empty((g_r.shape[0], rs) + tuple(g_r.shape[1:]))
                out[index][:, r] = g_r  # type: ignore[index]
            del grads
        return [
            (g.detach(), torch.cat(inputs, dim=1))  # type: ignore[union-attr]
            for g, inputs in zip(out, self.inputs)
        ]
