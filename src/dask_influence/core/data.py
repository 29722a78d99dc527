"""Input handling for the solver core: tensors, arrays and training-data sources.

The core accepts
- a batch as a pair ``x, y`` of tensors or numpy arrays with equal first dimension ``n``,
  or (with a :class:`~.task.Task`) any pytree of them (:mod:`.batches`);
- training data for ``fit`` as a ``torch.utils.data.DataLoader``, any re-iterable of
  batches, or one batch of whole arrays (a pair ``(x, y)``, a dict of arrays).

Float inputs are cast to the model's dtype and moved to its device; integer inputs (token
ids, class labels, attention masks) keep their dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import batches
from .batches import check_finite, to_tensor


def check_pair(x: Tensor, y: Tensor, x_name: str = "x", y_name: str = "y") -> int:
    """Check that ``x`` and ``y`` hold the same number ``n >= 1`` of samples; return ``n``."""
    if x.ndim == 0:
        raise ValueError(f"{x_name} must have a leading sample dimension; got a scalar.")
    if y.ndim == 0:
        raise ValueError(f"{y_name} must have a leading sample dimension; got a scalar.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{x_name} and {y_name} must have the same number of samples; got "
            f"{x.shape[0]} and {y.shape[0]}. Pass the targets that belong to these inputs."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} is empty (0 samples); pass at least one sample.")
    check_finite(x_name, x)
    check_finite(y_name, y)
    return int(x.shape[0])


DICT_BATCHES = (
    "a loss(outputs, targets) takes (x, y) pairs; for dict batches (Hugging Face style) pass a "
    'dask_influence.Task as the loss, e.g. di.tasks.classification() (in a job file: [task] name = "classification"; '
    "causal_lm() and regression() likewise)"
)
"""What to do with dict batches given to a solver built with a pair loss, for messages."""


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        raise TypeError(
            f"Training batches must be (x, y) pairs; got a dict with keys {', '.join(map(str, batch))}: {DICT_BATCHES}."
        )
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"Training batches must be (x, y) pairs; got {type(batch).__name__}. Use a "
            "DataLoader over a dataset whose items are (input, target) tuples."
        ) from None
    return x, y


def pair_batch(batch: Any, dtype: torch.dtype, device: torch.device, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    """A pair ``(x, y)`` of tensors on ``device``, checked (:func:`check_pair`)."""
    bx, by = _split_batch(batch)
    x = to_tensor(bx, names[0], dtype=dtype, device=device)
    y = to_tensor(by, names[1], dtype=dtype, device=device)
    check_pair(x, y, *names)
    return x, y


def is_whole_arrays(data: Any) -> bool:
    """Whether ``data`` is ONE batch of whole arrays (to be cut into batches), not batches:
    a pair or tuple of arrays ``(x, y)``, or a dict of arrays ``{"input_ids": ..., ...}``."""
    if isinstance(data, Mapping):
        leaves = batches.leaves(batches.normalize(data))
        return bool(leaves) and all(isinstance(a, (Tensor, np.ndarray)) for a in leaves)
    return isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(a, (Tensor, np.ndarray)) for a in data)


class TrainingData:
    """A re-iterable source of training batches (pytrees of tensors) on the model's device.

    Args:
        data: a DataLoader, a re-iterable of batches (pairs ``(x, y)``, tuples, dicts), or
            one batch of whole arrays (a pair ``(x, y)``, a dict of arrays), cut into
            batches of ``batch_size``.
        batch_size: batch size used when ``data`` is whole arrays.
        perturb: the input leaf whose feature shape and dtype are recorded (``0``, the
            ``x`` of pairs; ``None``: none).

    Attributes:
        feature_shape: the shape of one sample of the ``perturb`` leaf (``()`` without one),
            recorded by :meth:`scan`.
        float_inputs: whether that leaf is floating point.
        structure: the layout of a batch (:func:`.batches.structure`).
    """

    def __init__(
        self,
        data: Any,
        *,
        dtype: torch.dtype,
        device: torch.device,
        batch_size: int = 256,
        perturb: str | int | None = 0,
        pairs: bool = True,
    ):
        self.dtype = dtype
        self.pairs = pairs
        self.device = device
        self.perturb = perturb
        self._arrays: Any = None
        self._source: Any = None
        if pairs and isinstance(data, Mapping):  # iterating it would give its keys as batches
            raise TypeError(f"The training data is a dict with keys {', '.join(map(str, data))}: {DICT_BATCHES}.")
        if pairs and is_whole_arrays(data) and len(data) == 2 and not isinstance(data, Mapping):
            self._arrays = pair_batch(tuple(data), dtype, device, ("x", "y"))
            self._source = None
            self.batch_size = int(batch_size)
        elif not pairs and is_whole_arrays(data):
            whole = batches.to_tensors(
                tuple(data) if isinstance(data, list) else data, "the training data", dtype=dtype, device=device
            )
            batches.check(whole, "the training data")
            self._arrays = whole
            self._source = None
            self.batch_size = int(batch_size)
        else:
            if isinstance(data, Iterator):
                raise TypeError(
                    "fit needs training data it can iterate over more than once; got a "
                    "one-shot iterator or generator. Pass the DataLoader itself (or a list "
                    "of batches) instead of iter(loader)."
                )
            if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Tensor, np.ndarray)):
                raise TypeError(
                    "Training data must be a DataLoader, a list of batches or one batch of whole "
                    f"arrays (a pair (x, y) or a dict of arrays); got {type(data).__name__}."
                )
            self._source = data
            self.batch_size = int(getattr(data, "batch_size", None) or batch_size)
        self._n: int | None = None
        self.feature_shape: torch.Size | None = None
        self.float_inputs: bool | None = None
        self.structure: str | None = None

    def _prepare(self, batch: Any, seen: int) -> Any:
        if self.pairs:
            try:
                return pair_batch(batch, self.dtype, self.device, ("training inputs", "training targets"))
            except ValueError as err:
                raise type(err)(f"In the training batch starting at sample {seen}: {err}") from None
        try:
            batch = batches.to_tensors(batch, "the training batch", dtype=self.dtype, device=self.device)
            batches.check(batch, "the training batch")
        except (TypeError, ValueError) as err:
            raise type(err)(f"In the training batch starting at sample {seen}: {err}") from None
        return batch

    def batches(self) -> Iterator[Any]:
        """Yield the batches as validated tensors on the model's device."""
        if self._arrays is not None:
            n = batches.size(self._arrays)
            for start in range(0, n, self.batch_size):
                yield batches.slice_rows(self._arrays, start, start + self.batch_size)
            return
        seen = 0
        for raw in self._source:
            batch = self._prepare(raw, seen)
            seen += batches.size(batch)
            yield batch

    def scan(self) -> int:
        """One pass to count samples and record the batch layout; returns ``n``."""
        n = 0
        for batch in self.batches():
            shape, is_float = input_signature(batch, self.perturb)
            layout = batches.structure(batch)
            if self.structure is None:
                self.structure, self.feature_shape, self.float_inputs = layout, shape, is_float
            elif layout != self.structure:
                raise ValueError(f"Training batches disagree on their layout: {self.structure} and {layout}.")
            elif shape != self.feature_shape:
                raise ValueError(
                    f"Training batches disagree on the feature shape: {tuple(self.feature_shape or ())} "
                    f"and {tuple(shape)}."
                )
            n += batches.size(batch)
        if n == 0:
            raise ValueError("The training data is empty; pass at least one sample to fit.")
        self._n = n
        return n

    def first(self) -> Any:
        """The first batch."""
        return next(self.batches())

    @property
    def num_samples(self) -> int:
        """The number of training samples ``n`` (counted by a pass on first use)."""
        if self._n is None:
            self.scan()
        assert self._n is not None
        return self._n

    def random_batch(self, generator: torch.Generator, batch_size: int) -> Any:
        """A batch of ``batch_size`` samples drawn uniformly without replacement.

        Works for whole arrays and for DataLoaders over map-style datasets; other sources
        fall back to a random whole batch from one pass.
        """
        if self._arrays is not None:
            n = batches.size(self._arrays)
            idx = torch.randperm(n, generator=generator)[:batch_size]
            return batches.take(self._arrays, idx)
        dataset = getattr(self._source, "dataset", None)
        if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            n = len(dataset)
            picks = torch.randperm(n, generator=generator)[:batch_size].tolist()
            collate = getattr(self._source, "collate_fn", None) or torch.utils.data.default_collate
            return self._prepare(collate([dataset[i] for i in picks]), 0)
        all_batches = list(self.batches())
        k = int(torch.randint(len(all_batches), (1,), generator=generator))
        return all_batches[k]


def input_signature(batch: Any, perturb: str | int | None) -> tuple[torch.Size, bool | None]:
    """``(feature shape, is floating point)`` of the input leaf ``perturb`` of a batch;
    ``(torch.Size([]), None)`` without one (or when the batch has no such leaf)."""
    if perturb is None:
        return torch.Size([]), None
    try:
        leaf = batches.get_leaf(batch, perturb)
    except (KeyError, IndexError, TypeError, ValueError):
        return torch.Size([]), None
    if not isinstance(leaf, (Tensor, np.ndarray)):
        return torch.Size([]), None
    is_float = leaf.is_floating_point() if isinstance(leaf, Tensor) else leaf.dtype.kind in "fc"
    return torch.Size(leaf.shape[1:]), bool(is_float)
