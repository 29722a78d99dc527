"""Ready-made tasks: the losses and measurements people train with.

Each function returns a :class:`~dask_influence.Task` for a solver
(``di.CgInfluence(model, di.tasks.classification())``), with the model outputs and the loss
as a function of them (so ``curvature="ggn"`` and EK-FAC work) and, where one exists, the
closed form of the loss's curvature in the outputs that EK-FAC uses.

Batches may be pairs ``(x, y)`` (the model is called as ``model(x)``) or dicts in the
Hugging Face style (``{"input_ids", "attention_mask", "labels"}``: the model is called as
``model(**inputs)`` without ``labels``, and its ``.logits`` are the outputs when it returns
an object that has them).

Signs: ``influence[i, j] = grad f(z_test_i)^T (H + lambda I)^-1 grad L(z_j)``. With the
loss as the measurement ``f`` (the default) a positive influence is helpful: removing the
training point would raise the test loss. With a measurement where higher is better (the
margin, a log-probability) a helpful training point has a NEGATIVE influence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.sampled_fisher import softmax_hessian_product, softmax_sampled_roots
from .core.task import Task, label_error

__all__ = ["Task", "causal_lm", "classification", "regression"]

IGNORE_INDEX = -100
"""Label value that marks a position without a target (the Hugging Face convention)."""


def _call(model: nn.Module, batch: Any, label_key: str) -> Tensor:
    """The model's outputs on a batch: ``model(x)`` for pairs, ``model(**inputs).logits`` for dicts."""
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != label_key}
        out = model(**inputs)
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        raise TypeError(
            f"The task takes (x, y) pairs or dicts with a {label_key!r} entry; got a {type(batch).__name__}."
        )
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"The model returned a {type(out).__name__}, not a tensor of outputs (nor an object with "
            ".logits); pass a Task whose outputs function picks the output tensor."
        )
    return logits


def _labels(batch: Any, label_key: str) -> Tensor:
    if isinstance(batch, dict):
        if label_key not in batch:
            raise KeyError(
                f"The batch has no {label_key!r} entry (its keys: {', '.join(map(str, batch))}); "
                f"pass the targets under {label_key!r} or label_key='...'."
            )
        return batch[label_key]
    return batch[1]


class _Outputs:
    """``outputs(model, batch)``: the logits (or regression outputs) of a batch."""

    def __init__(self, label_key: str):
        self.label_key = label_key

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return _call(model, batch, self.label_key)


class _CrossEntropy:
    """Cross-entropy of logits ``(n, c)`` against class labels ``(n,)``, mean over the batch."""

    def __init__(self, label_key: str):
        self.label_key = label_key

    def __call__(self, outputs: Tensor, batch: Any) -> Tensor:
        labels = _labels(batch, self.label_key)
        try:
            return F.cross_entropy(outputs, labels)
        except (IndexError, RuntimeError) as err:  # torch names neither the labels nor the classes
            error = label_error(outputs, labels) if "out of bounds" in str(err) else None
            if error is not None:
                raise error from None
            raise

    def curvature_product(self, outputs: Tensor, batch: Any, u: Tensor) -> Tensor | None:
        """The batch loss's Hessian in the logits ``(n, c, ...)`` times ``u`` (same shape), in closed
        form: ``w_j (p_j * u_j - p_j (p_j . u_j))`` over the class dimension 1, ``w_j`` 1 / (the number
        of labels not -100) where sample ``j``'s label is not -100, else 0. ``None`` for
        class-probability targets (then the loss is differentiated instead)."""
        labels = _labels(batch, self.label_key)
        if labels.dtype.is_floating_point:
            return None
        kept = (labels != IGNORE_INDEX).to(u.dtype)
        weight = kept / kept.sum().clamp_min(1)
        return softmax_hessian_product(outputs.movedim(1, -1), u.movedim(1, -1), weight).movedim(-1, 1)


class _Margin:
    """The margin ``logit_true - logsumexp(other logits)`` of a batch, mean over the batch."""

    def __init__(self, label_key: str):
        self.label_key = label_key

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        logits = _call(model, batch, self.label_key)
        labels = _labels(batch, self.label_key)
        true = logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        others = logits.scatter(1, labels.long().unsqueeze(1), float("-inf"))
        return (true - torch.logsumexp(others, dim=1)).mean()


class _ModelLoss:
    """``output_loss(outputs(model, batch), batch)``: the loss of a batch through the model."""

    def __init__(self, outputs: Any, output_loss: Any):
        self.outputs = outputs
        self.output_loss = output_loss

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.output_loss(self.outputs(model, batch), batch)


def classification(*, label_key: str = "labels", measurement: str = "loss", perturb: str | int | None = 0) -> Task:
    """Cross-entropy on logits: ``model(x)`` for pairs, ``model(**inputs).logits`` for dicts.

    Args:
        label_key: the dict entry that holds the class labels (dict batches).
        measurement: ``"loss"`` (the test point's cross-entropy) or ``"margin"`` (the true
            class's logit minus the log-sum-exp of the others; higher is better, so helpful
            training points have negative influence).
        perturb: the floating-point input for perturbation influences: ``0`` is the ``x``
            of pairs; name a dict key (``"pixel_values"``) for dict batches, or ``None``.
    """
    outputs = _Outputs(label_key)
    loss = _CrossEntropy(label_key)
    if measurement not in ("loss", "margin"):
        raise ValueError(f"measurement must be 'loss' or 'margin'; got {measurement!r}.")
    return Task(
        loss=_ModelLoss(outputs, loss),
        measurement=_Margin(label_key) if measurement == "margin" else None,
        outputs=outputs,
        output_loss=loss,
        output_curvature="classification",
        perturb=perturb,
        name="classification" if measurement == "loss" else "classification-margin",
    )


class _MeanSquaredError:
    """Mean squared error of outputs against targets of the same shape, mean over all entries."""

    def __init__(self, label_key: str):
        self.label_key = label_key

    def __call__(self, outputs: Tensor, batch: Any) -> Tensor:
        targets = _labels(batch, self.label_key)
        if targets.shape != outputs.shape:
            raise ValueError(
                f"regression() compares outputs of shape {tuple(outputs.shape)} with targets of shape "
                f"{tuple(targets.shape)}; they must match (a (n,) target against (n, 1) outputs would "
                "broadcast to (n, n)). Reshape the targets, e.g. y.reshape(-1, 1)."
            )
        return F.mse_loss(outputs, targets)

    def curvature_product(self, outputs: Tensor, batch: Any, u: Tensor) -> Tensor:
        """The batch loss's Hessian in the outputs times ``u``: ``(2 / outputs.numel()) u``."""
        return u * (2.0 / outputs.numel())


def regression(*, label_key: str = "labels", perturb: str | int | None = 0) -> Task:
    """Mean squared error of the outputs against targets of the same shape.

    Args:
        label_key: the dict entry that holds the targets (dict batches).
        perturb: as in :func:`classification`.
    """
    outputs = _Outputs(label_key)
    loss = _MeanSquaredError(label_key)
    return Task(
        loss=_ModelLoss(outputs, loss),
        outputs=outputs,
        output_loss=loss,
        output_curvature="regression",
        perturb=perturb,
        name="regression",
    )


def _lm_inputs(batch: Any) -> dict[str, Tensor]:
    if isinstance(batch, Tensor):
        return {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError(
            "causal_lm() takes dict batches with 'input_ids' (and optionally 'attention_mask' and "
            f"'labels'), or a tensor of token ids; got {type(batch).__name__}"
            + (f" with keys {', '.join(map(str, batch))}" if isinstance(batch, dict) else "")
            + "."
        )
    return batch


class _LmOutputs:
    """``model(input_ids, attention_mask).logits``: ``(n, T, V)``."""

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        inputs = _lm_inputs(batch)
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        out = model(**kwargs)
        return getattr(out, "logits", out)


def _predicted(batch: Any) -> tuple[Tensor, Tensor]:
    """The tokens to predict at positions ``t = 1..T-1`` ``(n, T-1)`` (0 where none) and whether
    each is predicted ``(n, T-1)`` bool (its label is not -100 and its attention mask is 1)."""
    inputs = _lm_inputs(batch)
    ids = inputs["input_ids"]
    targets = inputs.get("labels", ids)[:, 1:]
    weight = targets != IGNORE_INDEX
    if "attention_mask" in inputs:
        weight = weight & inputs["attention_mask"][:, 1:].bool()
    return targets.masked_fill(~weight, 0).long(), weight


def _token_losses(logits: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
    """Per position ``t = 1..T-1``: the cross-entropy of token ``t`` given the tokens before
    it ``(n, T-1)``, and the weight of the position (1 where it is predicted, else 0)."""
    safe, weight = _predicted(batch)
    predicted = logits[:, :-1]
    ce = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), safe.reshape(-1), reduction="none")
    return ce.reshape(safe.shape), weight.to(logits.dtype)


class _LmLoss:
    """Per sequence the mean next-token cross-entropy over its predicted positions; mean over sequences."""

    def __call__(self, logits: Tensor, batch: Any) -> Tensor:
        ce, weight = _token_losses(logits, batch)
        per_sequence = (ce * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1)
        return per_sequence.mean()

    def curvature_roots(self, logits: Tensor, batch: Any) -> Tensor:
        """Square roots of each sequence's loss Hessian in its logits ``(n, T, V)``, in closed form:
        ``((T-1) V, n, T, V)``, column ``(t, j)`` nonzero at position ``t`` only, so that
        ``sum_r S_r S_r^T = H_out`` per sequence (EK-FAC and the gradient index use it).

        A sequence's loss is ``sum_t w_t CE_t`` with ``w_t`` 1 / (its number of predicted
        positions) where ``t + 1`` is predicted, else 0: ``H_out`` is block-diagonal over
        positions with blocks ``w_t (diag(p_t) - p_t p_t^T)``, ``p_t = softmax(logits_t)``,
        each factored as ``sqrt(w_t) (diag(sqrt p_t) - p_t sqrt(p_t)^T)``; the last position
        predicts nothing.
        """
        n, length, vocab = logits.shape
        if length < 2:
            return logits.new_zeros(1, n, length, vocab)
        _, predicted = _predicted(batch)
        weight = predicted.double()
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1)  # (n, T-1)
        p = torch.softmax(logits[:, :-1].double(), dim=-1)  # (n, T-1, V)
        s = p.sqrt()
        root = torch.diag_embed(s) - p[..., :, None] * s[..., None, :]  # [n, t, i, j]
        root = root * weight.sqrt()[..., None, None]
        place = torch.eye(length - 1, length, dtype=root.dtype, device=root.device)  # position t of column t
        out = torch.einsum("tu,ntij->tjnui", place, root)  # (T-1, V, n, T, V)
        return out.reshape((length - 1) * vocab, n, length, vocab).to(logits.dtype)

    def curvature_product(self, logits: Tensor, batch: Any, u: Tensor) -> Tensor:
        """The BATCH loss's Hessian in the logits ``(n, T, V)`` times ``u`` ``(n, T, V)``, in closed
        form per position: ``(w_t / n) (p_t * u_t - p_t (p_t . u_t))`` with ``w_t`` as in
        :meth:`curvature_roots` (zero at the last position). ``O(n T V)``, whatever ``V``."""
        n, length, _ = logits.shape
        if length < 2:
            return torch.zeros_like(u)
        _, predicted = _predicted(batch)
        weight = logits.new_zeros((n, length), dtype=u.dtype)
        weight[:, :-1] = predicted.to(u.dtype)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1) / n  # (n, T), 0 at the last position
        return softmax_hessian_product(logits, u, weight)  # no copy into a zero tensor: the weight zeroes it

    draws_per_sample = True
    """:meth:`sampled_roots` takes one generator per sequence (a chunk is drawn in one pass)."""

    def sampled_roots(
        self, logits: Tensor, batch: Any, draws: int, generator: torch.Generator | Sequence[torch.Generator]
    ) -> Tensor:
        """Sampled roots of each sequence's loss Hessian in its logits ``(n, T, V)``: ``(draws, n, T, V)``.

        Per draw one label per predicted position from the model's predictive distribution
        (:func:`~dask_influence.core.sampled_fisher.softmax_sampled_roots`), weighted by
        ``sqrt(w_t)``: ``E[sum_k v_k v_k^T]`` is the Hessian :meth:`curvature_roots` factors
        exactly, at ``draws`` backward passes instead of ``(T - 1) V``. The last position (which
        predicts nothing) has weight 0, so its rows are zero. ``generator``: one, or one per sequence.
        """
        n, length, vocab = logits.shape
        if length < 2:
            return logits.new_zeros(draws, n, length, vocab)
        _, predicted = _predicted(batch)
        weight = logits.new_zeros((n, length), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        weight[:, :-1] = predicted.to(weight.dtype)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1)  # (n, T), 0 at the last position
        return softmax_sampled_roots(logits, draws, generator, weight)


class _LmLogProb:
    """The log-probability of each sequence's predicted tokens (a sum over positions), mean over sequences."""

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        ce, weight = _token_losses(_LmOutputs()(model, batch), batch)
        return -(ce * weight).sum(dim=1).mean()


def causal_lm(*, measurement: str = "loss") -> Task:
    """Next-token prediction of a causal language model (GPT-2 style).

    A batch is a dict with ``input_ids`` ``(n, T)``, optionally ``attention_mask`` (0 marks
    padding) and ``labels`` (the tokens to predict, ``-100`` where none; default
    ``input_ids``), or a tensor of token ids. The loss of one sequence is the mean, over its
    predicted positions ``t = 1..T-1`` (where ``attention_mask`` is 1 and the label is not
    ``-100``), of the cross-entropy of token ``t`` given the tokens before it; the batch loss
    is the mean of the sequences' losses. So every sequence counts once in ``H``, whatever its
    length.

    Args:
        measurement: ``"loss"`` (the test sequence's loss) or ``"log_prob"`` (the
            log-probability of its predicted tokens, e.g. of one completion given its prompt
            with the prompt's labels set to -100; higher is better, so helpful training
            sequences have negative influence).
    """
    if measurement not in ("loss", "log_prob"):
        raise ValueError(f"measurement must be 'loss' or 'log_prob'; got {measurement!r}.")
    outputs = _LmOutputs()
    loss = _LmLoss()
    return Task(
        loss=_ModelLoss(outputs, loss),
        measurement=_LmLogProb() if measurement == "log_prob" else None,
        outputs=outputs,
        output_loss=loss,
        output_curvature=None,
        perturb=None,
        name="causal_lm" if measurement == "loss" else "causal_lm-log_prob",
    )
