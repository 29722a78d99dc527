"""The checks of what a user passes to a solver, each raising one clear error that names the fix.

Points and batches (:func:`validated_batch`: pairs ``(x, y)`` with a loss, one batch of any
structure with a task; feature shape and input dtype against the fit), test factors
(:func:`checked_factors`, ``(n_test, p)``), the model's mode (:func:`check_model_mode`), the
loss on the first training batch (:func:`check_loss`: it evaluates, is a finite scalar, averages
over the batch), NaN/Inf gradients (:func:`check_grads_fast`) and half-precision models
(:func:`widen_half_precision`). :class:`~.engine.SolverEngine` calls them; they read the solver's
model, objective, dtype, device and fitted input signature, and change nothing.
"""

from __future__ import annotations

import copy
import os
import warnings
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ...errors import NonFiniteError
from .. import batches
from ..batches import check_finite
from ..data import DICT_BATCHES, input_signature, pair_batch
from ..gradients import check_finite_grads, flat_params

if TYPE_CHECKING:
    from .engine import SolverEngine

STOCHASTIC_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
"""Layers that draw randomness in training mode (refused there: per-sample gradients would differ per call)."""
BATCH_LAYERS = (nn.modules.batchnorm._BatchNorm,)
"""Layers that mix the samples of a batch in training mode."""


def validated_batch(solver: SolverEngine, points: tuple, names: tuple[str, str]) -> Any:
    """The points of a public call as one validated batch on the model's device.

    With a pair loss, ``points`` is ``(x, y)`` or ``((x, y),)``; with a task, ``(batch,)``.
    """
    if solver.objective.pairs:
        if any(isinstance(point, dict) for point in points):
            raise TypeError(f"Got a dict batch: {DICT_BATCHES}.")
        if len(points) == 1 and is_pair(points[0]):
            points = tuple(points[0])
        if len(points) != 2:
            raise TypeError(
                f"Pass the points as {names[0]}, {names[1]} (inputs and targets); got {len(points)} "
                "argument(s). (A solver built with a dask_influence.Task takes one batch instead.)"
            )
        x, y = pair_batch(points, solver.dtype, solver.device, names)
        batch: Any = (x, y)
        label, leaf = names[0], x
    else:
        if len(points) != 1:
            raise TypeError(
                f"A solver built with a Task takes the points as ONE batch (a dict or tuple of "
                f"tensors); got {len(points)} arguments."
            )
        label = "the test batch" if names[0] == "x_test" else "the batch"
        batch = batches.to_tensors(points[0], label, dtype=solver.dtype, device=solver.device)
        batches.check(batch, label)
        leaf = None
    shape, is_float = input_signature(batch, solver.objective.perturb)
    if not solver.objective.pairs:
        label = f"the input {solver.objective.perturb!r} of {label}"
    fitted = solver.feature_shape_
    if fitted is not None and is_float is not None and tuple(shape) != tuple(fitted):
        raise ValueError(
            f"{label} has feature shape {tuple(shape)} but the solver was fitted on "
            f"inputs of feature shape {tuple(fitted)}; pass inputs shaped "
            f"(n, {', '.join(map(str, fitted))})."
        )
    if getattr(solver, "_float_inputs", False) and is_float is False:
        name = names[0] if solver.objective.pairs else repr(solver.objective.perturb)
        dtype = leaf.dtype if leaf is not None else batches.get_leaf(batch, solver.objective.perturb).dtype  # type: ignore[arg-type]
        raise TypeError(
            f"{name} has integer dtype {dtype}, but the solver was fitted on floating-point "
            f"inputs; pass {name} as floats (e.g. {name}.float() or {name}.astype('float32'))."
        )
    return batch


def checked_factors(solver: SolverEngine, factors: Any) -> Tensor:
    """``factors`` ``(n_test, p)`` from ``influence_factors``, checked and on the solver's device and dtype."""
    if not isinstance(factors, Tensor):
        raise TypeError(f"factors must be a torch.Tensor from influence_factors; got {type(factors).__name__}.")
    if factors.ndim != 2 or factors.shape[1] != solver.num_params:
        raise ValueError(
            f"factors must have shape (n_test, {solver.num_params}) (one row per test point, "
            f"one column per trainable parameter); got {tuple(factors.shape)}."
        )
    factors = factors.to(device=solver.device, dtype=solver.dtype)
    check_finite("factors", factors, hint="Recompute them with influence_factors.")
    return factors


def check_model_mode(model: nn.Module) -> None:
    """Refuse a model in training mode with dropout or batch norm (per-sample gradients would be ill-defined)."""
    if not model.training:
        return
    for name, module in model.named_modules():
        if isinstance(module, STOCHASTIC_LAYERS + BATCH_LAYERS):
            raise ValueError(
                f"The model is in training mode and layer '{name}' ({type(module).__name__}) "
                "behaves differently per batch; call model.eval() before computing influences."
            )


def check_loss(solver: SolverEngine, batch: Any) -> None:
    """Check the loss on the first training batch: it evaluates, is a finite scalar and averages over the batch."""
    theta = flat_params(solver.model, solver._functions.spec)
    one = batches.slice_rows(batch, 0, 1)
    two = batches.repeat_first(batch, 2)
    task = solver.objective
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # The loss on one sample and on two copies of it. With the outputs known, the loss
            # is taken on two copies of the SAME outputs: a forward on a batch of two may round
            # differently from one on a batch of one (other kernels), which for a well-fitted
            # float32 model changes a tiny residual's loss by far more than any fixed rtol;
            # copying the outputs leaves only the loss's own reduction to compare.
            if task.outputs is not None and task.output_loss is not None:
                out1 = solver._functions.apply(theta, task.outputs, one)  # a tuple is fine for the loss
                single = task.output_loss(out1, one)
                if isinstance(out1, Tensor):
                    double = task.output_loss(torch.cat([out1, out1]), two)
                else:  # outputs that are not one tensor: the model on two copies of the sample
                    double = solver._functions.batch_loss(theta, two)
            else:
                single = solver._functions.batch_loss(theta, one)
                double = solver._functions.batch_loss(theta, two)
    except Exception as err:  # re-raised with the shapes that caused it
        raise ValueError(
            f"The model and {'loss' if task.pairs else 'task'} could not be evaluated on a training batch "
            f"with {describe(batch, task.pairs)}: {err}"
        ) from err
    for warning in caught:  # torch's elementwise losses warn when targets broadcast against outputs
        text = str(warning.message)
        if "target size" in text and "broadcasting" in text:
            raise ValueError(
                f"The loss broadcasts the targets against the outputs ({text.split('. ')[0]}): on a batch "
                f"of n samples it would compare every output with every target and change the Hessian. "
                "Give the targets the outputs' shape, e.g. y.reshape(-1, 1) for outputs of shape (n, 1)."
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    what = "loss(outputs, targets)" if task.pairs else f"The task's loss ({task.name})"
    if not isinstance(single, Tensor) or single.ndim != 0:
        shape = tuple(single.shape) if isinstance(single, Tensor) else type(single).__name__
        raise TypeError(
            f"{what} must reduce to a scalar (mean over the batch); got "
            f"{shape}. Use reduction='mean' (the torch default)."
        )
    if not bool(torch.isfinite(single)) or not bool(torch.isfinite(double)):
        raise NonFiniteError(
            f"{what} is {single.item()} on the first training sample; check "
            "the model's outputs and the loss for overflow (e.g. log of 0), or use a "
            "numerically stable loss such as cross_entropy on logits."
        )
    # Mean reduction gives the sample's loss again, up to the rounding of the reduction
    # (a few eps relative to the per-sample term, which is the loss itsolver); sum reduction
    # gives exactly twice it.
    finfo = torch.finfo(single.dtype if single.is_floating_point() else solver.dtype)
    rtol = max(1e-4, 64 * finfo.eps)
    if float((double - single).abs()) > rtol * float(single.abs()) + finfo.tiny:
        raise ValueError(
            f"{what} must average over the batch: on a batch of two copies "
            f"of one sample it gave {double.item():.6g}, on the sample alone {single.item():.6g}. "
            "Use reduction='mean' instead of 'sum'."
        )


def describe(batch: Any, pairs: bool) -> str:
    """The shapes and dtypes of a batch, for messages."""
    if pairs:
        x, y = batch
        return f"inputs {tuple(x.shape)} ({x.dtype}) and targets {tuple(y.shape)} ({y.dtype})"
    parts = [
        f"{path} {tuple(t.shape)} ({t.dtype})" for path, t in zip(batches.leaf_paths(batch), batches.leaves(batch))
    ]
    return ", ".join(parts)


def is_pair(value: Any) -> bool:
    """Whether ``value`` is a pair ``(x, y)`` given as one argument."""
    return isinstance(value, tuple) and len(value) == 2


def check_grads_fast(derived: Tensor, grads: Tensor | list[Tensor], spec: Any, offset: int) -> None:
    """Raise on a NaN/Inf gradient, checking the cheap way first.

    ``derived`` is the gradients or something every gradient entry propagates into (a
    product with finite factors). A non-finite entry makes its sum non-finite, so the sum
    (one pass, no temporary) clears the common case; only a non-finite sum pays for the
    entrywise check, which names the sample and the parameter (an overflowing sum of
    finite values passes it). ``grads`` is ``(n, p)`` or its per-tensor blocks, joined only
    for that check.
    """
    if bool(torch.isfinite(derived.sum())):
        return
    check_finite_grads(grads if isinstance(grads, Tensor) else torch.cat(grads, dim=1), spec, sample_offset=offset)


HALF = (torch.float16, torch.bfloat16)


def widen_half_precision(model: nn.Module) -> nn.Module:
    """A float32 copy of a model with float16/bfloat16 trainable parameters, with a warning.

    Curvature solves in half precision lose most digits (and torch lacks half-precision
    linear algebra on the CPU), so influences are computed in float32. The model passed in
    is not changed.
    """
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    if not dtypes & set(HALF):
        return model
    import sys

    frame: FrameType | None
    frame, level = sys._getframe(1), 2  # the first frame outside this package gets the warning
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
    warnings.warn(
        f"The model's trainable parameters are {names}; influences are computed on a float32 copy of "
        "the model (half precision is too coarse for curvature solves) and returned in float32. "
        "The model passed in is not changed. Pass model.float() to silence this warning.",
        UserWarning,
        stacklevel=level,
    )
    return copy.deepcopy(model).float()
