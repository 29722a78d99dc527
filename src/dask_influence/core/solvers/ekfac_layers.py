"""Which layers EK-FAC factors, and where their parameters sit in the flat vector.

:func:`find_layers` finds the supported layers that hold trainable parameters
(:data:`SUPPORTED_LAYERS`), refuses the ones that cannot be factored (a grouped Conv2d, an
embedding with ``max_norm`` or ``scale_grad_by_freq``: one line naming the layer and how to
freeze it), and leaves out every other trainable parameter with one warning
(:func:`left_out_parameters`). A weight shared by a token embedding and an LM head
(:func:`_tied_pair`) is left out, or factored through its head (``tied="head"``,
:data:`TIED_CHOICES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ..gradients import ParamSpec
from ..kronecker import KroneckerLayer, layer_kind

SUPPORTED_LAYERS = ("nn.Linear", "nn.Conv2d (groups=1)", "nn.Embedding", "Hugging Face Conv1D")
"""The layers EK-FAC factors (:func:`~dask_influence.core.kronecker.layer_kind`); other trainable
parameters are left out (treated as frozen) with one warning."""
TIED_CHOICES = ("exclude", "head")
"""EK-FAC's ``tied``: a weight shared by a token embedding and an LM head is left out, or
factored through its LM-head use (a diagonal vocabulary side, both uses' gradients counted)."""


def _freeze_hint(module_name: str, param_name: str) -> str:
    """How to freeze one parameter: its module's ``requires_grad_(False)``, or the bare parameter's."""
    if module_name:
        return f"model.get_submodule('{module_name}').requires_grad_(False)"
    return f"model.{param_name}.requires_grad_(False)"


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
