"""What is differentiated: the training loss and the test-side measurement of a batch.

A :class:`Task` says how a model is scored on a batch of any structure (see
:mod:`.batches`):

- ``loss(model, batch) -> scalar``: the training loss with MEAN reduction over the samples of
  the batch. The loss of a batch of one is that sample's loss ``L(z)``, and the curvature
  ``H`` is the Hessian (or GGN) of its mean over the training set.
- ``measurement(model, batch) -> scalar``: the test-side quantity ``f`` whose change is
  attributed (default: the loss), e.g. a margin or the log-probability of one completion.
  ``influence[i, j] = grad f(z_test_i)^T (H + lambda I)^-1 grad L(z_j)``.

Optional parts enable more solvers:

- ``outputs(model, batch) -> Tensor (n, ...)`` and ``output_loss(outputs, batch) -> scalar``,
  with ``loss(model, batch) == output_loss(outputs(model, batch), batch)``: the GGN
  (``curvature="ggn"``) and EK-FAC need the loss as a function of the outputs;
- ``output_curvature``: ``"classification"`` (softmax cross-entropy over the last
  dimension of a ``(n, c)`` output) or ``"regression"`` (mean squared error) lets EK-FAC use
  closed forms of the loss's Hessian in the outputs; ``None`` takes it by autograd. An
  ``output_loss`` object may carry its own closed forms as methods (the ready-made tasks of
  :mod:`dask_influence.tasks` do): ``curvature_roots(outputs, batch)`` (exact roots, EK-FAC
  and the gradient index), ``curvature_product(outputs, batch, u)`` (the batch loss's
  Hessian in the outputs times ``u``: every GGN-vector product) and
  ``sampled_roots(outputs, batch, draws, generator)`` (EK-FAC's sampled Fisher); see
  :mod:`dask_influence.core.sampled_fisher`;
- ``perturb``: the input leaf that perturbation influences differentiate in (a dict key
  such as ``"pixel_values"``, or a position such as ``0``); it must be floating point.

The pair form of every solver, ``Solver(model, loss)`` with ``loss(outputs, targets)``, is the
task :func:`pair_task` over batches ``(x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Batch

ModelFn = Callable[[nn.Module, Batch], Tensor]
OutputLossFn = Callable[[Tensor, Batch], Tensor]


@dataclass(frozen=True)
class Task:
    """How a model is scored on a batch: the training loss and the test-side measurement.

    Args:
        loss: ``loss(model, batch) -> scalar``, mean-reduced over the batch's samples.
        measurement: ``measurement(model, batch) -> scalar`` (mean over the batch) for test
            points; ``None`` uses ``loss``.
        outputs: ``outputs(model, batch) -> (n, ...)``: the model outputs that ``output_loss``
            reads (needed by ``curvature="ggn"`` and EK-FAC).
        output_loss: ``output_loss(outputs, batch) -> scalar``, equal to ``loss`` on the
            outputs of ``outputs``.
        output_curvature: ``"classification"``, ``"regression"`` or ``None`` (see the module).
        perturb: the floating-point input leaf for ``mode="perturbation"``, or ``None``.
        name: a label for messages, saved fits and stores.
        pairs: internal: the task of ``loss(outputs, targets)`` over ``(x, y)`` batches (the
            solvers' methods then take ``x, y`` as two arguments).
    """

    loss: ModelFn
    measurement: ModelFn | None = None
    outputs: ModelFn | None = None
    output_loss: OutputLossFn | None = None
    output_curvature: str | None = None
    perturb: str | int | None = None
    name: str = "custom"
    pairs: bool = False

    def __post_init__(self) -> None:
        if not callable(self.loss):
            raise TypeError(
                f"Task.loss must be a function loss(model, batch) -> scalar; got {type(self.loss).__name__}."
            )
        for field_name in ("measurement", "outputs", "output_loss"):
            value = getattr(self, field_name)
            if value is not None and not callable(value):
                raise TypeError(f"Task.{field_name} must be a function or None; got {type(value).__name__}.")
        if (self.outputs is None) != (self.output_loss is None):
            raise ValueError(
                "Pass Task.outputs and Task.output_loss together (the loss as a function of the "
                "model outputs), or neither."
            )
        if self.output_curvature not in (None, "classification", "regression"):
            raise ValueError(
                f"Task.output_curvature must be 'classification', 'regression' or None; got {self.output_curvature!r}."
            )
        if self.perturb is not None and not isinstance(self.perturb, (str, int)):
            raise TypeError(f"Task.perturb must name an input (a dict key or a position); got {self.perturb!r}.")

    @property
    def has_outputs(self) -> bool:
        """Whether the loss is known as a function of the model outputs (GGN, EK-FAC)."""
        return self.outputs is not None

    def measure(self) -> ModelFn:
        """The test-side function: ``measurement``, else ``loss``."""
        return self.measurement or self.loss

    def loss_id(self) -> str:
        """The task's name and its loss function's qualified name: what a fit depends on."""
        return f"{self.name}: {_qualname(self.loss)}"

    def describe(self) -> dict[str, Any]:
        """Plain values naming the task (for fingerprints and saved files)."""
        return {
            "name": self.name,
            "loss": _qualname(self.loss),
            "measurement": _qualname(self.measurement),
            "output_curvature": self.output_curvature,
            "perturb": self.perturb,
            "pairs": self.pairs,
        }


def _qualname(fn: Any) -> str | None:
    if fn is None:
        return None
    owner = getattr(fn, "__self__", None)
    if owner is not None and isinstance(owner, nn.Module):
        return type(owner).__name__
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{getattr(fn, '__module__', '')}.{name}"


TASK_HINT = (
    'pass di.tasks.classification() as the loss (in a job file: [task] name = "classification"), '
    "which calls model(**inputs) on dict batches and reads .logits"
)
"""How to score a Hugging Face model (or dict batches) on class labels, for messages."""


def _plain(t: Tensor) -> Tensor:
    """``t`` without the wrappers of ``torch.func`` (vmap's batching, grad's tracking): the
    values of every sample, for a message."""
    from torch._C import _functorch

    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def label_error(outputs: Any, labels: Any, loss: Any = None) -> ValueError | None:
    """The error naming class labels out of range of ``outputs``, or ``None`` when they are in
    range (or are not class indices): called after a loss failed, to replace torch's
    ``Target 3 is out of bounds`` / ``index 3 is out of bounds for dimension 2 with size 3``.

    Args:
        outputs: the logits ``(n, c, ...)`` (``(c,)`` for one sample) the loss was given.
        labels: the integer targets, possibly wrapped by ``vmap`` (then every sample's are read).
        loss: the loss, for its ``ignore_index`` (default ``-100``, the torch convention).
    """
    if not (isinstance(outputs, Tensor) and isinstance(labels, Tensor)) or outputs.ndim == 0:
        return None
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        return None
    classes = int(outputs.shape[1] if outputs.ndim >= 2 else outputs.shape[0])
    ignore = int(getattr(loss, "ignore_index", -100))
    values = _plain(labels).detach().reshape(-1).cpu()
    bad = values[((values < 0) | (values >= classes)) & (values != ignore)]
    if bad.numel() == 0:
        return None
    shown = sorted({int(v) for v in bad.tolist()})
    listed = ", ".join(map(str, shown[:10])) + (", ..." if len(shown) > 10 else "")
    return ValueError(
        f"Labels out of range for the model's {classes} classes: got {listed} ({bad.numel()} target(s)); "
        f"class labels must be 0 to {classes - 1} ({ignore} marks a target to ignore). Fix the labels of "
        f"the training and test data (e.g. map them to 0..{classes - 1})"
        + (f", or give the model {max(shown) + 1} outputs." if max(shown) >= classes else ".")
    )


def float_label_error(outputs: Any, labels: Tensor, err: BaseException) -> ValueError | None:
    """The error naming the fix for floating-point class labels given to a loss that takes class
    indices (torch's ``expected target dtype to be Long or Byte, but got Float``), or ``None``
    when ``err`` is another failure."""
    text = str(err)
    if "expected target dtype" not in text and "expected scalar type Long" not in text:
        return None
    dtype = str(_plain(labels).dtype).replace("torch.", "")
    return ValueError(
        f"The loss takes class labels as integers (torch.long), but the targets are {dtype}: convert them "
        "with y.long() (e.g. TensorDataset(x, y.long()), or return them as torch.long from the dataset or "
        "job factory). Float targets are taken only as class probabilities (one per class, the outputs' shape)."
    )


class _PairLoss:
    """``loss(model(x), y)`` of a batch ``(x, y)`` (picklable: a Dask worker gets it by value).

    A failure of the loss is explained in one line where the cause is known: class labels out
    of range (:func:`label_error`), or a Hugging Face output (an object with ``.logits``) that
    a loss of tensors cannot take (:data:`TASK_HINT`)."""

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor]):
        self.fn = loss

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return _pair_loss(self.fn, model(x), y)


def _pair_loss(fn: Callable[[Tensor, Tensor], Tensor], out: Any, y: Tensor) -> Tensor:
    """``fn(out, y)``, its failures explained where the cause is known (see :class:`_PairLoss`)."""
    try:
        return fn(out, y)
    except (IndexError, RuntimeError) as err:
        error = label_error(out, y, fn) if "out of bounds" in str(err) else None
        if error is None and isinstance(y, Tensor) and y.is_floating_point():
            error = float_label_error(out, y, err)
        if error is not None:
            raise error from None
        raise
    except TypeError:
        if not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
            raise TypeError(
                f"The model returned a {type(out).__name__} (a Hugging Face output with .logits), which "
                f"the loss {_qualname(fn)} cannot take: {TASK_HINT}."
            ) from None
        raise


def _pair_outputs(model: nn.Module, batch: Batch) -> Tensor:
    return model(batch[0])


class _PairOutputLoss:
    """``loss(outputs, y)`` of a batch ``(x, y)``."""

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor]):
        self.fn = loss

    def __call__(self, outputs: Tensor, batch: Batch) -> Tensor:
        return _pair_loss(self.fn, outputs, batch[1])


def pair_task(loss: Callable[[Tensor, Tensor], Tensor], output_curvature: str | None = None) -> Task:
    """The task of a pair loss ``loss(outputs, targets)`` over batches ``(x, y)``: the loss
    ``loss(model(x), y)``, measured by the same loss, perturbations in ``x``."""
    return Task(
        loss=_PairLoss(loss),
        outputs=_pair_outputs,
        output_loss=_PairOutputLoss(loss),
        output_curvature=output_curvature,
        perturb=0,
        name=_qualname(loss) or "loss",
        pairs=True,
    )


def as_task(loss: Any) -> Task:
    """A :class:`Task` as given, or the pair task of a loss function ``loss(outputs, targets)``.

    Raises:
        TypeError: ``loss`` is neither.
    """
    if isinstance(loss, Task):
        return loss
    if not callable(loss):
        raise TypeError(
            f"loss must be a callable loss(outputs, targets) or a dask_influence.Task; got {type(loss).__name__}."
        )
    return pair_task(loss)
