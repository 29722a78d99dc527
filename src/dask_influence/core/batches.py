"""Batches of any structure: pytrees of tensors that share a leading sample dimension.

A batch is what a DataLoader yields and what a model's task reads: a pair ``(x, y)``, a
tuple, a dict (``{"input_ids", "attention_mask", "labels"}``, as every Hugging Face model
takes), or any nesting of tuples, lists and dicts whose leaves are tensors (or numpy
arrays) of shape ``(n, ...)``. Every function here treats the leaves alike: slicing a batch
slices every leaf along dimension 0, a sample is every leaf's row. Mappings that are not
plain dicts (a Hugging Face ``BatchEncoding``) are read as dicts.

Leaves of one batch may differ in their trailing shapes (token ids ``(n, T)``, labels
``(n,)``); batches of one data set may differ in them too (sequences padded per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..errors import NonFiniteError

Batch = Any
"""A pytree (tuples, lists, dicts) of tensors with a common leading sample dimension."""


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


def check_finite(name: str, t: Tensor, *, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds NaN or Inf.

    A finite sum means every entry is finite (a NaN or an Inf makes the sum non-finite), so the
    elementwise scan runs only when the sum is not (an entry to name, or an overflow of the sum):
    one reduction instead of a boolean copy, 15x faster on a 6.8M-parameter model's weights."""
    if t.is_floating_point() or t.is_complex():
        if bool(torch.isfinite(t.sum())):
            return
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            count = int(bad.sum())
            first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
            raise NonFiniteError(
                f"{name} contains {count} NaN/Inf value(s) (first at index {first}). "
                + (hint or "Clean or impute the data before computing influences.")
            )


def normalize(batch: Batch) -> Batch:
    """``batch`` with every mapping made a plain ``dict`` (a ``BatchEncoding``, a ``UserDict``)."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)
    if isinstance(batch, dict):
        return {k: normalize(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and not hasattr(batch, "_fields"):
        return tuple(normalize(v) for v in batch)
    if isinstance(batch, list):
        return [normalize(v) for v in batch]
    return batch


def leaves(batch: Batch) -> list[Any]:
    """The leaves of ``batch`` in a fixed order (dict keys as pytree flattening orders them)."""
    return tree_flatten(batch)[0]


def leaf_paths(batch: Batch) -> list[str]:
    """A readable path of each leaf, in :func:`leaves` order: ``"input_ids"``, ``"[0]"``, ``"a.b"``."""
    out: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key in tree_flatten(node)[1].context:  # the key order of tree_flatten
                walk(node[key], f"{path}.{key}" if path else str(key))
        elif isinstance(node, (tuple, list)):
            for i, child in enumerate(node):
                walk(child, f"{path}[{i}]")
        else:
            out.append(path or "batch")

    walk(batch, "")
    return out


def map_leaves(fn: Callable[[Any], Any], batch: Batch) -> Batch:
    """``batch`` with ``fn`` applied to every leaf."""
    return tree_map(fn, batch)


def size(batch: Batch) -> int:
    """The number of samples ``n`` (the leading dimension of the leaves; checked by :func:`check`)."""
    first = leaves(batch)[0]
    return int(first.shape[0])


def slice_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of every leaf."""
    return tree_map(lambda t: t[start:stop], batch)


def take(batch: Batch, index: Tensor) -> Batch:
    """The samples at ``index`` (a 1-D integer tensor) of every leaf."""
    return tree_map(lambda t: t[index.to(t.device)] if isinstance(t, Tensor) else t[index.cpu().numpy()], batch)


def unsqueeze(sample: Batch) -> Batch:
    """One sample (leaves without the sample dimension) as a batch of one."""
    return tree_map(lambda t: t.unsqueeze(0), sample)


def concat(batches: Sequence[Batch]) -> Batch:
    """The batches' samples one after another (same structure and trailing shapes)."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    joined = [torch.cat([f[0][i] for f in flat]) for i in range(len(flat[0][0]))]
    return tree_unflatten(joined, spec)


def repeat_first(batch: Batch, copies: int) -> Batch:
    """The first sample of ``batch`` repeated ``copies`` times (a batch of ``copies``)."""
    return tree_map(lambda t: t[:1].expand(copies, *t.shape[1:]).contiguous(), batch)


def structure(batch: Batch) -> str:
    """The batch's layout without its data: ``"(tensor, tensor)"``, ``"{input_ids, labels}"``."""
    if isinstance(batch, dict):
        return (
            "{"
            + ", ".join(
                f"{k}: {structure(v)}" if isinstance(v, (dict, list, tuple)) else str(k) for k, v in batch.items()
            )
            + "}"
        )
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(structure(v) for v in batch)
        return f"({inner})" if isinstance(batch, tuple) else f"[{inner}]"
    return "tensor" if isinstance(batch, (Tensor, np.ndarray)) else type(batch).__name__


def to_tensors(batch: Batch, name: str, *, dtype: torch.dtype, device: torch.device) -> Batch:
    """Every leaf as a tensor on ``device``: floating leaves cast to ``dtype``, integer and
    boolean leaves (token ids, masks, class labels) keep theirs.

    Raises:
        TypeError: a leaf is not a tensor or a numeric array (naming its path).
    """
    batch = normalize(batch)
    flat, spec = tree_flatten(batch)
    if not flat:
        raise TypeError(f"{name} holds no tensors; pass a tensor, a tuple or a dict of tensors.")
    paths = leaf_paths(batch)
    converted = [
        to_tensor(leaf, f"{name} {path!r}" if len(flat) > 1 else name, dtype=dtype, device=device)
        for leaf, path in zip(flat, paths)
    ]
    return tree_unflatten(converted, spec)


def check(batch: Batch, name: str) -> int:
    """Check that every leaf has the same number ``n >= 1`` of samples and is finite; return ``n``."""
    flat = leaves(batch)
    paths = leaf_paths(batch)
    sizes = {}
    for leaf, path in zip(flat, paths):
        label = f"{name} {path!r}" if len(flat) > 1 else name
        if leaf.ndim == 0:
            raise ValueError(f"{label} must have a leading sample dimension; got a scalar.")
        sizes[path] = int(leaf.shape[0])
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p}: {s}" for p, s in sizes.items())
        raise ValueError(
            f"The parts of {name} must hold the same number of samples; got {listed}. Pass the parts "
            "that belong together (every leaf's first dimension is the sample)."
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{name} is empty (0 samples); pass at least one sample.")
    for leaf, path in zip(flat, paths):
        check_finite(f"{name} {path!r}" if len(flat) > 1 else name, leaf)
    return n


def to_numpy(batch: Batch) -> Batch:
    """Every leaf as a CPU numpy array (bfloat16 widened to float32)."""

    def convert(t: Any) -> Any:
        if isinstance(t, Tensor):
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.numpy()
        return np.asarray(t)

    return tree_map(convert, normalize(batch))


def get_leaf(batch: Batch, path: str | int) -> Any:
    """The leaf at ``path``: a dict key (``"pixel_values"``), a position (``0``) or a dotted path."""
    node = batch
    parts: list[str | int] = (
        [path] if isinstance(path, int) else [int(p) if p.isdigit() else p for p in path.split(".")]
    )
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (tuple, list)) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        else:
            raise KeyError(path)
    return node


def replace_leaf(batch: Batch, path: str | int, value: Any) -> Batch:
    """A copy of ``batch`` (containers only) with the leaf at ``path`` replaced by ``value``."""
    parts: list[str | int] = (
        [path] if isinstance(path, int) else [int(p) if p.isdigit() else p for p in path.split(".")]
    )

    def put(node: Any, rest: list[str | int]) -> Any:
        if not rest:
            return value
        head = rest[0]
        if isinstance(node, dict):
            return {**node, head: put(node[head], rest[1:])}
        items = list(node)
        items[int(head)] = put(items[int(head)], rest[1:])
        return tuple(items) if isinstance(node, tuple) else items

    return put(batch, parts)
