"""Data sources for the mapping layer: each one knows its length and how a block is loaded.

Accepted inputs (test or train):
- a ``DataLoader`` over a map-style dataset in sequential order (its ``batch_size`` is the
  block size unless one is given);
- a map-style ``Dataset`` plus a block size;
- a pair ``(x, y)`` of dask arrays (their chunks along the first axis are the blocks);
- a pair ``(x, y)`` of numpy arrays or tensors (blocks of ``block_size``).

A dataset is put in the graph ONCE as a literal key; each block task loads its own rows
from it on the worker, so data never passes through the scheduler. Only numpy arrays cross
task boundaries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from dask.base import tokenize
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from .literals import Literal, unbox
from .plan import even_sizes

DEFAULT_BLOCK_SIZE = 256


def to_numpy(t: Any) -> np.ndarray:
    """A CPU numpy array from a tensor (any device, bfloat16 widened to float32) or array."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def load_dataset_block(dataset: Any, collate: Any, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of a map-style dataset, collated: ``(x, y)`` numpy arrays."""
    batch = collate([dataset[i] for i in range(start, stop)])
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"Dataset items must be (input, target) pairs; the collated batch was a {type(batch).__name__}."
        ) from None
    return to_numpy(x), to_numpy(y)


def pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bundle a block of inputs and targets (a graph task)."""
    return np.asarray(x), np.asarray(y)


class BlockSource:
    """A sequence of ``n`` samples cut into blocks.

    Attributes:
        n: number of samples.
        block_sizes: sizes of the blocks, in order.
        feature_shape: shape of one input.
        token: a deterministic identity of the data (for task names and store checks).
    """

    n: int
    block_sizes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    input_dtype: np.dtype
    token: str

    def graph(self) -> dict:
        """Graph entries the block tasks depend on (a dataset literal, dask array chunks)."""
        raise NotImplementedError

    def block_task(self, k: int) -> tuple:
        """A task expression evaluating to block ``k`` as ``(x, y)`` numpy arrays."""
        raise NotImplementedError


class DatasetSource(BlockSource):
    """A map-style dataset loaded block by block on the workers."""

    def __init__(self, dataset: Any, block_size: int, collate: Any = None, name: str = "data"):
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise TypeError(
                f"The {name} dataset must be map-style (with __len__ and __getitem__); got "
                f"{type(dataset).__name__}. Materialize an iterable dataset into arrays or a "
                "TensorDataset, or pass a pair (x, y) of dask arrays."
            )
        self.dataset = dataset
        self.collate = collate or torch.utils.data.default_collate
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError(f"The {name} data is empty; pass at least one sample.")
        self.block_sizes = even_sizes(self.n, block_size)
        x0, _ = load_dataset_block(dataset, self.collate, 0, 1)
        self.feature_shape = tuple(x0.shape[1:])
        self.input_dtype = x0.dtype
        self.token = tokenize(type(dataset).__name__, dataset, self.n)
        self.key = f"dataset-{name}-{self.token}"

    def graph(self) -> dict:
        """The dataset as one literal graph entry, shared by all block tasks."""
        return {self.key: (unbox, Literal(self.dataset, self.token))}

    def block_task(self, k: int) -> tuple:
        """Load samples of block ``k`` from the dataset and collate them on the worker."""
        start = sum(self.block_sizes[:k])
        return (load_dataset_block, self.key, self.collate, start, start + self.block_sizes[k])


class DaskArraySource(BlockSource):
    """A pair of dask arrays; their chunks along axis 0 are the blocks."""

    def __init__(self, x: Any, y: Any, name: str = "data"):
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"The {name} inputs and targets have different lengths: {x.shape[0]} and "
                f"{y.shape[0]}. Pass targets that belong to the inputs."
            )
        if any(np.isnan(c) for c in x.chunks[0]) or any(np.isnan(s) for s in x.shape):
            raise ValueError(f"The {name} dask arrays have unknown chunk sizes; call .compute_chunk_sizes() first.")
        self.x = x.rechunk({i: -1 for i in range(1, x.ndim)})
        self.y = y.rechunk((self.x.chunks[0],) + tuple((s,) for s in y.shape[1:]))
        self.n = int(x.shape[0])
        if self.n == 0:
            raise ValueError(f"The {name} data is empty; pass at least one sample.")
        self.block_sizes = tuple(int(c) for c in self.x.chunks[0])
        self.feature_shape = tuple(int(s) for s in x.shape[1:])
        self.input_dtype = np.dtype(x.dtype)
        self.token = tokenize(self.x.name, self.y.name)

    def graph(self) -> dict:
        """The graphs of the input and target dask arrays."""
        return {**dict(self.x.__dask_graph__()), **dict(self.y.__dask_graph__())}

    def block_task(self, k: int) -> tuple:
        """Chunk ``k`` of the inputs and of the targets, paired."""
        xkey = (self.x.name, k) + (0,) * (self.x.ndim - 1)
        ykey = (self.y.name, k) + (0,) * (self.y.ndim - 1)
        return (pair, xkey, ykey)


class _ArrayDataset(Dataset):
    """In-memory arrays as a map-style dataset (sliced, not indexed item by item)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


def _stack(items: list) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([a for a, _ in items]), np.stack([b for _, b in items])


def as_source(data: Any, *, block_size: int | None = None, name: str = "data") -> BlockSource:
    """Turn any accepted input into a :class:`BlockSource` (see the module docstring)."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int; got {block_size!r}.")
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise TypeError(
                f"The {name} DataLoader wraps an iterable-style dataset, which has no random "
                "access by index; pass a map-style dataset, arrays, or dask arrays instead."
            )
        if not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            raise ValueError(
                f"The {name} DataLoader shuffles or uses a custom sampler, but the columns of "
                "the influence matrix must follow the dataset order. Pass "
                "DataLoader(dataset, batch_size=..., shuffle=False)."
            )
        return DatasetSource(data.dataset, block_size or data.batch_size, data.collate_fn, name)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if hasattr(x, "dask") and hasattr(y, "dask"):
            if block_size is not None:
                x, y = x.rechunk({0: block_size}), y.rechunk({0: block_size})
            return DaskArraySource(x, y, name)
        if isinstance(x, (np.ndarray, torch.Tensor)) and isinstance(y, (np.ndarray, torch.Tensor)):
            x, y = to_numpy(x), to_numpy(y)
            if len(x) != len(y):
                raise ValueError(f"The {name} inputs and targets have different lengths: {len(x)} and {len(y)}.")
            return DatasetSource(_ArrayDataset(x, y), block_size or DEFAULT_BLOCK_SIZE, _stack, name)
    if isinstance(data, Dataset) or (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (tuple, list, str, bytes, dict))
    ):
        if block_size is None:
            raise ValueError(f"Pass block_size with a {name} Dataset (the number of samples per block).")
        return DatasetSource(data, block_size, None, name)
    raise TypeError(
        f"Unsupported {name} data of type {type(data).__name__}. Pass a DataLoader "
        "(shuffle=False), a map-style Dataset with block_size, or a pair (x, y) of dask "
        "arrays, numpy arrays or tensors."
    )
