"""EkfacInfluence: K-FAC and eigenvalue-corrected K-FAC (EK-FAC) for Linear, Conv2d, Embedding
and Hugging Face Conv1D layers.

The curvature is the generalized Gauss-Newton matrix of the MEAN training loss (for
cross-entropy: the true Fisher of the model's predictive distribution, not the empirical
Fisher; taken exactly by back-propagating the roots of the loss's Hessian in the outputs, or,
where those are more than :data:`EXACT_ROOTS_BUDGET` per sample (a language model's
``(T - 1) V``), sampled with labels drawn from the model: ``fisher``), approximated
block-diagonally per layer by ``G (x) A``; see :mod:`dask_influence.core.kronecker` for the
conventions. ``fit`` makes one pass over the training data for ``A`` and ``G`` and, with
``update_diagonal=True``, a second pass for the corrected eigenvalues. Up-weighting
influences and self-influences are computed layer by layer from per-sample output gradients
``g`` and inputs ``a``: the flat ``(n, p)`` per-sample gradients of the training points are
never formed. Influence factors keep the
library's ``(n_test, p)`` layout, so every solver's factors are interchangeable.

Memory is estimated before any pass (``memory_budget``): at construction from the layers'
shapes (a side whose dense factor does not fit is kept diagonal, with a warning, or the fit is
refused in one line), and on the first training batch from one sample's forward (chunks sized
to the budget, or a one-line refusal).

Trainable parameters outside the supported layers (LayerNorm, ``nn.MultiheadAttention``'s
projections, bare ``nn.Parameter``s) or outside ``layers=`` are left out, with one warning
naming them (:func:`find_layers`): EK-FAC treats them as frozen, so their entries of the
influence factors (and their rows and columns of the curvature) are zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from ... import progress as _progress
from ...errors import NonFiniteError, NotFittedError
from .. import batches
from ..blocks import BlockSums
from ..gradients import _FORWARD_LOCK, LossFn, ParamSpec
from ..kronecker import (
    Capture,
    FactorSums,
    KroneckerLayer,
    LayerFactors,
    check_layer_positive,
    corrected_eigenvalue_sum,
    layer_grads,
    layer_kind,
    self_contract,
    rotated_square_sum,
    tied_layer_grads,
    tied_pieces,
    up_contract,
)
from ..operators import LinearOperator
from ..sampled_fisher import closed_form_is_tested, seeded_sampled_roots, softmax_hessian_product
from ..serialization import serializable
from ..task import Task
from .base import InfluenceModel
from .config import SolverConfig, check_positive_int, check_seed, hyperparameter
from .registry import register

__all__ = ["EkfacInfluence", "EkfacState", "find_layers", "left_out_parameters"]

SUPPORTED_LAYERS = ("nn.Linear", "nn.Conv2d (groups=1)", "nn.Embedding", "Hugging Face Conv1D")
"""The layers EK-FAC factors (:func:`~dask_influence.core.kronecker.layer_kind`); other trainable
parameters are left out (treated as frozen) with one warning."""
TASKS = ("classification", "regression", "autograd")
TIED_CHOICES = ("exclude", "head")
"""EK-FAC's ``tied``: a weight shared by a token embedding and an LM head is left out, or
factored through its LM-head use (a diagonal vocabulary side, both uses' gradients counted)."""
FISHER_CHOICES = ("auto", "exact", "sampled")
"""EK-FAC's ``fisher``: the output curvature's exact roots, the sampled Fisher, or the cheaper."""
EXACT_ROOTS_BUDGET = 256
"""``fisher="auto"`` back-propagates the exact roots of the loss's Hessian in the outputs while
they are at most this many per sample (each is one backward pass per chunk: ``c`` for a
``c``-class classifier, ``(T - 1) V`` for a causal LM), and the sampled Fisher
(``fisher_draws`` backward passes per chunk) beyond."""
"""EK-FAC's ``task``: a closed form of the loss's Hessian in the outputs, or ``"autograd"``
(the loss's own Hessian, taken by autograd)."""


@serializable
@dataclass(frozen=True)
class EkfacState:
    """The fitted state: per-layer Kronecker eigenbases, ``O(sum_l d_in^2 + d_out^2)`` numbers.

    Attributes:
        layers: one :class:`~dask_influence.core.kronecker.LayerFactors` per layer, in the
            order of the flat parameter vector.
        n_train: the number of training samples the factors average over.
    """

    layers: tuple[LayerFactors, ...]
    n_train: int

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = [t for f in self.layers for t in (f.q_a, f.lambda_a, f.q_g, f.lambda_g, f.corrected) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


# -- which layers, and where their parameters sit ------------------------------------------------
def _freeze_hint(module_name: str, param_name: str) -> str:
    """How to freeze one parameter: its module's ``requires_grad_(False)``, or the bare parameter's."""
    if module_name:
        return f"model.get_submodule('{module_name}').requires_grad_(False)"
    return f"model.{param_name}.requires_grad_(False)"


# The largest per-sample output (entries) whose Hessian EK-FAC takes by autograd (c x c per sample).
MAX_AUTOGRAD_OUTPUTS = 4096

# Up to this many parameters EK-FAC scores by flat per-sample gradients (vmap + one product),
# which beat its per-layer contractions there (measured in docs/benchmarks.md).
FLAT_SCORING_MAX_PARAMS = 50_000


def left_out_parameters(spec: ParamSpec, layers: Sequence[KroneckerLayer]) -> list[str]:
    """The trainable parameters (names as in ``spec.names``, in flat order) that no layer of ``layers`` covers.

    EK-FAC treats them as frozen: their entries of the influence factors ``(n_test, p)`` and
    their rows and columns of the curvature are zero, so they add nothing to influences.
    """
    covered = {span for layer in layers for span in (layer.weight, layer.bias) if span is not None}
    return [name for name, start, stop in spec.offsets() if (start, stop) not in covered]


def _warn_fallback(message: str) -> None:
    """One ``UserWarning``, attributed to the first caller outside the package."""
    import os
    import sys
    import types
    import warnings

    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    frame: types.FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _warn_left_out(names: Sequence[str], hints: Sequence[str], chosen: bool, tied: Sequence[str] = ()) -> None:
    """One ``UserWarning`` naming the left-out parameters, attributed to the first caller outside the package."""
    import os
    import sys
    import types
    import warnings

    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    frame: types.FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    shown = ", ".join(names[:50]) + (f", and {len(names) - 50} more" if len(names) > 50 else "")
    freeze = "; ".join(dict.fromkeys(hints[:5])) + ("; ..." if len(dict.fromkeys(hints)) > 5 else "")
    where = "not in layers= or " if chosen else ""
    warnings.warn(
        f"EK-FAC leaves out {len(names)} trainable parameter{'s' if len(names) != 1 else ''} ({shown}): they "
        f"are {where}not in a layer it factors ({', '.join(SUPPORTED_LAYERS)}). It treats them as frozen: their "
        "entries of the influence factors and their rows and columns of the curvature are zero, so they add "
        "nothing to influences. Pass layers=[...] to choose the layers, or freeze them to silence this "
        f"warning ({freeze}).{''.join(' ' + note for note in tied)}",
        UserWarning,
        stacklevel=level,
    )


def _refusal(module: nn.Module, mname: str, pname: str) -> str | None:
    """Why a supported-kind module cannot be factored (an error), or ``None``."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (
            f"Layer '{mname}' is a grouped Conv2d (groups={module.groups}), which EkfacInfluence "
            f"does not support; freeze it with {_freeze_hint(mname, pname)}."
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return (
            f"Layer '{mname}' is an nn.Embedding with max_norm={module.max_norm}: its forward renormalizes "
            "the rows it reads in place, so the weights change during the forward and its curvature is "
            f"not that of a fixed layer. Build it with max_norm=None, or freeze it with {_freeze_hint(mname, pname)}."
        )
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return (
            f"Layer '{mname}' is an nn.Embedding with scale_grad_by_freq=True: its gradient is scaled by "
            "the token frequencies of the whole mini-batch, so it is not a sum of per-sample gradients. "
            f"Build it with scale_grad_by_freq=False, or freeze it with {_freeze_hint(mname, pname)}."
        )
    return None


def find_layers(
    model: nn.Module, spec: ParamSpec, layers: Sequence[str] | None = None, tied: str = "exclude"
) -> list[KroneckerLayer]:
    """The supported layers that hold trainable parameters, in flat-vector order.

    Supported (see :data:`SUPPORTED_LAYERS`): ``nn.Linear``, ``nn.Conv2d`` with ``groups=1``,
    ``nn.Embedding`` (without ``max_norm`` and ``scale_grad_by_freq``) and Hugging Face's
    ``Conv1D`` (GPT-2; detected without importing ``transformers``). Every other trainable
    parameter (a LayerNorm, ``nn.MultiheadAttention``'s projections, a bare ``nn.Parameter``,
    a module outside ``layers``) is LEFT OUT: EK-FAC treats it as frozen (its entries of the
    ``(n_test, p)`` influence factors are zero; :func:`left_out_parameters` lists them), and
    one ``UserWarning`` names them.

    Args:
        model: the model whose trainable parameters ``spec`` describes.
        spec: the layout of the flat ``(p,)`` parameter vector.
        layers: names of modules (as in ``model.named_modules()``) to include; ``None``
            includes every supported module with trainable parameters.
        tied: what to do with a weight tied between an ``nn.Embedding`` and an ``nn.Linear``
            (GPT-2's ``wte`` and ``lm_head``; :data:`TIED_CHOICES`): ``"exclude"`` leaves it out
            (the warning names it), ``"head"`` factors it as the head's layer with the
            embedding's use attached (:attr:`KroneckerLayer.tied_use`). Other shared
            parameters are always left out.

    Returns:
        one :class:`~dask_influence.core.kronecker.KroneckerLayer` per included module, in
        the order of the flat vector.

    Raises:
        ValueError: a trainable parameter of a module in ``layers`` is shared with another
            module (tied weights are left out by default), or belongs to an embedding with
            ``sparse=True`` (whose gradient ``torch.func`` cannot take per sample); a grouped
            Conv2d or an embedding with ``max_norm``/``scale_grad_by_freq`` would be included;
            or ``layers`` names an unknown or unsupported module, or one without trainable
            parameters.
    """
    modules = dict(model.named_modules())
    # nn.MultiheadAttention reads its out_proj's weight directly (never calling its forward),
    # so that nn.Linear's inputs and output gradients cannot be captured
    functional = {
        f"{name}.{child}" if name else child
        for name, module in modules.items()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    if layers is not None:
        if isinstance(layers, str):
            raise TypeError(
                f"layers must be a list of module names; got the string {layers!r}. Use layers=[{layers!r}]."
            )
        for name in layers:
            if name not in modules:
                raise ValueError(
                    f"layers names '{name}', which is not a module of the model; known names: {sorted(modules)[:20]}."
                )
            if layer_kind(modules[name]) is None:
                raise ValueError(
                    f"layers names '{name}' ({type(modules[name]).__name__}); EkfacInfluence supports "
                    f"only {', '.join(SUPPORTED_LAYERS)} layers."
                )
            if name in functional:
                raise ValueError(
                    f"layers names '{name}', a projection of an nn.MultiheadAttention, which uses its "
                    "weights directly instead of calling it, so K-FAC cannot see its inputs; drop it from layers."
                )
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            if (mname, pname) not in owners.setdefault(id(param), []):
                owners[id(param)].append((mname, pname))
    named = dict(model.named_parameters())
    offsets = {name: (start, stop) for name, start, stop in spec.offsets()}
    found: dict[str, dict[str, Any]] = {}
    left_out: list[str] = []
    hints: list[str] = []
    tied_notes: list[str] = []
    for full in spec.names:
        places = sorted(set(owners[id(named[full])]))
        if len({m for m, _ in places}) > 1:
            sharing = [m for m, _ in places]
            pair = _tied_pair(modules, places)
            if pair is not None and tied == "head" and (layers is None or pair[0] in layers):
                use = pair[1]
                refusal = _refusal(modules[use], use, "weight")
                if refusal is not None:
                    raise ValueError(refusal)
                found.setdefault(pair[0], {"module": modules[pair[0]]})["weight"] = offsets[full]
                found[pair[0]]["tied_use"] = KroneckerLayer.of(use, modules[use], offsets[full], None)
                tied_notes.append(
                    f"EK-FAC factors the tied parameter '{full}' (shared by '{pair[1]}' and '{pair[0]}') through "
                    f"its '{pair[0]}' use (tied='head'): K-FAC's factors come from the head's inputs and output "
                    f"gradients, with the vocabulary side ({modules[pair[0]].weight.shape[0]:,}) kept DIAGONAL; the "
                    f"'{pair[1]}' use's gradient is still counted in every gradient and in the corrected "
                    "eigenvalues. tied='exclude' leaves it out instead."
                )
                continue
            if pair is not None and tied == "head" and layers is not None and pair[1] in layers:
                raise ValueError(
                    f"layers names '{pair[1]}', whose weight '{full}' is tied to '{pair[0]}'; with tied='head' "
                    f"it is factored as '{pair[0]}': name '{pair[0]}' in layers= instead."
                )
            if layers is not None and set(sharing) & set(layers):
                raise ValueError(
                    f"Parameter '{full}' is shared by modules {sharing}; K-FAC needs each trainable "
                    f"parameter in one layer. Drop them from layers=, or freeze it with "
                    f"model.get_parameter('{full}').requires_grad_(False)."
                )
            # a tied weight (GPT-2's token embedding and LM head) with tied='exclude': left out, as frozen
            if pair is not None:
                tied_notes.append(
                    f"'{full}' is tied (shared by '{pair[1]}' and '{pair[0]}'): pass tied='head' to factor it "
                    f"through its '{pair[0]}' use."
                )
            left_out.append(full)
            hints.append(f"model.get_parameter('{full}').requires_grad_(False)")
            continue
        mname, pname = places[0]
        module = modules.get(mname, model)
        if isinstance(module, nn.Embedding) and module.sparse:  # refused even when left out: see below
            raise ValueError(
                f"Layer '{mname}' is an nn.Embedding with sparse=True: torch.func cannot take the per-sample "
                "gradients of its sparse weight gradient, which influences need. Its outputs do not depend on "
                f"sparse, so set model.get_submodule('{mname}').sparse = False, or freeze it with "
                f"{_freeze_hint(mname, pname)}."
            )
        supported = layer_kind(module) is not None and pname in ("weight", "bias") and mname not in functional
        if not supported or (layers is not None and mname not in layers):
            left_out.append(full)
            hints.append(_freeze_hint(mname, pname))
            continue
        refusal = _refusal(module, mname, pname)
        if refusal is not None:
            raise ValueError(refusal)
        found.setdefault(mname, {"module": module})[pname] = offsets[full]
    for name in layers or ():
        if name not in found:
            raise ValueError(
                f"layers names '{name}', but none of its parameters is trainable; unfreeze it "
                "(requires_grad_(True)) or drop it from layers."
            )
    if left_out:
        _warn_left_out(left_out, hints, layers is not None, [n for n in tied_notes if not n.startswith("EK-FAC")])
    for note in tied_notes:
        if note.startswith("EK-FAC"):
            _warn_fallback(note)
    return [
        replace(
            KroneckerLayer.of(mname, entry["module"], entry.get("weight"), entry.get("bias")),
            tied_use=entry.get("tied_use"),
        )
        for mname, entry in found.items()
    ]


def _tied_pair(modules: dict[str, nn.Module], places: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """``(head, embedding)`` module names when a shared parameter is the ``weight`` of exactly one
    ``nn.Linear`` and one ``nn.Embedding`` (an LM head tied to the token embedding), else ``None``."""
    if len(places) != 2 or any(pname != "weight" for _, pname in places):
        return None
    heads = [m for m, _ in places if isinstance(modules.get(m), nn.Linear)]
    embeddings = [m for m, _ in places if isinstance(modules.get(m), nn.Embedding)]
    if len(heads) != 1 or len(embeddings) != 1:
        return None
    return heads[0], embeddings[0]


# -- the loss's curvature in the model outputs ---------------------------------------------------
class OutputCurvature:
    """Per-sample square roots ``S`` with ``S S^T = H_out``, the Hessian of one sample's loss in its outputs.

    ``"classification"``: cross-entropy on logits, ``H_out = diag(p) - p p^T`` with
    ``p = softmax``, factored as ``S = diag(sqrt p) - p sqrt(p)^T`` (exact also for
    near-uniform ``p``). ``"regression"``: mean squared error over ``c`` outputs,
    ``H_out = (2/c) I``. ``None``: the output loss's ``curvature_roots`` when it has that
    method (the causal-LM task: per-position softmax blocks), else the loss's own Hessian by
    autograd, factored by ``eigh``; ``"autograd"``: always the latter.
    """

    def __init__(self, output_loss: Callable[[Tensor, Any], Tensor], task: str | None):
        self.output_loss = output_loss
        # an output loss may give its Hessian's roots in closed form (di.tasks.causal_lm's does):
        # ``curvature_roots(outputs, batch) -> (r, n, *outputs.shape[1:])``, checked like the
        # others; task="autograd" declines it
        self.closed_form: Callable[[Tensor, Any], Tensor] | None = (
            getattr(output_loss, "curvature_roots", None) if task is None else None
        )
        self.task = None if task == "autograd" else task

    def sample_loss(self, o: Tensor, sample: Any) -> Tensor:
        """The loss of one sample's outputs ``o`` (without the sample dimension)."""
        return self.output_loss(o.unsqueeze(0), batches.unsqueeze(sample))

    def can_sample(self, outputs: Tensor) -> bool:
        """Whether the sampled Fisher is known for these outputs: softmax cross-entropy over
        ``(n, c)`` logits, mean squared error, or an output loss with ``sampled_roots`` (the
        causal-LM task)."""
        if self.task == "classification":
            return outputs.ndim == 2
        if self.task == "regression":
            return True
        return self.closed_form is not None and hasattr(self.output_loss, "sampled_roots")

    def sampled(self, outputs: Tensor, targets: Any, draws: int, seed: int, offset: int) -> Tensor:
        """Sampled roots ``(draws, n, *outputs.shape[1:])``, each sample's labels seeded by ``seed``
        and its index ``offset + j`` (:func:`~dask_influence.core.sampled_fisher.seeded_sampled_roots`)."""
        kind = self.task if self.task in ("classification", "regression") else None
        roots = seeded_sampled_roots(self.output_loss, kind, outputs, targets, draws, seed, offset)
        assert roots is not None  # can_sample() was asked first
        return roots

    def expected_product(self, outputs: Tensor, targets: Any, u: Tensor) -> Tensor:
        """The batch mean loss's Hessian in the outputs times ``u``, as the sampled Fisher
        estimates it (its expectation): ``(n, *outputs.shape[1:])``."""
        n = outputs.shape[0]
        if self.task == "classification":
            return softmax_hessian_product(outputs, u) / n
        if self.task == "regression":
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
            }.get(str(self.task), f"{type(self.output_loss).__name__}.curvature_product")
            raise ValueError(
                f"The sampled Fisher assumes the loss's Hessian in the outputs is {form}, but the loss's own "
                f"Hessian-vector product differs by {error:.3e} (of {scale:.3e}). Pass task='autograd' and "
                "fisher='exact' to use the loss's own Hessian."
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
        if self.task == "classification" and outputs.ndim == 2:
            p = torch.softmax(outputs.double(), dim=1)
            s = p.sqrt()
            root = torch.diag_embed(s) - p[:, :, None] * s[:, None, :]
        elif self.task == "regression":
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
        if self.task is None and self.closed_form is None:
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
        if self.task == "classification" and o.ndim == 2:
            terms = float(torch.softmax(o.double(), dim=1).max())
        elif self.task == "regression":
            terms = 2.0 / c
        else:
            terms = 0.0
        scale = max(float(exact.abs().max()), float(closed.abs().max()), terms)
        eps = max(eps, torch.finfo(o.dtype).eps if o.is_floating_point() else eps)
        tol = max(1e-8, 64 * c * eps) * scale
        error = float((closed - exact).abs().max())
        if error > tol:
            if self.task is None:
                raise ValueError(
                    f"The output loss's curvature_roots ({type(self.output_loss).__name__}) differ from the "
                    f"loss's own Hessian in the outputs by {error:.3e}; fix curvature_roots, or pass "
                    "task='autograd' to use the loss's own Hessian."
                )
            form = {
                "classification": "diag(p) - p p^T of softmax cross-entropy",
                "regression": "(2/c) I of mean squared error",
            }[self.task]
            raise ValueError(
                f"task={self.task!r} assumes the loss's Hessian in the outputs is {form}, but the "
                f"loss's own Hessian differs by {error:.3e}. Pass task='autograd' to use the loss's own Hessian."
            )


def infer_task(loss: LossFn | None, task: str | None) -> str | None:
    """The task from ``task`` or the loss's type; ``None`` means the loss's own Hessian is used."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be 'classification', 'regression', 'autograd' or None; got {task!r}.")
        return task
    if isinstance(loss, nn.CrossEntropyLoss):
        return "classification"
    if isinstance(loss, nn.MSELoss):
        return "regression"
    return None


# -- memory, known before any pass ---------------------------------------------------------------
def default_memory_budget(device: torch.device) -> int:
    """Half the machine's memory (80% of the GPU's for a CUDA device): ``memory_budget=None``."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    try:
        import psutil  # type: ignore[import-untyped]

        total = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil comes with dask
        import os

        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return total // 2


def _bytes(n: float) -> str:
    """``n`` bytes, readable: ``'1,234,567 bytes (1.2 MB)'``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{int(n):,} bytes ({n / size:.1f} {unit})"
    return f"{int(n):,} bytes"


@dataclass(frozen=True)
class FitMemory:
    """EK-FAC's fitting memory in bytes, from the layers' shapes (before any pass).

    Attributes:
        pieces: ``(layer, what, bytes)`` of every factor-sized piece: the float64 sums of
            ``A`` (``i x i``, or ``i`` when diagonal) and ``G`` (``o x o`` or ``o``), their
            float64 eigendecompositions (eigenvectors and workspace, ``2 d^2``), the fitted
            state in the model's dtype and the float64 sums of the corrected eigenvalues
            (``o x i``).
        fixed: the peak of the factor-sized pieces: the first pass's sums plus the largest
            eigendecomposition plus the state, or the state plus the second pass's sums.
    """

    pieces: tuple[tuple[str, str, int], ...]
    fixed: int

    @classmethod
    def of(
        cls, layers: Sequence[KroneckerLayer], itemsize: int, diagonal: set[tuple[str, str]], corrected: bool
    ) -> FitMemory:
        """The estimate for ``layers`` with the ``(layer, "A" | "G")`` sides in ``diagonal`` kept diagonal."""
        pieces: list[tuple[str, str, int]] = []
        sums = eigh = state = corr = 0
        for layer in layers:
            o, i = layer.shape
            for side, d, diag in (
                ("A", i, layer.diagonal_a or (layer.name, "A") in diagonal),
                ("G", o, (layer.name, "G") in diagonal),
            ):
                entries = d if diag else d * d
                pieces.append((layer.name, f"the float64 sums of its {side} ({d:,} x {d:,})", 8 * entries))
                sums += 8 * entries
                state += itemsize * (entries + d)
                if not diag:
                    pieces.append((layer.name, f"the eigendecomposition of its {side} ({d:,} x {d:,})", 16 * d * d))
                    eigh = max(eigh, 16 * d * d)
            if corrected:
                pieces.append((layer.name, f"the float64 sums of its corrected eigenvalues ({o:,} x {i:,})", 8 * o * i))
                corr += 8 * o * i
                state += itemsize * o * i
        return cls(tuple(pieces), max(sums + eigh + state, state + corr))

    def largest(self) -> tuple[str, str, int]:
        """The largest single piece ``(layer, what, bytes)``."""
        return max(self.pieces, key=lambda piece: piece[2])


def plan_factors(
    layers: Sequence[KroneckerLayer],
    itemsize: int,
    budget: int,
    corrected: bool,
    diagonal: set[tuple[str, str]] | None = None,
) -> tuple[set[tuple[str, str]], FitMemory]:
    """The sides to keep diagonal so that the factor-sized pieces fit ``budget``: the widest
    dense side first, one at a time, until they fit (or none is left), beyond those already in
    ``diagonal`` (a tied head's vocabulary side). Returns those ``(layer, "A" | "G")`` sides
    and the estimate with them."""
    diagonal = set(diagonal or ())
    memory = FitMemory.of(layers, itemsize, diagonal, corrected)
    while memory.fixed > budget:
        dense = [
            (d, layer.name, side)
            for layer in layers
            for side, d in (("A", layer.shape[1]), ("G", layer.shape[0]))
            if (layer.name, side) not in diagonal and not (side == "A" and layer.diagonal_a) and d > 1
        ]
        if not dense:
            break
        _, name, side = max(dense)
        diagonal.add((name, side))
        memory = FitMemory.of(layers, itemsize, diagonal, corrected)
    return diagonal, memory


# -- the per-block function of both fitting passes -----------------------------------------------
def ekfac_block(
    solver: EkfacInfluence,
    batch: Any,
    start: int,
    weight: float,
    payload: tuple[str, Sequence[LayerFactors] | None],
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """One block's float64 sums of a fitting pass (:meth:`EkfacInfluence.block_sums`);
    ``payload`` is ``(kind, factors)``."""
    kind, factors = payload
    return solver.block_sums(kind, solver.trained_parameters(), batch, offset=start, factors=factors, out=out)


# -- the solver -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EkfacConfig(SolverConfig):
    """Hyperparameters of :class:`EkfacInfluence` (its curvature is always the GGN)."""

    curvature: str = field(default="ggn", init=False, metadata={"help": "Always 'ggn'."})
    update_diagonal: bool = hyperparameter(
        True, "True for EK-FAC (a second pass refits the eigenvalues), False for K-FAC."
    )
    layers: tuple[str, ...] | None = hyperparameter(
        None,
        "Names of the modules to include (None: every trainable Linear, Conv2d, Embedding and Hugging Face "
        "Conv1D); other trainable parameters are left out (zero factor entries) with one warning.",
    )
    task: str | None = hyperparameter(
        None,
        "'classification' (cross-entropy on logits), 'regression' (mean squared error), 'autograd' (the "
        "loss's own Hessian in the outputs) or None: inferred from nn.CrossEntropyLoss/nn.MSELoss, else 'autograd'.",
    )
    fisher: str = hyperparameter(
        "auto",
        "How the loss's curvature in the outputs enters the factors: 'exact' (back-propagate every root of it: "
        "c per sample, (T-1) V for a causal LM), 'sampled' (the true Fisher: fisher_draws labels drawn from the "
        "model per position, one backward pass each) or 'auto' (exact where it costs at most "
        "EXACT_ROOTS_BUDGET = 256 backward passes per chunk, else sampled).",
    )
    fisher_draws: int = hyperparameter(
        1, "Labels drawn per position for the sampled Fisher (its error falls like 1/sqrt(draws))."
    )
    seed: int = hyperparameter(
        0, "Seeds the labels of the sampled Fisher (with each sample's index: the same draws on any split of the data)."
    )
    tied: str = hyperparameter(
        "exclude",
        "A weight tied between a token embedding and an LM head (GPT-2's wte and lm_head): 'exclude' leaves it "
        "out (zero factor entries, named in the warning); 'head' factors it through its LM-head use (A from the "
        "head's inputs, a diagonal vocabulary side G; the embedding use's gradient still counted in every "
        "gradient and in the corrected eigenvalues).",
    )
    memory_budget: int | None = hyperparameter(
        None,
        "Bytes the fit may hold (Kronecker factors, eigendecompositions, per-chunk blocks); None: half the "
        "machine's memory (80% of the GPU's for a CUDA model). A dense factor that does not fit is kept "
        "diagonal (with a warning); what still does not fit is refused before any pass.",
    )

    solve_time: ClassVar[frozenset[str]] = frozenset({"regularization"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.update_diagonal, bool):
            raise TypeError(f"update_diagonal must be True or False; got {self.update_diagonal!r}.")
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
                raise TypeError(f"layers must be a list of module names or None; got {self.layers!r}.")
            self._set("layers", tuple(self.layers))
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be 'classification', 'regression', 'autograd' or None; got {self.task!r}.")
        if self.tied not in TIED_CHOICES:
            raise ValueError(f"tied must be 'exclude' or 'head'; got {self.tied!r}.")
        if self.fisher not in FISHER_CHOICES:
            raise ValueError(f"fisher must be 'auto', 'exact' or 'sampled'; got {self.fisher!r}.")
        self._set("fisher_draws", check_positive_int("fisher_draws", self.fisher_draws))
        check_seed(self.seed)
        if self.memory_budget is not None:
            self._set("memory_budget", check_positive_int("memory_budget", self.memory_budget))


@register("ekfac")
class EkfacInfluence(InfluenceModel):
    """Influences from a block-diagonal Kronecker-factored curvature (K-FAC or EK-FAC).

    Args:
        model: a trained model; its trainable ``nn.Linear``, ``nn.Conv2d`` (``groups=1``),
            ``nn.Embedding`` and Hugging Face ``Conv1D`` layers are factored, any other
            trainable parameter is left out (treated as frozen: zero factor entries) with one
            warning naming it.
        task: the objective (positional): a :class:`~..task.Task` with ``outputs`` and
            ``output_loss``, or a loss ``loss(outputs, targets)`` with mean reduction; ``None``
            picks ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` from the keyword ``task=``.
        regularization: ``lambda >= 0`` added to every eigenvalue: ``(C + lambda I)^-1``.
        update_diagonal: ``True`` for EK-FAC (a second pass refits the eigenvalues), ``False``
            for K-FAC.
        layers: names of the modules to include (``None``: all supported trainable ones).
            Trainable parameters outside them are left out in the same way.
        tied: a weight ``(V, d)`` shared by an ``nn.Embedding`` and an ``nn.Linear`` LM head
            (GPT-2's ``wte`` and ``lm_head``): ``"exclude"`` (default) leaves it out, the warning
            naming it; ``"head"`` factors it as the head's layer (``A`` ``(d, d)`` from the
            head's inputs, ``G`` diagonal ``(V,)``) and adds the embedding use's gradient to
            every gradient and to the corrected eigenvalues, with one warning naming it.
        task= (keyword, kept in ``solver.config.task``; ``solver.task`` is the objective): the
            output curvature, ``"classification"`` (cross-entropy on logits), ``"regression"`` (mean squared
            error) or ``None``: inferred from ``nn.CrossEntropyLoss``/``nn.MSELoss``, and for
            any other loss its own Hessian in the outputs is taken by autograd. A closed form
            is checked against autograd on the first batch.
        chunk_size: samples per batched forward/backward pass (memory knob).

    Attributes:
        state_: the fitted :class:`EkfacState`.

    Raises:
        ValueError: at construction, for a parameter shared by several modules, a grouped
            Conv2d, an embedding with ``max_norm``, or ``layers`` naming an unknown or
            unsupported module (the message names the layer and how to freeze it).
        NotPositiveDefiniteError: when an eigenvalue plus ``regularization`` is not positive.
    """

    state_: EkfacState | None = None

    config_class = EkfacConfig
    config: EkfacConfig

    def __init__(
        self,
        model: nn.Module,
        task: LossFn | Task | None = None,
        config: EkfacConfig | None = None,
        /,
        **hyperparameters: Any,
    ):
        config = cast(EkfacConfig, self._make_config(config, hyperparameters))  # an instance of config_class
        # ``task``: the objective; ``kind``: the output curvature (the ``task=`` hyperparameter, config.task)
        if isinstance(task, Task):
            if not task.has_outputs:
                raise ValueError(
                    f"EK-FAC needs the loss as a function of the model outputs, which the task "
                    f"{task.name!r} does not give: pass Task(..., outputs=fn(model, batch) -> outputs, "
                    "output_loss=fn(outputs, batch) -> loss) (the ready-made tasks of di.tasks carry "
                    "them), or use another solver (e.g. CgInfluence)."
                )
            kind = config.task or task.output_curvature
            if kind is not None and kind not in TASKS:
                raise ValueError(f"task must be 'classification', 'regression', 'autograd' or None; got {kind!r}.")
        else:
            kind = infer_task(task, config.task)
            if task is None:
                if kind is None:
                    raise ValueError("Pass a loss, or task='classification' or 'regression' to use the default one.")
                task = nn.CrossEntropyLoss() if kind == "classification" else nn.MSELoss()
        # Reading the model's trainable parameters races with another thread's forward
        # (functional_call swaps them for plain tensors), so construction holds the lock too.
        with _FORWARD_LOCK:
            super().__init__(model, task, config.replace(task=kind))
            self._layers = find_layers(model, self._functions.spec, self.config.layers, self.config.tied)
        # what the hooks watch: the layers, then the embedding uses of tied heads (tied="head")
        self._captured = self._layers + [layer.tied_use for layer in self._layers if layer.tied_use is not None]
        assert self.objective.output_loss is not None  # a pair task or a task with outputs (checked above)
        self._output = OutputCurvature(self.objective.output_loss, kind)
        self._plan_factors()

    # -- memory ---------------------------------------------------------------------------------
    @property
    def memory_budget(self) -> int:
        """The fit's budget in bytes: ``memory_budget``, or the machine's default (:func:`default_memory_budget`)."""
        return self.config.memory_budget or default_memory_budget(self.device)

    def _plan_factors(self) -> None:
        """Before any pass: the factor-sized memory from the layers' shapes; sides kept diagonal
        where the dense factors would not fit the budget (one warning), or a one-line refusal."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        budget = self.memory_budget
        tied = {(layer.name, "G") for layer in self._layers if layer.tied_use is not None}  # a diagonal vocabulary side
        self._diagonal, self.memory_ = plan_factors(self._layers, itemsize, budget, self.update_diagonal, tied)
        self._fit_chunks: dict[tuple, int] = {}
        if self.memory_.fixed > budget:
            name, what, size = self.memory_.largest()
            raise ValueError(
                f"EK-FAC's factors need {_bytes(self.memory_.fixed)} even with every wide factor kept diagonal, "
                f"beyond memory_budget={_bytes(budget)}; the largest piece is {what} of layer '{name}', "
                f"{_bytes(size)}. Pass a larger memory_budget, or leave the layer out with layers=[...]."
            )
        if self._diagonal - tied:
            shapes = {layer.name: layer.shape for layer in self._layers}
            parts = []
            for name, side in sorted(self._diagonal - tied):
                d = shapes[name][1 if side == "A" else 0]
                parts.append(
                    f"the {side} of layer '{name}' ({d:,} x {d:,}: {_bytes(24 * d * d)} as a float64 factor "
                    "and its eigendecomposition)"
                )
            _warn_fallback(
                f"EK-FAC keeps {'; '.join(parts)} DIAGONAL: the dense factors would not fit memory_budget="
                f"{_bytes(budget)} (the fit now needs {_bytes(self.memory_.fixed)} for its factors). The curvature "
                "is then diagonal on that side of the layer, as for an embedding's inputs. Pass a larger "
                "memory_budget for the dense factors, or leave the layer out with layers=[...]."
            )

    def _fit_chunk(self, theta: Tensor, batch: Any) -> int:
        """Samples per chunk of a fitting pass on batches shaped as ``batch``: ``chunk_size``, or fewer
        where the per-chunk blocks (the vectors back-propagated, each layer's inputs and output
        gradients, a layer's per-sample gradients in the second pass) would not fit beside the
        factors; a one-line refusal when one sample's do not. From one sample's forward."""
        return self._chunk(theta, batch, scoring=False)

    def _chunk(self, theta: Tensor, batch: Any, *, scoring: bool) -> int:
        """Samples per chunk (see :meth:`_fit_chunk`); ``scoring``: for the gradients of influences,
        self-influences and factors (one vector per sample; the flat ``(m, p)`` gradients and their
        solve), beside the fitted state."""
        key = (scoring, *(tuple(leaf.shape[1:]) for leaf in batches.leaves(batch) if isinstance(leaf, Tensor)))
        if key in self._fit_chunks:
            return self._fit_chunks[key]
        one = batches.slice_rows(batch, 0, 1)
        with torch.no_grad(), _FORWARD_LOCK, Capture(self._captured, 1) as capture:
            outputs = self._functions.outputs(theta, one)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        c = int(outputs[0].numel())
        r = 1 if scoring else self.config.fisher_draws if self._sampled(outputs) else c
        pieces = [("the vectors back-propagated", r * c * itemsize)]
        if scoring:
            pieces.append(("the flat per-sample gradients and their solve (3 x p)", 3 * self.num_params * itemsize))
        grads: list[tuple[str, int]] = []  # a layer's per-sample gradients (o, i): one layer at a time
        for layer, inputs in zip(self._captured, capture.inputs):
            o, i = layer.shape
            positions = sum(int(a.shape[1]) for a in inputs)
            if layer.tied_use is not None:  # the head's blocks with the embedding's positions (tied_pieces)
                positions += sum(int(a.shape[1]) for a in capture.inputs[self._captured.index(layer.tied_use)])
            blocks = (r * o + i) * positions * itemsize
            pieces.append((f"the output gradients and inputs of layer '{layer.name}'", blocks))
            if positions > 1 and (scoring or self.update_diagonal):
                grads.append((f"the per-sample gradients of layer '{layer.name}'", 2 * o * i * itemsize))
        if grads:
            pieces.append(max(grads, key=lambda piece: piece[1]))
        del capture, outputs
        per_sample = sum(size for _, size in pieces)
        held = self.state_.nbytes if scoring and self.state_ is not None else self.memory_.fixed
        room = self.memory_budget - held
        if per_sample > room:
            what, size = max(pieces, key=lambda piece: piece[1])
            task = "scoring" if scoring else "fit"
            fix = "smaller test or training batches" if scoring else "fisher='sampled' (fewer vectors per sample)"
            raise ValueError(
                f"EK-FAC's {task} cannot hold one sample's blocks ({_bytes(per_sample)}; the largest, {what}, "
                f"{_bytes(size)}) beside its {'state' if scoring else 'factors'} ({_bytes(held)}) within "
                f"memory_budget={_bytes(self.memory_budget)}. Pass a larger memory_budget, {fix}, shorter "
                "sequences, or leave the layer out with layers=[...]."
            )
        chunk = max(1, min(self.chunk_size, room // per_sample))
        self._fit_chunks[key] = chunk
        return chunk

    def check_loss(self, batch: Any) -> None:
        """Engine hook. The checks of every solver on the first training batch, then EK-FAC's memory for batches
        of its shapes (a one-line refusal before any pass where one sample's blocks do not fit)."""
        super().check_loss(batch)
        self._fit_chunk(self.trained_parameters(), batch)

    # -- the output curvature: exact roots or the sampled Fisher ---------------------------------
    def _sampled(self, outputs: Tensor) -> bool:
        """Whether the fit back-propagates the sampled Fisher (else the exact roots) for these outputs."""
        choice = self.config.fisher
        if choice == "exact":
            return False
        can = self._output.can_sample(outputs)
        if choice == "sampled" and not can:
            raise ValueError(
                "fisher='sampled' draws labels from the model's predictive distribution, which is known for "
                "softmax cross-entropy over (n, c) logits, mean squared error and the causal-LM task; this "
                f"loss ({type(self._output.output_loss).__name__}, task={self.task!r}) has none. Use fisher='exact'."
            )
        return can and (choice == "sampled" or int(outputs[0].numel()) > EXACT_ROOTS_BUDGET)

    def _fisher_vectors(self, outputs: Tensor, batch: Any, offset: int, check: bool) -> Tensor:
        """The vectors to back-propagate for ``G``: ``(r, n, *outputs.shape[1:])``."""
        if self._sampled(outputs):
            if check:
                self._output.check_sampled(outputs, batch)
            return self._output.sampled(outputs, batch, self.config.fisher_draws, self.config.seed, offset)
        if check:
            self._output.check(outputs, batch)
        return self._output.roots(outputs, batch)

    # -- fitting --------------------------------------------------------------------------------
    def _progress_title(self) -> str:
        return "EK-FAC" if self.update_diagonal else "K-FAC"

    def _fit_passes(self) -> int | None:
        return 2 if self.update_diagonal else 1

    def _pass_name(self, fn: Any, payload: Any) -> str:
        if getattr(fn, "__name__", "") == "ekfac_block":
            return {"covariance": "Kronecker factors", "corrected": "eigenvalue correction"}.get(payload[0], payload[0])
        return super()._pass_name(fn, payload)

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        def sweep(kind: str, factors: Sequence[LayerFactors] | None) -> list[Tensor]:
            return list(blocks.sum(ekfac_block, (kind, None if factors is None else tuple(factors))))

        self.fit_from_sums(blocks.n, sweep)

    def fit_from_sums(self, n: int, sweep: Callable[[str, Sequence[LayerFactors] | None], list[Tensor]]) -> None:
        """Engine hook. Fit from sums over the training blocks of :meth:`block_sums`.

        ``sweep(kind, factors)`` must return the elementwise sum, over every block of the
        training data, of ``block_sums(kind, theta, batch_b, offset=start_b, factors=factors)``
        (:meth:`_fit` sums :func:`ekfac_block` over the fit's blocks). ``A`` and ``G`` are eigendecomposed here, in
        float64; with ``update_diagonal`` a second sweep sums the corrected eigenvalues.

        Args:
            n: the number of training samples the sums cover.
        """
        totals: list[Tensor | None] = list(sweep("covariance", None))
        factors = []
        title = f"{self._progress_title()} fit: eigendecompositions"
        meter = _progress.current().meter(title, len(self._layers), "layers")
        for i, layer in enumerate(self._layers):  # one layer's float64 eigh at a time, sums released
            sums = FactorSums.from_totals(layer.name, totals[2 * i], totals[2 * i + 1])  # type: ignore[arg-type]
            totals[2 * i] = totals[2 * i + 1] = None  # only `sums` holds them now; its eigh lets go
            factors.append(sums.eigh(n, self.dtype))
            meter.advance()
        meter.finish()
        if self.update_diagonal:
            corrected = sweep("corrected", tuple(factors))
            factors = [
                LayerFactors(f.name, f.q_a, f.lambda_a, f.q_g, f.lambda_g, (c.to(self.device) / n).to(self.dtype))
                for f, c in zip(factors, corrected)
            ]
        self.state_ = EkfacState(layers=tuple(factors), n_train=n)
        self._check_positive()

    def block_sums(
        self,
        kind: str,
        theta: Tensor,
        batch: Any,
        *,
        offset: int = 0,
        factors: Sequence[LayerFactors] | None = None,
        out: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """Engine hook. One block's float64 contribution to a fitting pass, in chunks of ``chunk_size``.

        Args:
            kind: ``"covariance"``: per layer the sums of ``A`` ``(i, i)`` and ``G`` ``(o, o)``
                over the block's samples, as ``[A_0, G_0, A_1, G_1, ...]``; ``"corrected"``:
                per layer the sum ``(o, i)`` of the squared per-sample gradients rotated into
                the eigenbases of ``factors`` (from the first pass).
            theta: the trained parameters ``(p,)``.
            batch: the block's samples (validated tensors on the model's device).
            offset: the index of the block's first sample in the training data (for
                messages; the loss's output curvature is checked on sample 0).
            out: sums of earlier blocks to add this block's into, in place (one set of sums
                for a whole in-process pass); ``None``: new sums.

        Returns:
            the per-block sums; added over all blocks they are the unnormalized totals.
        """
        step = self._fit_chunk(theta, batch)
        if kind == "covariance":
            if out is None:
                sums = [
                    FactorSums(
                        layer.name,
                        layer.shape,
                        self.device,
                        diagonal_a=layer.diagonal_a or (layer.name, "A") in self._diagonal,
                        diagonal_g=(layer.name, "G") in self._diagonal,
                    )
                    for layer in self._layers
                ]
            else:
                sums = [
                    FactorSums.from_totals(layer.name, out[2 * i], out[2 * i + 1])
                    for i, layer in enumerate(self._layers)
                ]
            for s in range(0, batches.size(batch), step):
                pieces = self._capture(
                    theta,
                    batches.slice_rows(batch, s, s + step),
                    fisher=True,
                    offset=offset + s,
                    check=offset + s == 0,
                    finite_check=False,
                )
                for acc, (g, a) in zip(sums, pieces):
                    acc.add(g, a)
                self._check_sums([t for acc in sums for t in (acc.a, acc.g)], pieces, offset + s)
            return [t for acc in sums for t in (acc.a, acc.g)]
        if kind == "corrected":
            if factors is None or len(factors) != len(self._layers):
                raise ValueError("block_sums('corrected', ...) needs the layer factors of the first pass.")
            totals = (
                out
                if out is not None
                else [torch.zeros(f.shape, dtype=torch.float64, device=self.device) for f in factors]
            )
            for s in range(0, batches.size(batch), step):
                pieces = self._capture(
                    theta,
                    batches.slice_rows(batch, s, s + step),
                    fisher=True,
                    offset=offset + s,
                    finite_check=False,
                )
                for layer, total, f, (g, a) in zip(self._layers, totals, factors, pieces):
                    if layer.tied_use is None:
                        total += corrected_eigenvalue_sum(f, g, a)
                        continue
                    use = pieces[len(self._layers) + self._tied_index(layer)]
                    for r in range(g.shape[1]):  # both uses' gradient per vector
                        total += rotated_square_sum(f, tied_layer_grads((g, a), use, r))
                self._check_sums(totals, pieces, offset + s)
            return totals
        raise ValueError(f"kind must be 'covariance' or 'corrected'; got {kind!r}.")

    def _capture(
        self,
        theta: Tensor,
        batch: Any,
        *,
        fisher: bool,
        offset: int = 0,
        check: bool = False,
        finite_check: bool = True,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(g, a)``: ``g`` ``(n, r, P, o)``, ``a`` ``(n, P, i)``.

        ``finite_check``: raise :class:`NonFiniteError` naming a sample whose ``g`` is NaN/Inf
        (the fitting passes check their sums instead, see :meth:`_check_sums`).

        ``fisher=False``: ``r = 1``, the gradient of each sample's loss at its target.
        ``fisher=True``: ``r = c``, back-propagating the columns of ``S``, ``S S^T = H_out``.
        """
        with torch.enable_grad():
            # The hooks live on the (shared) modules and functional_call swaps their
            # parameters, so hook registration, the forward and hook removal all run under the
            # process-wide forward lock of core.gradients: threads sharing one model (a Dask
            # worker's threads) then never see each other's hooks or parameters. The backward
            # below only uses this call's own probes and graph, so it runs outside the lock.
            with _FORWARD_LOCK, Capture(self._captured, batches.size(batch)) as capture:
                outputs = self._functions.outputs(theta, batch)
            o = outputs.detach()
            vectors = self._fisher_vectors(o, batch, offset, check) if fisher else self._output.gradients(o, batch)
            result = capture.collect(outputs, vectors)
        if finite_check:
            self._check_finite(result, offset)
        return result

    def _check_finite(self, pieces: list[tuple[Tensor, Tensor]], offset: int) -> None:
        """Raise :class:`NonFiniteError` naming the first sample whose captured output gradient is NaN/Inf."""
        for layer, (g, _) in zip(self._layers, pieces):
            bad = ~torch.isfinite(g)
            if bool(bad.any()):
                row = int(torch.nonzero(bad)[0, 0])
                raise NonFiniteError(
                    f"The gradient in the output of layer '{layer.name}' is NaN/Inf for sample "
                    f"{offset + row}. Check the model and the loss for overflow (e.g. log of 0)."
                )

    def _check_sums(self, sums: Sequence[Tensor], pieces: list[tuple[Tensor, Tensor]], offset: int) -> None:
        """After a chunk is added into the float64 ``sums``: a NaN/Inf there names its sample (the
        captured tensors are scanned only then; a pass over them per chunk cost 13% of a fit)."""
        if all(bool(torch.isfinite(t).all()) for t in sums):
            return
        self._check_finite(pieces, offset)
        n = pieces[0][1].shape[0] if pieces else 0
        raise NonFiniteError(
            f"EK-FAC's curvature sums became NaN/Inf with samples {offset} to {offset + n - 1} (their output "
            "gradients are finite: a layer input is NaN/Inf, or the products overflowed). Check the model and "
            "the data for overflow, or fit in float64."
        )

    # -- curvature ------------------------------------------------------------------------------
    def _factors(self) -> tuple[LayerFactors, ...]:
        if self.state_ is None:
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call .fit(train_loader) first.")
        return self.state_.layers

    def _check_positive(self) -> None:
        for f in self._factors():
            check_layer_positive(f, self.regularization, self.update_diagonal, type(self).__name__)

    def _apply(self, rhs: Tensor, *, power: float, regularization: float) -> Tensor:
        out = torch.zeros_like(rhs)  # parameters outside the layers are left out: zero
        for layer, f in zip(self._layers, self._factors()):
            m = layer.to_matrix(rhs)
            layer.write_matrix(
                f.apply_power(m, power=power, regularization=regularization, corrected=self.update_diagonal), out
            )
        return out

    def _solve(self, rhs: Tensor) -> Tensor:
        """``(C + lambda I)^-1`` applied to each row of ``rhs`` ``(k, p)``, layer by layer: ``(k, p)``."""
        self._check_positive()
        return self._apply(rhs, power=-1.0, regularization=self.regularization)

    def curvature_matrix(self) -> Tensor:
        """The dense, unregularized block-diagonal approximation ``(p, p)`` (small models only)."""
        self._require_fitted()
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self._apply(eye, power=1.0, regularization=0.0)

    # -- influences: the base class's scoring hooks, layer by layer --------------------------------
    def _pieces(self, theta: Tensor, batch: Any) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Per chunk of a prepared batch, per layer ``(g (m, P, o), a (m, P, i))`` at the true targets."""
        step = self._chunk(theta, batch, scoring=True)  # chunk_size, or fewer to fit memory_budget
        for s in range(0, batches.size(batch), step):
            chunk = batches.slice_rows(batch, s, s + step)
            pieces = self._capture(theta, chunk, fisher=False, offset=s)
            yield [
                (g[:, 0], a)
                if layer.tied_use is None
                else tied_pieces((g, a), pieces[len(self._layers) + self._tied_index(layer)], 0)
                for layer, (g, a) in zip(self._layers, pieces)
            ]

    def _tied_index(self, layer: KroneckerLayer) -> int:
        """The place of ``layer``'s tied embedding use among the captured uses (after the layers)."""
        return [lay.name for lay in self._layers if lay.tied_use is not None].index(layer.name)

    def _flat_grads(self, theta: Tensor, batch: Any) -> Iterator[Tensor]:
        """Per chunk, flat per-sample gradients ``(m, p)`` assembled from ``sum_t g_t a_t^T``."""
        for pieces in self._pieces(theta, batch):
            flat = torch.zeros(pieces[0][0].shape[0], self.num_params, dtype=self.dtype, device=self.device)
            for layer, (g, a) in zip(self._layers, pieces):
                layer.write_matrix(layer_grads(g, a), flat)
            yield flat

    def per_sample_grads_from_factors(self, *points: Any) -> Tensor:
        """Per-sample gradients ``(n, p)`` assembled from the layers' ``sum_t g_t a_t^T``.

        Equal to :meth:`per_sample_grads` (by ``torch.func``) on the layers' parameters;
        meant for checks and debugging.
        """
        theta = self._require_fitted()
        return torch.cat(list(self._flat_grads(theta, self._batch(points, ("x", "y")))))

    def _test_gradients(self, theta: Tensor, batch: Any) -> Iterator[Tensor]:
        """The test gradients per chunk, assembled from the layers (the base class's hook); a task's
        own measurement (not the layers' loss gradients) by the base class's route."""
        if self.objective.measurement is not None:
            yield from super()._test_gradients(theta, batch)
            return
        meter = _progress.current().meter(f"{self._progress_title()} influence factors", batches.size(batch), "points")
        for flat in self._flat_grads(theta, batch):
            yield flat
            meter.advance(flat.shape[0])
        meter.finish()

    def _up_influences(self, theta: Tensor, factors: Tensor, batch: Any) -> Tensor:
        """Up-weighting influences ``(n_test, n)`` (the base class's hook).

        On a model with more than :data:`FLAT_SCORING_MAX_PARAMS` parameters, layer by layer
        from the layers' inputs and output gradients, without flat ``(n, p)`` training
        gradients; on smaller models, where the hooks and the per-layer contractions cost more
        than the gradients, by the flat route of the other solvers (vmapped per-sample
        gradients and one product). Both give the same numbers.
        """
        if self.num_params <= FLAT_SCORING_MAX_PARAMS:
            return super()._up_influences(theta, factors, batch)
        blocks = [layer.to_matrix(factors) for layer in self._layers]
        parts = []
        for pieces in self._pieces(theta, batch):
            parts.append(cast(Tensor, sum(up_contract(f, g, a) for f, (g, a) in zip(blocks, pieces))))
        return torch.cat(parts, dim=1)

    def _self_influences(self, theta: Tensor, batch: Any) -> tuple[Tensor, Any]:
        """``grad L(z)^T (C + lambda I)^-1 grad L(z)`` per point ``(n,)``, layer by layer (the base
        class's hook); no report."""
        self._check_positive()
        inverse = [1.0 / (f.eigenvalues(self.update_diagonal) + self.regularization) for f in self._factors()]
        parts = []
        meter = _progress.current().meter(f"{self._progress_title()} self-influences", batches.size(batch), "points")
        for pieces in self._pieces(theta, batch):
            terms = (self_contract(f, d, g, a) for f, d, (g, a) in zip(self._factors(), inverse, pieces))
            parts.append(cast(Tensor, sum(terms)))
            meter.advance(parts[-1].shape[0])
        meter.finish()
        return torch.cat(parts), None
