"""The loss's curvature in the model outputs without ``c`` backward passes: closed-form
products and the sampled (true) Fisher.

For softmax cross-entropy the Hessian of one position's loss in its logits ``o`` ``(V,)`` is
``H = diag(p) - p p^T`` with ``p = softmax(o)``. Two ways to use it without forming or
factoring it:

- **Products** (CG, Arnoldi, LiSSA, Nystroem with ``curvature="ggn"``): ``H u = p * u - p (p . u)``
  per position (:func:`softmax_hessian_product`), ``O(V)`` per position and vector, whatever
  ``V``. No backward pass through the loss.
- **The sampled Fisher** (EK-FAC's factors; the gradient index's curvature preconditioner): with
  a label ``y`` drawn from ``p``, ``E_y[(p - e_y)(p - e_y)^T] = diag(p) - p p^T``, so the gradient
  of the loss at a DRAWN label is a random square root of ``H``. With ``d`` draws per position,
  ``v_k = (p - e_{y_k}) / sqrt(d)`` (``k = 1..d``) satisfy ``E[sum_k v_k v_k^T] = H``; the
  error of the sum falls like ``1/sqrt(d)``. Positions of one sequence are drawn
  independently and share one vector per draw (their cross terms have zero mean), so a
  draw costs ONE backward pass for the whole batch, where the exact roots cost ``(T - 1) V``
  (:func:`softmax_sampled_roots`). This is the true Fisher of the model's predictive
  distribution (as Kronfluence and TRAK sample it), not the empirical Fisher (which uses the
  data's labels).
- For mean squared error over ``c`` outputs, ``H = (2/c) I``, and ``sqrt(2/c) z`` with
  ``z ~ N(0, I)`` is a random root (:func:`gaussian_sampled_roots`).

Roots are laid out as EK-FAC's exact roots are: ``(r, n, *outputs.shape[1:])``, ``r`` the
number of vectors to back-propagate, with ``sum_r v_r[j] v_r[j]^T`` (in expectation) the
Hessian of sample ``j``'s own loss in its outputs. :func:`sampled_roots` and
:func:`hessian_form` find the form that fits a task's output loss; both return ``None``
when there is none (the caller then keeps the autograd route).

Randomness: :func:`seeded_sampled_roots` draws each sample's labels from its own generator,
seeded by :func:`generator_for` from a seed and the sample's index in the training data, so a
fit's draws do not depend on how the data is split into blocks and chunks (a Dask fit equals
the in-process one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "closed_form_is_tested",
    "draw_categorical",
    "gaussian_sampled_roots",
    "generator_for",
    "hessian_form",
    "sampled_roots",
    "seeded_sampled_roots",
    "softmax_hessian_product",
    "softmax_sampled_roots",
]


def softmax_hessian_product(logits: Tensor, u: Tensor, weight: Tensor | None = None) -> Tensor:
    """``w * (p * u - p (p . u))`` per position: the Hessian of ``w * cross_entropy`` in the
    logits times ``u``, with the classes along the LAST dimension.

    Args:
        logits: ``(..., V)``.
        u: ``(..., V)``, the same shape (or ``(k, ..., V)`` for ``k`` vectors at once).
        weight: ``(...)`` per-position weights (the loss's share of each position), or ``None``
            for 1.

    Returns:
        the product, shaped as ``u``, in ``u``'s dtype (``p`` is computed in the logits' dtype,
        float64 logits give float64 products).
    """
    p = torch.softmax(logits, dim=-1).to(u.dtype)
    out = p * u  # the one new tensor of u's size; the rest is in place (a GGN product over 50,257
    dot = out.sum(dim=-1, keepdim=True)  # classes is memory-bound: each pass over it counts)
    if weight is not None:
        w = weight.to(u.dtype).unsqueeze(-1)
        out.mul_(w)
        dot = dot * w
    return out.sub_(p * dot)  # not addcmul_: vmap (the GGN products' vectors) has no batching rule for it


def generator_for(seed: int, offset: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``seed`` and the chunk's first sample ``offset``."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(offset)) % (2**63 - 1))
    return generator


def draw_categorical(
    probabilities: Tensor, draws: int, generator: torch.Generator | Sequence[torch.Generator]
) -> Tensor:
    """``draws`` labels per row of ``probabilities`` ``(N, V)`` (rows summing to 1), drawn with
    replacement: ``(N, draws)`` int64.

    By the inverse of each row's cumulative distribution (a cumulative sum in the probabilities'
    dtype and a binary search per draw): ``O(N V)`` once plus ``O(N draws log V)``, where
    ``torch.multinomial`` costs about 15 times more over a vocabulary of 50,257 on a CPU (400 vs
    26 ms for 127 positions, one thread). Each row's total (the last entry of its cumulative sum)
    scales the uniforms, so rows need not be normalized exactly; a float32 sum's rounding (about
    ``sqrt(V)`` x 6e-8 of the total) moves a class's probability by less than that, far below the
    sampling noise of the Fisher estimate.

    ``generator``: one generator for all rows, or one per group of rows (``N`` split into
    ``len(generator)`` equal consecutive groups, e.g. the positions of each sample), so that a
    sample's draws do not depend on the other rows it is drawn with.
    """
    n, vocab = probabilities.shape
    dtype, device = probabilities.dtype, probabilities.device
    if isinstance(generator, torch.Generator):
        uniform = torch.rand(n, draws, generator=generator, dtype=dtype, device=device)
    else:
        rows = n // max(len(generator), 1)
        if rows * len(generator) != n:
            raise ValueError(f"{n} rows do not split into {len(generator)} equal groups.")
        uniform = torch.cat([torch.rand(rows, draws, generator=g, dtype=dtype, device=device) for g in generator])
    if vocab < CDF_TWO_LEVEL:
        cdf = probabilities.cumsum(dim=-1)
        labels = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
        return labels.clamp_(max=vocab - 1)
    return _two_level_inverse_cdf(probabilities, uniform)


CDF_BLOCK = 256
"""Classes per block of :func:`_two_level_inverse_cdf`."""
CDF_TWO_LEVEL = 32 * CDF_BLOCK
"""From this many classes :func:`draw_categorical` searches block sums first (below, one cumulative sum)."""


def _two_level_inverse_cdf(probabilities: Tensor, uniform: Tensor) -> Tensor:
    """The labels ``(N, draws)`` of :func:`draw_categorical` for uniforms ``(N, draws)``, searching the
    cumulative sums of blocks of :data:`CDF_BLOCK` classes, then the cumulative sum of the chosen
    block only: one reading pass over ``(N, V)`` (the block sums) instead of a sequential cumulative
    sum (75 vs 20 ms for 512 positions over 50,257 classes, one thread). The same uniforms give the
    same labels as the one cumulative sum up to its rounding (a uniform within a float32 rounding
    of a class boundary may fall on the other side)."""
    n, vocab = probabilities.shape
    draws = uniform.shape[1]
    block = CDF_BLOCK
    full = vocab // block * block
    sums = probabilities[:, :full].reshape(n, -1, block).sum(-1)  # (N, blocks)
    if full < vocab:
        sums = torch.cat([sums, probabilities[:, full:].sum(-1, keepdim=True)], dim=1)
    blocks = sums.shape[1]
    cumulative = sums.cumsum(dim=-1)
    target = uniform * cumulative[:, -1:]  # (N, draws)
    chosen = torch.searchsorted(cumulative, target, right=True).clamp_(max=blocks - 1)
    before = torch.where(chosen > 0, cumulative.gather(1, (chosen - 1).clamp_min(0)), torch.zeros_like(target))
    columns = chosen.unsqueeze(-1) * block + torch.arange(block, device=chosen.device)  # (N, draws, B)
    inside = probabilities.gather(1, columns.clamp(max=vocab - 1).reshape(n, -1)).reshape(n, draws, block)
    inside = inside.masked_fill_(columns >= vocab, 0).cumsum(dim=-1)
    offset = torch.searchsorted(inside, (target - before).unsqueeze(-1), right=True).squeeze(-1)
    return (chosen * block + offset.clamp_(max=block - 1)).clamp_(max=vocab - 1)


def closed_form_is_tested(output_loss: Any) -> bool:
    """Whether ``output_loss`` is one of :mod:`dask_influence.tasks`' own output losses, whose
    closed-form output curvature (``curvature_product``, ``sampled_roots``) the test suite checks
    against autograd's dense GGN (tests/core/test_large_outputs.py): the per-fit check of
    :meth:`~dask_influence.core.solvers.ekfac.OutputCurvature.check_sampled` (a double backward
    through the loss in float64: seconds for one sequence over a 50,257-token vocabulary) is then
    skipped. A user's own task with a ``curvature_product`` is still checked."""
    return type(output_loss).__module__ == "dask_influence.tasks" and hasattr(output_loss, "curvature_product")


def softmax_sampled_roots(
    logits: Tensor,
    draws: int,
    generator: torch.Generator | Sequence[torch.Generator],
    weight: Tensor | None = None,
) -> Tensor:
    """Sampled square roots of ``w * (diag(p) - p p^T)`` per position: ``(draws, *logits.shape)``.

    ``v_k = sqrt(w / draws) * (p - e_{y_k})`` with ``y_k ~ Categorical(p)`` drawn independently
    per position and draw, classes along the LAST dimension of ``logits`` ``(..., V)``;
    ``weight`` ``(...)`` (or ``None`` for 1). ``E[sum_k v_k v_k^T] = w (diag(p) - p p^T)``
    per position, and different positions' vectors are uncorrelated, so one vector per draw
    serves every position of a sample. In the logits' dtype; ``p`` is computed in float32 at
    least. ``generator``: one, or one per sample (the leading dimension of ``logits``), see
    :func:`draw_categorical`.
    """
    if draws < 1:
        raise ValueError(f"draws must be a positive int; got {draws!r}.")
    vocab = logits.shape[-1]
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.detach().to(wide), dim=-1)
    flat = p.reshape(-1, vocab)
    labels = draw_categorical(flat, draws, generator)  # (N, draws)
    scale = torch.full(p.shape[:-1], 1.0 / draws, dtype=wide, device=logits.device)
    if weight is not None:
        scale = scale * weight.to(wide)
    root = scale.sqrt_().reshape(-1)  # (N,): sqrt(w / draws) per position
    out = p.mul_(root.view(p.shape[:-1]).unsqueeze(-1)).unsqueeze(0)  # (draws, ..., V): p scaled in place
    if draws > 1:
        out = out.expand(draws, *p.shape).clone()
    view = out.view(draws, -1, vocab)  # sqrt(w/d) (p - e_y): subtract sqrt(w/d) at each drawn label
    view.scatter_add_(2, labels.T.unsqueeze(2), (-root).expand(draws, -1).unsqueeze(2))
    return out.to(logits.dtype)


def gaussian_sampled_roots(outputs: Tensor, variance: float, draws: int, generator: torch.Generator) -> Tensor:
    """Sampled square roots of ``variance * I``: ``sqrt(variance / draws) z_k``, ``z_k ~ N(0, I)``:
    ``(draws, *outputs.shape)`` in the outputs' dtype."""
    if draws < 1:
        raise ValueError(f"draws must be a positive int; got {draws!r}.")
    z = torch.randn((draws, *outputs.shape), generator=generator, dtype=outputs.dtype, device=outputs.device)
    return z * math.sqrt(variance / draws)


def _plain_cross_entropy(loss: Any) -> bool:
    """Whether ``loss`` is an ``nn.CrossEntropyLoss`` whose Hessian in the logits is ``diag(p) - p p^T``
    per sample (no class weights, mean reduction; label smoothing does not change it)."""
    return isinstance(loss, nn.CrossEntropyLoss) and loss.weight is None and loss.reduction == "mean"


def _plain_mse(loss: Any) -> bool:
    return isinstance(loss, nn.MSELoss) and loss.reduction == "mean"


def _pair_loss(output_loss: Any) -> Any:
    """The ``loss(outputs, targets)`` inside a pair task's output loss, or ``None``."""
    return getattr(output_loss, "fn", None)


def hessian_form(output_loss: Any, outputs: Tensor, batch: Any) -> Callable[[Tensor], Tensor] | None:
    """``u -> H u``: the Hessian of the BATCH's mean loss in its outputs times ``u`` (shaped as
    ``outputs``) in closed form, or ``None`` when the loss has none (the caller differentiates it
    instead). Learning which form applies computes no product (over a large vocabulary one is
    seconds of memory traffic).

    Closed forms: an output loss's own ``curvature_product(outputs, batch, u)`` (the ready-made
    tasks of :mod:`dask_influence.tasks`), and a pair task of a plain ``nn.CrossEntropyLoss``
    (``(n, c)`` logits) or ``nn.MSELoss``.
    """
    own = getattr(output_loss, "curvature_product", None)
    if own is not None:
        return lambda u: own(outputs, batch, u)
    loss = _pair_loss(output_loss)
    if _plain_cross_entropy(loss) and outputs.ndim == 2:
        targets = batch[1]
        if targets.dtype.is_floating_point:  # class probabilities (summing to 1): every sample counts
            return lambda u: softmax_hessian_product(outputs, u) / outputs.shape[0]
        kept = targets != loss.ignore_index  # the mean runs over the labels not ignored
        return lambda u: softmax_hessian_product(outputs, u, kept.to(u.dtype) / kept.sum().clamp_min(1))
    if _plain_mse(loss):
        return lambda u: u * (2.0 / outputs.numel())
    return None


def sampled_roots(
    output_loss: Any,
    kind: str | None,
    outputs: Tensor,
    batch: Any,
    draws: int,
    generator: torch.Generator | Sequence[torch.Generator],
) -> Tensor | None:
    """Sampled roots ``(draws, n, *outputs.shape[1:])`` of each sample's output Hessian, or ``None``.

    Args:
        output_loss: the task's ``output_loss(outputs, batch)``; its own
            ``sampled_roots(outputs, batch, draws, generator)`` is used when it has one (the
            causal-LM task: every predicted position, weighted as the loss weighs it).
        kind: ``"classification"`` (softmax cross-entropy over ``(n, c)`` logits) or
            ``"regression"`` (mean squared error, ``H = (2/c) I`` per sample), or ``None``.
        outputs: the model outputs ``(n, ...)``.
        batch: the batch they belong to.
        draws: labels drawn per position (one backward pass each).
        generator: the source of randomness (:func:`generator_for`), or one per sample for the
            softmax forms (:func:`draw_categorical`).
    """
    own = getattr(output_loss, "sampled_roots", None)
    if own is not None and kind is None:
        return own(outputs, batch, draws, generator)
    if kind == "classification" and outputs.ndim == 2:
        return softmax_sampled_roots(outputs, draws, generator)
    if kind == "regression":
        if not isinstance(generator, torch.Generator):  # drawn sample by sample (seeded_sampled_roots)
            raise TypeError("Gaussian roots take one generator; draw them sample by sample.")
        return gaussian_sampled_roots(outputs, 2.0 / outputs[0].numel(), draws, generator)
    return None


def seeded_sampled_roots(
    output_loss: Any, kind: str | None, outputs: Tensor, batch: Any, draws: int, seed: int, offset: int
) -> Tensor | None:
    """:func:`sampled_roots` with each sample's labels drawn from its own generator, seeded by
    ``seed`` and the sample's index ``offset + j`` in the data: ``(draws, n, *outputs.shape[1:])``,
    the same draws however the data is split into blocks and chunks; ``None`` as
    :func:`sampled_roots`.

    The ready-made softmax forms (the causal-LM task, cross-entropy over ``(n, c)`` logits) take
    the samples' generators at once and draw the whole chunk in one pass (:func:`draw_categorical`);
    other forms are drawn sample by sample."""
    from . import batches

    generators = [generator_for(seed, offset + j, outputs.device) for j in range(outputs.shape[0])]
    if (kind == "classification" and outputs.ndim == 2) or getattr(output_loss, "draws_per_sample", False):
        return sampled_roots(output_loss, kind, outputs, batch, draws, generators)
    parts = []
    for j, generator in enumerate(generators):
        part = sampled_roots(
            output_loss, kind, outputs[j : j + 1], batches.slice_rows(batch, j, j + 1), draws, generator
        )
        if part is None:
            return None
        parts.append(part)
    return torch.cat(parts, dim=1)
