"""What every peer driver shares: the models, the data, the loss and the line protocol.

Each peer library runs in its own virtual environment (``make bench-env-<peer>``) as a child
process of :mod:`benchmarks.peers`: ``<venv>/bin/python -m benchmarks.peer_<name>``. This
module imports only torch, numpy and the standard library (and transformers, lazily, for the
GPT-2 model): it is imported inside the peers' environments, where dask-influence is not
installed.

Protocol (the same as :mod:`benchmarks.pydvl_driver`): one JSON command per line on stdin,
one answer per command on stdout, a line starting with ``@@ `` followed by JSON. Commands:

- ``load``: ``arch``, ``state`` (a ``state_dict`` file), ``x_train``, ``y_train``, ``x_test``,
  ``y_test`` (``.npy`` files), ``threads``, ``batch_size``; answers the library's versions;
- ``run``: ``method`` (one of ours: ``Direct``, ``CG``, ``LiSSA``, ``Arnoldi``, ``EK-FAC``),
  ``params`` (our hyperparameters: ``regularization``, ``rank``, ``krylov_dimension``,
  ``maxiter``, ``scale``, ``batch_size``, ``iterations``, ...), ``out`` (an ``.npy`` path);
  writes the ``(n_test, n_train)`` influence matrix IN OUR CONVENTION (see below) and answers
  the phase times ``fit_s``, ``factors_s`` (``None`` where the library does not separate
  factors from scoring), ``scoring_s`` and ``normalization`` (what was done to its scores);
- ``quit``.

Our convention (dask-influence, ``docs/concepts.md``): ``influence[i, j] =
grad L(test_i)^T (H + lambda I)^-1 grad L(train_j)`` with ``H`` the Hessian of the MEAN
training loss and per-sample losses; positive means helpful. Each driver maps its library's
regularization (damping) and the sign and scale of its scores onto it and says how in
``normalization``.

Data: a classification problem is ``x`` (features) and ``y`` (class labels); the GPT-2 problem
``gpt2-tiny`` is ``x`` = token ids ``(n, T)`` and ``y`` = attention mask ``(n, T)``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.models import build_model

IGNORE_INDEX = -100

# the tiny GPT-2 of benchmarks/transformers.py (3,696 parameters), eager attention (vmap-able)
GPT2_TINY = {"vocab_size": 16, "n_positions": 8, "n_embd": 16, "n_layer": 1, "n_head": 2}


def is_lm(arch: str) -> bool:
    return arch.startswith("gpt2")


def build_hf_gpt2(arch: str = "gpt2-tiny") -> nn.Module:
    """The Hugging Face model (random weights until a state is loaded), eager attention, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if arch != "gpt2-tiny":
        raise ValueError(f"unknown language model {arch!r}")
    config = GPT2Config(**GPT2_TINY, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


class LogitsOf(nn.Module):
    """A Hugging Face causal LM as a plain tensor model: ``(input_ids, attention_mask) -> logits``.

    The peers' APIs call ``model(*inputs)`` and expect a tensor; the parameters are the
    wrapped model's, under the prefix ``lm.``.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids.long(), attention_mask=attention_mask.long()).logits


def load_model(arch: str, state_path: str) -> nn.Module:
    """The trained model as a tensor model: ``model(*inputs) -> outputs`` (see :func:`inputs_target`)."""
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if is_lm(arch):
        lm = build_hf_gpt2(arch)
        lm.load_state_dict(state)
        return LogitsOf(lm).eval()
    model = build_model(arch)
    model.load_state_dict(state)
    return model.eval()


def lm_labels(ids: Tensor, mask: Tensor) -> Tensor:
    """The tokens to predict: the ids, ``-100`` where the attention mask is 0."""
    return ids.long().masked_fill(mask == 0, IGNORE_INDEX)


def sequence_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Per sequence, the mean next-token cross-entropy over its predicted positions ``(n,)``.

    The loss of ``dask_influence.tasks.causal_lm()``: positions ``t = 1..T-1`` whose label is
    not ``-100``; a sequence counts once whatever its length.
    """
    targets = labels.long()[:, 1:]
    weight = targets != IGNORE_INDEX
    safe = targets.masked_fill(~weight, 0)
    predicted = logits[:, :-1]
    ce = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), safe.reshape(-1), reduction="none")
    w = weight.to(logits.dtype)
    return (ce.reshape(safe.shape) * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)


def per_sample_loss(arch: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss(outputs, target) -> (n,)``: cross-entropy per sample, or per sequence for a language model."""
    if is_lm(arch):
        return sequence_losses
    return lambda out, y: F.cross_entropy(out, y.long(), reduction="none")


class PerSampleLoss(nn.Module):
    """The per-sample loss as a module with ``reduction`` (``"none"``, ``"sum"`` or ``"mean"``)."""

    def __init__(self, arch: str, reduction: str = "none"):
        super().__init__()
        self.fn = per_sample_loss(arch)
        self.reduction = reduction

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        losses = self.fn(outputs, target)
        if self.reduction == "sum":
            return losses.sum()
        if self.reduction == "mean":
            return losses.mean()
        return losses


def inputs_target(arch: str, x: np.ndarray, y: np.ndarray) -> tuple[tuple[Tensor, ...], Tensor]:
    """``(inputs, target)``: the model is called as ``model(*inputs)`` and the loss as ``loss(outputs, target)``."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if is_lm(arch):
        return (xt, yt), lm_labels(xt, yt)
    return (xt,), yt


class Problem:
    """A loaded problem inside a driver: model, tensors and the loss."""

    def __init__(self, msg: dict):
        torch.set_num_threads(int(msg.get("threads", torch.get_num_threads())))
        self.arch = msg["arch"]
        self.state_path = msg["state"]
        self.model = load_model(self.arch, msg["state"])
        arrays = {k: np.load(msg[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
        self.train_inputs, self.train_target = inputs_target(self.arch, arrays["x_train"], arrays["y_train"])
        self.test_inputs, self.test_target = inputs_target(self.arch, arrays["x_test"], arrays["y_test"])
        self.batch_size = int(msg["batch_size"])
        self.loss = per_sample_loss(self.arch)

    @property
    def n_train(self) -> int:
        return len(self.train_target)

    @property
    def n_test(self) -> int:
        return len(self.test_target)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def train_tuples(self) -> tuple[Tensor, ...]:
        return (*self.train_inputs, self.train_target)

    def test_tuples(self) -> tuple[Tensor, ...]:
        return (*self.test_inputs, self.test_target)


def serve(driver: Any) -> None:
    """Answer commands from stdin until ``quit`` (the protocol above)."""
    logging.basicConfig(stream=sys.stderr, level=logging.ERROR)
    warnings.simplefilter("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **getattr(driver, msg["cmd"])(msg)}
        except Exception as err:  # reported to the runner, which records it and goes on
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        sys.stdout.write("@@ " + json.dumps(reply) + "\n")
        sys.stdout.flush()


class Clock:
    """Phase times: ``with clock("fit_s"): ...``."""

    def __init__(self) -> None:
        self.times: dict[str, float | None] = {}

    def __call__(self, key: str) -> _Phase:
        return _Phase(self.times, key)


class _Phase:
    def __init__(self, times: dict, key: str):
        self.times, self.key = times, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.times[self.key] = time.perf_counter() - self.start


def save_scores(path: str, scores: Tensor | np.ndarray) -> None:
    values = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    np.save(path, values.astype(np.float32))
