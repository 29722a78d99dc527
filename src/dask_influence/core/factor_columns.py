"""Test factors read by columns: scoring training points against factors too large to hold.

The influences of ``n`` training points on ``n_test`` test points are ``F @ G^T`` with the
factors ``F`` ``(n_test, p)`` and the training gradients ``G`` ``(n, p)``. When ``F`` does not
fit a worker's memory (16 test sequences of a 124M-parameter model are 8 GB in float32), the
calculator can score every test point in one pass over the training data instead of one pass
per group of test points that fits: it saves ``F`` to the store and each training block reads
it back a slab of columns at a time (:meth:`~.solvers.base.InfluenceModel.influences_from_factor_columns`).

- :class:`FactorColumns`: what the scoring reads, ``columns(start, stop)`` ``(n_test, stop - start)``;
- :class:`TensorColumns`: factors in memory, as one;
- :func:`slabs`: a column range cut into slabs of at most a number of bytes;
- :func:`held_groups`: consecutive chunks of a training block, grouped so that the gradients held
  for one read of the factors stay within a number of bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

SLAB_BYTES = 256 * 2**20
"""The largest slab of factor columns ``(n_test, width)`` read at once, in bytes."""


@runtime_checkable
class FactorColumns(Protocol):
    """Factors ``(n_test, p)`` read a range of columns at a time."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_test, p)``."""
        ...

    def columns(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` of every row: ``(n_test, stop - start)``; finite (a reader raises otherwise)."""
        ...


class TensorColumns:
    """Factors held in memory as :class:`FactorColumns` (views, no copies)."""

    def __init__(self, factors: Tensor):
        if factors.ndim != 2:
            raise ValueError(f"factors must be (n_test, p); got shape {tuple(factors.shape)}.")
        self.factors = factors

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_test, p)``."""
        return int(self.factors.shape[0]), int(self.factors.shape[1])

    def columns(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop``: a view ``(n_test, stop - start)``."""
        return self.factors[:, start:stop]


def slabs(
    start: int, stop: int, rows: int, itemsize: int, *, step: int = 1, max_bytes: int | None = None
) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` cut into ranges of at most ``max_bytes`` for ``rows`` rows of ``itemsize`` bytes,
    each a multiple of ``step`` columns long (a weight's rows: ``step`` its row length), except where one
    ``step`` alone is larger. ``max_bytes``: :data:`SLAB_BYTES` by default."""
    max_bytes = SLAB_BYTES if max_bytes is None else max_bytes
    per = max(step, (max_bytes // max(1, rows * itemsize)) // step * step)
    for a in range(start, stop, per):
        yield a, min(stop, a + per)


def held_groups(chunks: Iterable[tuple[int, Any]], size_of: Any, max_bytes: int) -> Iterator[list[tuple[int, Any]]]:
    """Consecutive ``(offset, chunk)`` pairs grouped so that a group's ``size_of(chunk)`` bytes stay within
    ``max_bytes`` (a group always holds at least one chunk): the gradients held for one read of the factors."""
    group: list[tuple[int, Any]] = []
    held = 0
    for offset, chunk in chunks:
        size = int(size_of(chunk))
        if group and held + size > max_bytes:
            yield group
            group, held = [], 0
        group.append((offset, chunk))
        held += size
    if group:
        yield group


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or nested lists and tuples of them)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def as_columns(factors: Any) -> FactorColumns:
    """``factors`` as :class:`FactorColumns`: a reader as it is, a tensor wrapped."""
    if isinstance(factors, Tensor):
        return TensorColumns(factors)
    if isinstance(factors, FactorColumns):
        return factors
    raise TypeError(
        f"factors must be a torch.Tensor (n_test, p) or a FactorColumns reader; got {type(factors).__name__}."
    )


__all__ = ["SLAB_BYTES", "FactorColumns", "TensorColumns", "as_columns", "held_groups", "slabs", "tensor_bytes"]
