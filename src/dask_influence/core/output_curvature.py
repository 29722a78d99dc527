"""The loss's curvature in the model outputs: square roots ``S`` with ``S S^T = H_out``.

EK-FAC back-propagates them to build its output-side Kronecker factors ``G``, and the
gradient index projects the GGN with them: closed forms for cross-entropy on logits and mean
squared error (:data:`OUTPUT_CURVATURES`), an output loss's own ``curvature_roots`` (the causal-LM task),
the loss's Hessian by autograd, or the sampled true Fisher (labels drawn from the model,
:mod:`.sampled_fisher`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from . import batches
from .gradients import LossFn
from .sampled_fisher import closed_form_is_tested, seeded_sampled_roots, softmax_hessian_product

OUTPUT_CURVATURES = ("classification", "regression", "autograd")
"""EK-FAC's ``output_curvature`` (formerly ``task``): a closed form of the loss's Hessian in the
outputs, or ``"autograd"`` (the loss's own Hessian, taken by autograd)."""

# The largest per-sample output (entries) whose Hessian EK-FAC takes by autograd (c x c per sample).
MAX_AUTOGRAD_OUTPUTS = 4096


class OutputCurvature:
    """Per-sample square roots ``S`` with ``S S^T = H_out``, the Hessian of one sample's loss in its outputs.

    ``"classification"``: cross-entropy on logits, ``H_out = diag(p) - p p^T`` with
    ``p = softmax``, factored as ``S = diag(sqrt p) - p sqrt(p)^T`` (exact also for
    near-uniform ``p``). ``"regression"``: mean squared error over ``c`` outputs,
    ``H_out = (2/c) I``. ``None``: the output loss's ``curvature_roots`` when it has that
    method (the causal-LM task: per-position softmax blocks), else the loss's own Hessian by
    autograd, factored by ``eigh``; ``"autograd"``: always the latter.
    """

    def __init__(self, output_loss: Callable[[Tensor, Any], Tensor], kind: str | None):
        self.output_loss = output_loss
        # an output loss may give its Hessian's roots in closed form (di.tasks.causal_lm's does):
        # ``curvature_roots(outputs, batch) -> (r, n, *outputs.shape[1:])``, checked like the
        # others; output_curvature="autograd" declines it
        self.closed_form: Callable[[Tensor, Any], Tensor] | None = (
            getattr(output_loss, "curvature_roots", None) if kind is None else None
        )
        self.kind = None if kind == "autograd" else kind
        """``"classification"``, ``"regression"`` or ``None`` (the loss's own roots or Hessian)."""

    def sample_loss(self, o: Tensor, sample: Any) -> Tensor:
        """The loss of one sample's outputs ``o`` (without the sample dimension)."""
        return self.output_loss(o.unsqueeze(0), batches.unsqueeze(sample))

    def can_sample(self, outputs: Tensor) -> bool:
        """Whether the sampled Fisher is known for these outputs: softmax cross-entropy over
        ``(n, c)`` logits, mean squared error, or an output loss with ``sampled_roots`` (the
        causal-LM task)."""
        if self.kind == "classification":
            return outputs.ndim == 2
        if self.kind == "regression":
            return True
        return self.closed_form is not None and hasattr(self.output_loss, "sampled_roots")

    def sampled(self, outputs: Tensor, targets: Any, draws: int, seed: int, offset: int) -> Tensor:
        """Sampled roots ``(draws, n, *outputs.shape[1:])``, each sample's labels seeded by ``seed``
        and its index ``offset + j`` (:func:`~dask_influence.core.sampled_fisher.seeded_sampled_roots`)."""
        kind = self.kind if self.kind in ("classification", "regression") else None
        roots = seeded_sampled_roots(self.output_loss, kind, outputs, targets, draws, seed, offset)
        assert roots is not None  # can_sample() was asked first
        return roots

    def expected_product(self, outputs: Tensor, targets: Any, u: Tensor) -> Tensor:
        """The batch mean loss's Hessian in the outputs times ``u``, as the sampled Fisher
        estimates it (its expectation): ``(n, *outputs.shape[1:])``."""
        n = outputs.shape[0]
        if self.kind == "classification":
            return softmax_hessian_product(outputs, u) / n
        if self.kind == "regression":
            return u * (2.0 / outputs.numel())
        product = self.output_loss.curvature_product(outputs, targets, u)  # type: ignore[attr-defined]
        return cast(Tensor, product)

    def check_sampled(self, outputs: Tensor, targets: Any) -> None:
        """Check the sampled Fisher's expectation against the loss's own Hessian-vector product on
        a few samples (float64, one random vector); raise if they differ. Skipped for the ready-made
        tasks, whose closed forms the test suite checks (:func:`closed_form_is_tested`)."""
        if closed_form_is_tested(self.output_loss):
            return
        o = outputs[:8].detach().double()
        y = batches.map_leaves(lambda t: t.double() if t.is_floating_point() else t, batches.slice_rows(targets, 0, 8))
        u = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(o.device)

        def hvp(z: Tensor, targets: Any, v: Tensor) -> Tensor:  # reverse over reverse: no forward-mode levels
            def loss(w: Tensor) -> Tensor:
                return self.output_loss(w, targets)

            return torch.func.vjp(grad(loss), z)[1](v)[0]

        try:
            exact = hvp(o, y, u)
        except Exception:  # the loss needs its own dtype: compare there
            o, u, y = outputs[:8].detach(), u.to(outputs.dtype), batches.slice_rows(targets, 0, 8)
            exact = hvp(o, y, u)
        closed = self.expected_product(o, y, u)
        scale = max(float(exact.abs().max()), float(closed.abs().max()), 1e-300)
        error = float((closed - exact).abs().max())
        tol = max(1e-8, 64 * torch.finfo(o.dtype).eps) * scale
        if error > tol:
            form = {
                "classification": "diag(p) - p p^T of softmax cross-entropy",
                "regression": "(2/c) I of mean squared error",
            }.get(str(self.kind), f"{type(self.output_loss).__name__}.curvature_product")
            raise ValueError(
                f"The sampled Fisher assumes the loss's Hessian in the outputs is {form}, but the loss's own "
                f"Hessian-vector product differs by {error:.3e} (of {scale:.3e}). Pass output_curvature='autograd' "
                "and fisher='exact' to use the loss's own Hessian."
            )

    def gradients(self, outputs: Tensor, targets: Any) -> Tensor:
        """Per-sample ``dL_j/do_j`` at the true targets, as ``(1, n, *outputs.shape[1:])``.

        ``targets`` is the batch the outputs belong to (the task's loss reads its labels)."""
        return vmap(grad(self.sample_loss))(outputs, targets).unsqueeze(0)

    def hessians(self, outputs: Tensor, targets: Any) -> Tensor:
        """``H_out`` of each sample by autograd: ``(n, c, c)``."""
        n, c = outputs.shape[0], outputs[0].numel()
        return vmap(jacrev(jacrev(self.sample_loss)))(outputs, targets).reshape(n, c, c)

    def wide_hessians(self, outputs: Tensor, targets: Any) -> tuple[Tensor, float]:
        """``H_out`` of each sample as float64 ``(n, c, c)``, and the machine epsilon it was computed with.

        Lower-precision outputs (a float32 model) are widened to float64 first, so the loss's
        Hessian at them carries float64 rounding, not the cancellation of float32 terms
        (``diag(p) - p p^T`` loses ``eps * max(p)`` per entry, however small the entry).
        A loss that cannot take float64 outputs (float32 buffers, such as class weights) is
        differentiated in the outputs' own dtype instead.
        """
        if outputs.dtype != torch.float64 and getattr(self, "_widen", True):
            wide_targets = batches.map_leaves(lambda t: t.double() if t.is_floating_point() else t, targets)
            try:
                return self.hessians(outputs.double(), wide_targets), torch.finfo(torch.float64).eps
            except Exception:  # the loss needs its own dtype: remember, and fall back to it
                self._widen = False
        return self.hessians(outputs, targets).double(), torch.finfo(outputs.dtype).eps

    def roots(self, outputs: Tensor, targets: Any) -> Tensor:
        """The columns of ``S`` as back-propagation vectors: ``(c, n, *outputs.shape[1:])``."""
        n, c = outputs.shape[0], outputs[0].numel()
        if self.kind == "classification" and outputs.ndim == 2:
            p = torch.softmax(outputs.double(), dim=1)
            s = p.sqrt()
            root = torch.diag_embed(s) - p[:, :, None] * s[:, None, :]
        elif self.kind == "regression":
            root = math.sqrt(2.0 / c) * torch.eye(c, dtype=torch.float64, device=outputs.device).expand(n, c, c)
        elif c > MAX_AUTOGRAD_OUTPUTS:
            if self.closed_form is not None:
                cost = f"up to {c:,} backward passes per batch"
                fix = (
                    "fisher='sampled' (the default fisher='auto' samples here), or shorter sequences or a "
                    "smaller vocabulary"
                )
            else:
                cost = f"its Hessian there by autograd, a {c:,} x {c:,} matrix per sample and {c:,} backward passes"
                fix = "or a task with a closed form (output_curvature='classification' for (n, c) logits)"
            raise ValueError(
                f"EK-FAC back-propagates each root of the loss's Hessian in the model outputs, and the outputs "
                f"have {c:,} entries per sample ({tuple(outputs.shape[1:])}): {cost}. Use a solver that needs "
                f"only curvature products (CgInfluence or ArnoldiInfluence with curvature='ggn'), {fix}."
            )
        elif self.closed_form is not None:
            return self.closed_form(outputs, targets)
        else:
            h, eps = self.wide_hessians(outputs, targets)
            values, vectors = torch.linalg.eigh(0.5 * (h + h.transpose(1, 2)))
            # A convex loss's Hessian can show negative eigenvalues of the size of its rounding
            # (cross-entropy's zero eigenvalue along the ones vector; a confident sample, whose
            # whole Hessian is tiny): an eigenvalue counts as negative only beyond a tolerance
            # relative to the largest curvature in the batch and to the precision it was
            # computed in (about c * eps per entry).
            rel = max(1e-6, 64 * c * eps)
            floor = -rel * float(values.abs().max())
            if bool((values < floor).any()):
                raise ValueError(
                    "The loss is not convex in the model outputs (its Hessian there has a negative "
                    f"eigenvalue, {float(values.min()):.3e}); K-FAC's Gauss-Newton curvature needs "
                    "a convex loss such as cross-entropy or mean squared error."
                )
            root = vectors * values.clamp_min(0).sqrt()[:, None, :]
        return root.to(outputs.dtype).permute(2, 0, 1).reshape(c, *outputs.shape)

    def check(self, outputs: Tensor, targets: Any) -> None:
        """Check a closed form against the loss's own Hessian on a few samples; raise if they differ."""
        if self.kind is None and self.closed_form is None:
            return
        o, y = outputs[:8].detach(), batches.slice_rows(targets, 0, 8)
        c = o[0].numel()
        exact, eps = self.wide_hessians(o, y)
        root = self.roots(o, y).double().reshape(-1, o.shape[0], c).permute(1, 2, 0)
        closed = root @ root.transpose(1, 2)
        # Both sides carry rounding of the terms they are made of, not of their (possibly
        # tiny, cancelled) entries: diag(p) and p p^T of a confident sample are near 1 while
        # diag(p) - p p^T is near 0; S is stored in the outputs' dtype. So the tolerance is
        # relative to the largest term and to the coarsest precision involved.
        if self.kind == "classification" and o.ndim == 2:
            terms = float(torch.softmax(o.double(), dim=1).max())
        elif self.kind == "regression":
            terms = 2.0 / c
        else:
            terms = 0.0
        scale = max(float(exact.abs().max()), float(closed.abs().max()), terms)
        eps = max(eps, torch.finfo(o.dtype).eps if o.is_floating_point() else eps)
        tol = max(1e-8, 64 * c * eps) * scale
        error = float((closed - exact).abs().max())
        if error > tol:
            if self.kind is None:
                raise ValueError(
                    f"The output loss's curvature_roots ({type(self.output_loss).__name__}) differ from the "
                    f"loss's own Hessian in the outputs by {error:.3e}; fix curvature_roots, or pass "
                    "output_curvature='autograd' to use the loss's own Hessian."
                )
            form = {
                "classification": "diag(p) - p p^T of softmax cross-entropy",
                "regression": "(2/c) I of mean squared error",
            }[self.kind]
            raise ValueError(
                f"output_curvature={self.kind!r} assumes the loss's Hessian in the outputs is {form}, but the "
                f"loss's own Hessian differs by {error:.3e}. Pass output_curvature='autograd' to use the loss's "
                "own Hessian."
            )


def infer_output_curvature(loss: LossFn | None, kind: str | None) -> str | None:
    """The output curvature ``kind`` (:data:`OUTPUT_CURVATURES`), or the one of the loss's type;
    ``None`` means the loss's own Hessian is used."""
    if kind is not None:
        if kind not in OUTPUT_CURVATURES:
            raise ValueError(
                f"output_curvature must be 'classification', 'regression', 'autograd' or None; got {kind!r}."
            )
        return kind
    if isinstance(loss, nn.CrossEntropyLoss):
        return "classification"
    if isinstance(loss, nn.MSELoss):
        return "regression"
    return None
