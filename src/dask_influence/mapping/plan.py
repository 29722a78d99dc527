"""The block plan: contiguous index ranges of test and train data <-> output chunks.

Test block ``i`` covers rows ``test_ranges[i]`` of the influence matrix and train block ``j``
covers columns ``train_ranges[j]``; chunk ``(i, j)`` of the output holds exactly their
product, so every task writes one whole chunk and no two tasks share one.
"""

from __future__ import annotations

from dataclasses import dataclass


def ranges_from_sizes(sizes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(3, 3, 1)`` -> ``((0, 3), (3, 6), (6, 7))``."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return tuple(out)


def even_sizes(n: int, block_size: int) -> tuple[int, ...]:
    """Blocks of ``block_size`` with a ragged last block: ``(n=7, 3)`` -> ``(3, 3, 1)``."""
    if block_size < 1:
        raise ValueError(f"block size must be positive; got {block_size}.")
    full, rest = divmod(n, block_size)
    return (block_size,) * full + ((rest,) if rest else ())


@dataclass(frozen=True)
class BlockPlan:
    """Row blocks (test) and column blocks (train) of the influence matrix.

    Attributes:
        test_sizes: number of test points in each test block.
        train_sizes: number of training points in each train block.
        test_groups: test-block indices processed together by one influence task (all test
            factors of a group are held in memory at once).
    """

    test_sizes: tuple[int, ...]
    train_sizes: tuple[int, ...]
    test_groups: tuple[tuple[int, ...], ...]

    @classmethod
    def build(
        cls,
        test_sizes: tuple[int, ...],
        train_sizes: tuple[int, ...],
        *,
        bytes_per_test_point: int,
        memory_budget: int | None,
    ) -> BlockPlan:
        """Group consecutive test blocks so a group's factors fit ``memory_budget`` bytes."""
        if memory_budget is None:
            return cls(tuple(test_sizes), tuple(train_sizes), (tuple(range(len(test_sizes))),))
        groups: list[tuple[int, ...]] = []
        current: list[int] = []
        used = 0
        for i, size in enumerate(test_sizes):
            need = size * bytes_per_test_point
            if current and used + need > memory_budget:
                groups.append(tuple(current))
                current, used = [], 0
            current.append(i)
            used += need
        groups.append(tuple(current))
        return cls(tuple(test_sizes), tuple(train_sizes), tuple(groups))

    @property
    def n_test(self) -> int:
        """Number of test points (rows of the influence matrix)."""
        return sum(self.test_sizes)

    @property
    def n_train(self) -> int:
        """Number of training points (columns of the influence matrix)."""
        return sum(self.train_sizes)

    @property
    def test_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` rows of each test block."""
        return ranges_from_sizes(self.test_sizes)

    @property
    def train_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` columns of each train block."""
        return ranges_from_sizes(self.train_sizes)

    @property
    def num_chunks(self) -> int:
        """Number of output chunks: test blocks times train blocks."""
        return len(self.test_sizes) * len(self.train_sizes)

    def describe(self) -> str:
        """A one-line summary of the plan for progress messages."""
        return (
            f"{len(self.test_sizes)} test blocks x {len(self.train_sizes)} train blocks "
            f"({self.n_test} x {self.n_train}), test blocks in {len(self.test_groups)} group(s)"
        )
