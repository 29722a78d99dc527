"""Retraining as Dask tasks: train on some training indices, measure every test point.

The user's train function is ``train(train_indices, seed) -> model`` (an ``nn.Module``) or
``-> state_dict`` (loaded into a copy of the ``model`` given to the evaluation);
``train_indices`` is a sorted int64 array ``(k,)`` of the training points to train on, and
``seed`` an integer for everything random in the training (initialization, batch order).
With ``warm_start`` it is called as ``train(train_indices, seed, init=state_dict)``, where
``init`` is a copy of the weights of the trained ``model`` to start from.

A run is one ``(train_indices, seed)``; its result is the measurement of every test point,
``(n_test,)``: the task's ``measurement`` (its loss by default; a pair loss ``loss(model(x), y)``
is measured by the same loss), each test point as a batch of one, the model in eval mode.
:func:`run_retrainings` runs the runs not yet done, each as one task on the cluster (with the
Dask resource ``GPU=1`` for CUDA models) or one after another in this process, and the
task that finishes a run writes it to the evaluation's records (:mod:`.records`) at once.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import progress as _progress
from ..core import batches
from ..core.task import Task, as_task
from ..errors import NonFiniteError


class RetrainingError(RuntimeError):
    """The user's train function raised in one run of an evaluation; the message names the run
    (subset or left-out point, training seed) and the original error, which is the ``__cause__``
    (in this process; on a cluster the message carries its type and text)."""


@dataclass(frozen=True)
class Retraining:
    """What every run of an evaluation shares; it travels to each worker once.

    Attributes:
        train: the train function (see the module docstring).
        test: the test batch (any pytree of tensors with a leading sample dimension ``n_test``).
        task: what is measured on each test point.
        model: the trained model: the template a returned state dict is loaded into, and the
            weights a warm start starts from; ``None`` if ``train`` returns models.
        warm_start: pass ``init=`` (a copy of ``model``'s state dict) to ``train``.
    """

    train: Callable[..., Any]
    test: Any
    task: Task
    model: nn.Module | None = None
    warm_start: bool = False

    def run(self, indices: np.ndarray, seed: int, label: str | None = None) -> np.ndarray:
        """Train on ``indices`` with ``seed`` and measure every test point: ``(n_test,)`` float64.

        Args:
            label: the run as the errors name it, e.g. ``"subset 3 of 50 (40 training points),
                training seed 7"`` (default: its size and seed).

        Raises:
            RetrainingError: the train function raised (the message names the run).
            NonFiniteError: the retrained model measures NaN or Inf (naming the run and test point).
            TypeError: the train function returned neither a model nor a state dict.
        """
        indices = np.asarray(indices, dtype=np.int64)
        label = label or f"the run on {indices.size} training points, training seed {int(seed)}"
        try:
            if self.warm_start:
                assert self.model is not None  # checked by make_retraining
                init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                out = self.train(indices, int(seed), init=init)
            else:
                out = self.train(indices, int(seed))
        except Exception as err:
            text = " ".join(str(err).split())
            raise RetrainingError(f"The train function failed in {label}: {type(err).__name__}: {text}") from err
        try:
            model = self._as_model(out)
        except TypeError as err:
            raise TypeError(f"In {label}, {err}") from None
        try:
            return measure(model, self.task, self.test)
        except NonFiniteError as err:
            raise NonFiniteError(f"In {label}, {err}") from None

    def _as_model(self, out: Any) -> nn.Module:
        if isinstance(out, nn.Module):
            return out
        if isinstance(out, Mapping):
            if self.model is None:
                raise TypeError(
                    "the train function returned a state dict; pass model= (a model of the same "
                    "architecture to load it into), or return the trained nn.Module."
                )
            model = copy.deepcopy(self.model)
            model.load_state_dict(out)
            return model
        raise TypeError(
            f"the train function returned a {type(out).__name__}; return the trained torch.nn.Module or its state_dict."
        )


def retrain_function(where: str, retrain: Callable[..., Any] | None, train: Callable[..., Any] | None) -> Callable:
    """The retraining function of ``where`` (``"di.evaluate.lds"``), given as ``retrain=`` or by
    its old spelling ``train=`` (with a :class:`~dask_influence.errors.RenamedWarning`)."""
    from ..renamed import renamed

    fn = renamed(where, "train", train, "retrain", retrain, stacklevel=4)
    if fn is None:
        raise TypeError(
            f"{where}() needs retrain=, the function retrain(train_indices, seed) -> model or state_dict "
            "that trains on the given training points."
        )
    return fn


def make_retraining(
    train: Callable[..., Any], test: Any, task: Any, *, model: nn.Module | None = None, warm_start: bool = False
) -> Retraining:
    """A checked :class:`Retraining`: ``test`` made one batch, ``task`` a :class:`~dask_influence.Task`.

    Args:
        test: a batch (``(x, y)``, a dict, any pytree of tensors or arrays), a map-style
            ``Dataset`` or a ``DataLoader`` (its batches are concatenated).
        task: a :class:`~dask_influence.Task` or a pair loss ``loss(outputs, targets)``.
    """
    if not callable(train):
        raise TypeError(f"train must be a function train(train_indices, seed) -> model; got {type(train).__name__}.")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the trained model); got {type(model).__name__}.")
    if warm_start and model is None:
        raise ValueError("warm_start=True starts from the trained weights; pass model= (the trained model).")
    batch = as_batch(test)
    batches.check(batch, "test")
    return Retraining(train=train, test=batch, task=as_task(task), model=model, warm_start=bool(warm_start))


def as_batch(data: Any) -> Any:
    """All of ``data`` as one batch: a ``DataLoader``'s batches concatenated, a ``Dataset``'s
    items collated, a batch as it is (numpy leaves as tensors)."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset
    from torch.utils.data._utils.collate import default_collate

    if isinstance(data, DataLoader):
        if not isinstance(data.dataset, IterableDataset):
            from ..mapping.sources import as_source

            as_source(data, name="test")  # the calculators' check: a shuffling loader is refused
        return batches.concat([_tensors(b) for b in data])
    if isinstance(data, Dataset) and not isinstance(data, (tuple, list, dict)):
        return _tensors(default_collate([data[i] for i in range(len(data))]))  # type: ignore[arg-type]
    return _tensors(data)


def _tensors(batch: Any) -> Any:
    return batches.map_leaves(
        lambda t: t if isinstance(t, torch.Tensor) else torch.as_tensor(t), batches.normalize(batch)
    )


def measure(model: nn.Module, task: Task, test: Any) -> np.ndarray:
    """The task's measurement of ``model`` on each test point (a batch of one): ``(n_test,)`` float64.

    The model is put in eval mode; floating test inputs take its dtype and device.

    Raises:
        NonFiniteError: a measurement is NaN or Inf (the retraining diverged).
    """
    model.eval()
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    device = first.device if first is not None else torch.device("cpu")
    batch = batches.to_tensors(test, "test", dtype=dtype, device=device)
    fn = task.measure()
    n = batches.size(batch)
    out = np.empty(n, dtype=np.float64)
    with torch.no_grad():
        for i in range(n):
            out[i] = float(fn(model, batches.slice_rows(batch, i, i + 1)))
    bad = np.nonzero(~np.isfinite(out))[0]
    if bad.size:
        raise NonFiniteError(
            f"the retrained model's measurement is {out[bad[0]]} on test point {int(bad[0])}; the "
            "retraining diverged: check the train function (learning rate, regularization)."
        )
    return out


def test_checksum(test: Any) -> str:
    """A sha256 of the test batch's leaves (what a resumed evaluation must measure again)."""
    digest = hashlib.sha256()
    for leaf in batches.leaves(test):
        array = leaf.detach().cpu().contiguous().numpy() if isinstance(leaf, torch.Tensor) else np.asarray(leaf)
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def function_name(fn: Any) -> str:
    """``module.qualname`` of a function (of ``functools.partial``'s function)."""
    inner = getattr(fn, "func", fn)
    return f"{getattr(inner, '__module__', '')}.{getattr(inner, '__qualname__', type(inner).__name__)}"


def _run_one(
    retraining: Retraining, r: int, indices: np.ndarray, seed: int, target: Any, label: str | None = None
) -> tuple[int, np.ndarray]:
    """One task: run ``r`` (train, measure), written to ``target`` (if any) before it returns."""
    row = retraining.run(indices, seed, label)
    if target is not None:
        target.write(r, row)
    return r, row


def current_client(client: Any) -> Any:
    """``client`` if given, ``None`` for ``False`` (run in this process), else the current Dask
    client, else ``None``."""
    if client is False:
        return None
    if client is not None:
        return client
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def run_retrainings(
    retraining: Retraining,
    runs: Sequence[tuple[np.ndarray, int]],
    records: Any,
    *,
    client: Any = None,
    gpu: bool | None = None,
    labels: Sequence[str] | None = None,
    what: str = "Retraining",
) -> dict[str, int]:
    """Run every run of ``runs`` (``(train_indices, seed)``) that ``records`` does not hold yet.

    Args:
        records: :class:`~.records.MemoryRecords` or :class:`~.records.ZarrRecords`.
        labels: each run as its errors name it (``len(runs)``; default: its size and seed).
        client: a ``distributed.Client``; ``None``: the current client, else this process;
            ``False``: this process.
        gpu: run the tasks with the Dask resource ``GPU=1`` (``None``: when ``retraining.model``
            is on CUDA).
        what: names the runs in progress lines (``what: 3 of 50 runs ...``), reported through
            the current :mod:`dask_influence.progress` reporter.

    Returns:
        ``{"retrained": runs run now, "skipped": runs already done}``.

    Raises:
        the first error of a run (the runs finished before it stay recorded).
    """
    done = records.done()
    todo = [r for r in range(len(runs)) if not done[r]]
    report = {"retrained": 0, "skipped": len(runs) - len(todo)}
    if not todo:
        return report
    skipped = f" ({report['skipped']:,} already done)" if report["skipped"] else ""
    meter = _progress.current().meter(f"{what}{skipped}", len(todo), "runs", force=True)
    client = current_client(client)
    if client is None:
        for r in todo:
            indices, seed = runs[r]
            records.write(r, retraining.run(indices, seed, labels[r] if labels else None))
            report["retrained"] += 1
            meter.advance()
        meter.finish()
        return report
    from distributed import as_completed

    if gpu is None:
        gpu = retraining.model is not None and any(p.is_cuda for p in retraining.model.parameters())
    shared = client.scatter(retraining, hash=False)
    target = records.target
    tag = uuid.uuid4().hex[:8]
    futures = [
        client.submit(
            _run_one,
            shared,
            r,
            runs[r][0],
            runs[r][1],
            target,
            labels[r] if labels else None,
            key=f"retrain-{tag}-{r}",
            pure=False,
            resources={"GPU": 1} if gpu else None,
        )
        for r in todo
    ]
    try:
        for future in as_completed(futures, loop=client.loop):  # also for a client that is not the default
            r, row = future.result()
            if target is None:
                records.write(r, row)
            report["retrained"] += 1
            meter.advance()
        meter.finish()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        del shared
    return report
