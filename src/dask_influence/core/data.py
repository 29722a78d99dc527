"""Input handling for the solver core: tensors, arrays and training-data sources.

The core accepts
- a batch as a pair ``x, y`` of tensors or numpy arrays with equal first dimension ``n``;
- training data for ``fit`` as a ``torch.utils.data.DataLoader`` yielding ``(x, y)`` batches,
  any re-iterable of ``(x, y)`` batches, or one pair ``(x, y)`` of whole arrays.

Float inputs are cast to the model's dtype and moved to its device; integer inputs (token
ids, class labels) keep their dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .gradients import check_finite


def to_tensor(a: Any, name: str, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Convert ``a`` (tensor, numpy array or nested sequence) to a tensor on ``device``.

    Floating inputs are cast to ``dtype``; integer and boolean inputs keep theirs.
    Raises ``TypeError`` for objects that are not array-like.
    """
    if isinstance(a, Tensor):
        t = a
    elif isinstance(a, np.ndarray) or np.isscalar(a) or isinstance(a, (list, tuple)):
        arr = np.asarray(a)
        if arr.dtype == object:
            raise TypeError(f"{name} must be numeric; got an array of Python objects.")
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"{name} must be numeric; got an array of dtype {arr.dtype}.")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array; got {type(a).__name__}.")
    if t.is_floating_point():
        t = t.to(device=device, dtype=dtype)
    else:
        t = t.to(device=device)
    return t


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


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, dict):
        raise TypeError(
            "Training batches must be (x, y) pairs; got a dict. Wrap the dataset so that "
            "each item is an (input, target) tuple."
        )
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"Training batches must be (x, y) pairs; got {type(batch).__name__}. Use a "
            "DataLoader over a dataset whose items are (input, target) tuples."
        ) from None
    return x, y


class TrainingData:
    """A re-iterable source of ``(x, y)`` training batches on the model's device.

    Args:
        data: a DataLoader, a re-iterable of ``(x, y)`` batches, or a pair ``(x, y)``
            of whole arrays (split into batches of ``batch_size``).
        batch_size: batch size used when ``data`` is a pair of arrays.
    """

    def __init__(self, data: Any, *, dtype: torch.dtype, device: torch.device, batch_size: int = 256):
        self.dtype = dtype
        self.device = device
        self._arrays: tuple[Tensor, Tensor] | None = None
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(a, (Tensor, np.ndarray)) for a in data)
        ):
            x = to_tensor(data[0], "x", dtype=dtype, device=device)
            y = to_tensor(data[1], "y", dtype=dtype, device=device)
            check_pair(x, y)
            self._arrays = (x, y)
            self._source: Any = None
            self.batch_size = int(batch_size)
        else:
            if isinstance(data, Iterator):
                raise TypeError(
                    "fit needs training data it can iterate over more than once; got a "
                    "one-shot iterator or generator. Pass the DataLoader itself (or a list "
                    "of batches) instead of iter(loader)."
                )
            if not isinstance(data, Iterable):
                raise TypeError(
                    "Training data must be a DataLoader, a list of (x, y) batches or a "
                    f"pair (x, y) of arrays; got {type(data).__name__}."
                )
            self._source = data
            self.batch_size = int(getattr(data, "batch_size", None) or batch_size)
        self._n: int | None = None
        self.feature_shape: torch.Size | None = None

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches as validated tensors on the model's device."""
        if self._arrays is not None:
            x, y = self._arrays
            for start in range(0, x.shape[0], self.batch_size):
                yield x[start : start + self.batch_size], y[start : start + self.batch_size]
            return
        seen = 0
        for batch in self._source:
            bx, by = _split_batch(batch)
            x = to_tensor(bx, "training inputs", dtype=self.dtype, device=self.device)
            y = to_tensor(by, "training targets", dtype=self.dtype, device=self.device)
            try:
                check_pair(x, y, "training inputs", "training targets")
            except ValueError as err:
                raise type(err)(f"In the training batch starting at sample {seen}: {err}") from None
            seen += int(x.shape[0])
            yield x, y

    def scan(self) -> int:
        """One pass to count samples and record the feature shape; returns ``n``."""
        n = 0
        for x, _ in self.batches():
            if self.feature_shape is None:
                self.feature_shape = x.shape[1:]
            elif x.shape[1:] != self.feature_shape:
                raise ValueError(
                    f"Training batches disagree on the feature shape: {tuple(self.feature_shape)} "
                    f"and {tuple(x.shape[1:])}."
                )
            n += int(x.shape[0])
        if n == 0:
            raise ValueError("The training data is empty; pass at least one sample to fit.")
        self._n = n
        return n

    @property
    def num_samples(self) -> int:
        """The number of training samples ``n`` (counted by a pass on first use)."""
        if self._n is None:
            self.scan()
        assert self._n is not None
        return self._n

    def random_batch(self, generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
        """A batch of ``batch_size`` samples drawn uniformly without replacement.

        Works for pairs of arrays and for DataLoaders over map-style datasets; other
        sources fall back to a random whole batch from one pass.
        """
        if self._arrays is not None:
            x, y = self._arrays
            idx = torch.randperm(x.shape[0], generator=generator)[:batch_size].to(x.device)
            return x[idx], y[idx]
        dataset = getattr(self._source, "dataset", None)
        if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
            n = len(dataset)
            picks = torch.randperm(n, generator=generator)[:batch_size].tolist()
            collate = getattr(self._source, "collate_fn", None) or torch.utils.data.default_collate
            bx, by = _split_batch(collate([dataset[i] for i in picks]))
            x = to_tensor(bx, "training inputs", dtype=self.dtype, device=self.device)
            y = to_tensor(by, "training targets", dtype=self.dtype, device=self.device)
            check_pair(x, y, "training inputs", "training targets")
            return x, y
        batches = list(self.batches())
        k = int(torch.randint(len(batches), (1,), generator=generator))
        return batches[k]
