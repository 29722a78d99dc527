"""Data sources for the mapping layer: each one knows its length and how a block is loaded.

Accepted inputs (test or train):
- a ``DataLoader`` over a map-style dataset in sequential order (its ``batch_size`` is the
  block size unless one is given); its items may be pairs or dicts (Hugging Face style);
- a map-style ``Dataset`` plus a block size (a Hugging Face ``datasets.Dataset`` with the
  torch format included);
- a pair ``(x, y)`` (or a tuple) of dask arrays, or a dict of dask arrays (their chunks along
  the first axis are the blocks);
- a pair ``(x, y)`` (or a tuple) of numpy arrays or tensors, or a dict of them (blocks of
  ``block_size``: the caller's ``test_block_size`` / ``train_block_size``).

A block is a batch (:mod:`dask_influence.core.batches`): a pytree of numpy arrays.

A dataset is put in the graph ONCE as a literal key; each block task loads its own rows
from it on the worker, so data never passes through the scheduler. Only numpy arrays cross
task boundaries.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from dask.base import tokenize
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from ..core import batches
from ..core.data import input_signature, is_whole_arrays
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


def load_dataset_block(dataset: Any, collate: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a map-style dataset, collated: a batch of numpy arrays (a list
    at the top becomes a tuple: ``default_collate`` turns ``(x, y)`` items into ``[x, y]``).
    In-memory arrays are sliced, not gathered item by item (the same batch: 20% of a small
    index build went to a per-item gather and stack)."""
    if isinstance(dataset, _ArrayDataset):
        return batches.map_leaves(lambda a: np.array(a[start:stop]), dataset.arrays)
    batch = collate([dataset[i] for i in range(start, stop)])
    if isinstance(batch, list):
        batch = tuple(batch)
    return batches.to_numpy(batch)


def pair(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Bundle a block's arrays as a tuple, e.g. inputs and targets (a graph task)."""
    return tuple(np.asarray(a) for a in arrays)


def named(names: tuple[str, ...], *arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Bundle a block's arrays as a dict (a graph task)."""
    return {k: np.asarray(a) for k, a in zip(names, arrays)}


class BlockSource:
    """A sequence of ``n`` samples cut into blocks.

    Attributes:
        n: number of samples.
        block_sizes: sizes of the blocks, in order.
        feature_shape: shape of one sample of the input that perturbations differentiate in
            (the ``x`` of pairs; ``()`` when the solver's task names none).
        input_dtype: that input's dtype (``None`` without one).
        structure: the layout of a block (:func:`~dask_influence.core.batches.structure`).
        token: a deterministic identity of the data (for task names and store checks).
    """

    n: int
    block_sizes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    input_dtype: np.dtype | None
    structure: str
    token: str

    def _describe_first(self, first: Any, perturb: str | int | None) -> None:
        shape, is_float = input_signature(first, perturb)
        self.feature_shape = tuple(int(s) for s in shape)
        self.input_dtype = np.dtype(batches.get_leaf(first, perturb).dtype) if is_float is not None else None  # type: ignore[arg-type]
        self.structure = batches.structure(first)

    def graph(self) -> dict:
        """Graph entries the block tasks depend on (a dataset literal, dask array chunks)."""
        raise NotImplementedError

    def block_task(self, k: int) -> tuple:
        """A task expression evaluating to block ``k`` as ``(x, y)`` numpy arrays."""
        raise NotImplementedError


class DatasetSource(BlockSource):
    """A map-style dataset loaded block by block on the workers.

    Attributes:
        bounds: ``(n_blocks + 1,)`` row offsets: block ``k`` is rows ``bounds[k]:bounds[k + 1]``
            (so a block's task is built in O(1)).
    """

    def __init__(
        self, dataset: Any, block_size: int, collate: Any = None, name: str = "data", perturb: str | int | None = 0
    ):
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
        self.bounds = tuple(itertools.accumulate(self.block_sizes, initial=0))
        self._describe_first(load_dataset_block(dataset, self.collate, 0, 1), perturb)
        self.token = tokenize(type(dataset).__name__, dataset, self.n)
        self.key = f"dataset-{name}-{self.token}"

    def graph(self) -> dict:
        """The dataset as one literal graph entry, shared by all block tasks."""
        return {self.key: (unbox, Literal(self.dataset, self.token))}

    def block_task(self, k: int) -> tuple:
        """Load samples of block ``k`` from the dataset and collate them on the worker."""
        return (load_dataset_block, self.key, self.collate, self.bounds[k], self.bounds[k + 1])


class DaskArraySource(BlockSource):
    """A tuple (e.g. ``(x, y)``) or a dict of dask arrays; their chunks along axis 0 are the blocks."""

    def __init__(self, arrays: tuple | dict, name: str = "data", perturb: str | int | None = 0):
        self.names: tuple[str, ...] | None = tuple(arrays) if isinstance(arrays, dict) else None
        parts = list(arrays.values()) if isinstance(arrays, dict) else list(arrays)
        lengths = {int(a.shape[0]) if not np.isnan(a.shape[0]) else -1 for a in parts}
        if len(lengths) > 1:
            listed = ", ".join(str(a.shape[0]) for a in parts)
            raise ValueError(
                f"The {name} arrays have different lengths: {listed}. Pass arrays (e.g. inputs and "
                "targets) that belong together."
            )
        first = parts[0]
        if any(np.isnan(c) for c in first.chunks[0]) or any(np.isnan(s) for s in first.shape):
            raise ValueError(f"The {name} dask arrays have unknown chunk sizes; call .compute_chunk_sizes() first.")
        rows = first.rechunk({i: -1 for i in range(1, first.ndim)}).chunks[0]
        self.arrays = [a.rechunk((rows,) + tuple((s,) for s in a.shape[1:])) for a in parts]
        self.n = int(first.shape[0])
        if self.n == 0:
            raise ValueError(f"The {name} data is empty; pass at least one sample.")
        self.block_sizes = tuple(int(c) for c in rows)
        self.token = tokenize(*[a.name for a in self.arrays], self.names)
        # shapes and dtypes only: empty stand-ins for one row of each array (nothing is computed)
        self._describe_first(self._assemble([np.empty((0,) + a.shape[1:], a.dtype) for a in self.arrays]), perturb)

    @property
    def x(self) -> Any:
        """The first array (the inputs of a pair)."""
        return self.arrays[0]

    def _assemble(self, parts: list) -> Any:
        if self.names is not None:
            return dict(zip(self.names, parts))
        return tuple(parts)

    def graph(self) -> dict:
        """The graphs of the dask arrays."""
        out: dict = {}
        for a in self.arrays:
            out.update(dict(a.__dask_graph__()))
        return out

    def block_task(self, k: int) -> tuple:
        """Chunk ``k`` of every array, bundled as the tuple or dict they came in."""
        keys = [(a.name, k) + (0,) * (a.ndim - 1) for a in self.arrays]
        if self.names is not None:
            return (named, self.names, *keys)
        return (pair, *keys)

    def load_block(self, k: int) -> Any:
        """Block ``k`` computed in this process: the bundled numpy arrays."""
        import dask

        return self._assemble(list(dask.compute(*[a.blocks[k] for a in self.arrays], scheduler="sync")))


class _ArrayDataset(Dataset):
    """In-memory arrays (a tuple or dict of them) as a map-style dataset."""

    def __init__(self, arrays: Any):
        self.arrays = arrays
        self.n = batches.size(arrays)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return batches.map_leaves(lambda a: a[i], self.arrays)


def _stack(items: list) -> Any:
    """Collate items of :class:`_ArrayDataset` (tuples or dicts of arrays) into one batch."""
    first = items[0]
    if isinstance(first, dict):
        return {k: np.stack([item[k] for item in items]) for k in first}
    return tuple(np.stack([item[j] for item in items]) for j in range(len(first)))


def as_source(
    data: Any, *, block_size: int | None = None, name: str = "data", perturb: str | int | None = 0
) -> BlockSource:
    """Turn any accepted input into a :class:`BlockSource` (see the module docstring).

    Args:
        perturb: the input leaf whose feature shape and dtype the source records (the
            solver task's ``perturb``: ``0`` is the ``x`` of pairs).
    """
    keyword = f"{name}_block_size" if name in ("test", "train") else "block_size"  # the caller's name for it
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{keyword} must be a positive int; got {block_size!r}.")
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise TypeError(
                f"The {name} DataLoader wraps an iterable-style dataset, which has no random "
                "access by index; pass a map-style dataset, arrays, or dask arrays instead."
            )
        if not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            what = "shuffles (shuffle=True)" if isinstance(data.sampler, RandomSampler) else "uses a custom sampler"
            raise ValueError(
                f"The {name} DataLoader {what}, but the rows and columns of the influence matrix "
                "follow the dataset order. Pass "
                f"DataLoader(dataset, batch_size={data.batch_size or '...'}, shuffle=False) instead "
                "(solver.fit accepts a shuffling loader; the same loader without shuffling fits the same solver)."
            )
        return DatasetSource(data.dataset, block_size or data.batch_size, data.collate_fn, name, perturb)
    if isinstance(data, (tuple, list, dict)) and data:
        parts = list(data.values()) if isinstance(data, dict) else list(data)
        if all(hasattr(a, "dask") for a in parts):
            if isinstance(data, dict) and not all(isinstance(k, str) for k in data):
                raise TypeError(f"The {name} dict of dask arrays must have string keys.")
            if block_size is not None:
                parts = [a.rechunk({0: block_size}) for a in parts]
            arrays = dict(zip(data, parts)) if isinstance(data, dict) else tuple(parts)
            return DaskArraySource(arrays, name, perturb)
        if is_whole_arrays(data):
            arrays = batches.to_numpy(tuple(data) if isinstance(data, list) else data)
            lengths = {len(a) for a in batches.leaves(arrays)}
            if len(lengths) > 1:
                listed = " and ".join(str(len(a)) for a in batches.leaves(arrays))
                raise ValueError(f"The {name} inputs and targets have different lengths: {listed}.")
            return DatasetSource(_ArrayDataset(arrays), block_size or DEFAULT_BLOCK_SIZE, _stack, name, perturb)
    if isinstance(data, Dataset) or (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (tuple, list, str, bytes, dict))
    ):
        if block_size is None:
            raise ValueError(f"Pass {keyword} with a {name} Dataset (the number of samples per block).")
        return DatasetSource(data, block_size, None, name, perturb)
    raise TypeError(
        f"Unsupported {name} data of type {type(data).__name__}. Pass a DataLoader "
        f"(shuffle=False), a map-style Dataset with {keyword}, or a pair (x, y) or a dict of "
        "dask arrays, numpy arrays or tensors."
    )
