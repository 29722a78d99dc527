"""Memory known before any pass: the shared arithmetic of every solver's and the index's estimate.

A :class:`MemoryEstimate` names the pieces a solver (or the index) holds at its peak, each with
its bytes, from the model's and the data's shapes: parameters and the copies a solver keeps
(CG's ``x, r, p, Ap`` per block of right-hand sides, a Krylov or sketch basis ``(p, m)``,
Direct's dense ``(p, p)`` matrix and its factor), the per-sample gradient blocks
``(chunk, p)``, the factors ``(n_test, p)``, and one piece of a curvature product. A solver
fills it through one engine hook (:meth:`~.solvers.engine.SolverEngine.memory_estimate`);
:meth:`MemoryEstimate.check` refuses in one line what cannot fit ``memory_budget``, naming the
largest piece, its bytes, the budget and the fix.

A curvature product keeps, per sample and per vector pushed at once, about
:data:`PRODUCT_COPIES` tensors of the size of the largest module output of one sample (a causal
LM's ``T x V`` logits): the forward's value, its tangent, the softmax's probabilities, the output
curvature's product and its cotangent. :func:`product_piece` chooses the samples and vectors
per product that fit the room a solver leaves for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

PRODUCT_COPIES = 5
"""Tensors of the size of one sample's largest module output that a curvature product keeps
per sample and per vector (value, tangent, probabilities, output-curvature product, cotangent).
Measured (the rise of the process's peak RSS over a 1 x 1 product, CPU, float32): a causal LM
of width 16 with ``V = 50,257``, ``T = 32``, 4 sequences: 2 vectors 257 MB, 9 vectors 999 MB,
i.e. 5.0 and 4.3 logit-sized tensors per sample and vector; 5 keeps the estimate an upper bound."""

BUDGET_HELP = (
    "Bytes the solver may hold (its copies of p-vectors, dense matrices, per-chunk blocks and one piece of "
    "a curvature product); None: half the machine's memory (80% of the GPU's for a CUDA model). Products are "
    "pushed in pieces that fit; what cannot fit even in the smallest pieces is refused before any pass."
)
"""The ``memory_budget`` hyperparameter's help text (Direct, CG, LiSSA, Arnoldi, Nystroem)."""


def default_budget(device: torch.device) -> int:
    """Half the machine's memory (80% of the GPU's for a CUDA device): ``memory_budget=None``."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    try:
        import psutil  # type: ignore[import-untyped]

        total = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil comes with dask
        import os

        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return total // 2


def budget_of(value: int | None, device: torch.device) -> int:
    """``value`` (bytes), or :func:`default_budget` of ``device`` for ``None``."""
    return int(value) if value is not None else default_budget(device)


def readable(n: float) -> str:
    """``n`` bytes, readable: ``'1,234,567 bytes (1.2 MB)'``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{int(n):,} bytes ({n / size:.1f} {unit})"
    return f"{int(n):,} bytes"


def short(n: float) -> str:
    """``n`` bytes in one unit: ``'4.0 TB'``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n):,} bytes"


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one number of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def matrix_bytes(rows: int, cols: int, size: int) -> int:
    """Bytes of a ``(rows, cols)`` tensor of ``size``-byte numbers."""
    return int(rows) * int(cols) * int(size)


def product_bytes(per_sample: int, samples: int, vectors: int) -> int:
    """Bytes one curvature product of ``vectors`` vectors over ``samples`` samples keeps, where one
    sample's largest module output has ``per_sample`` bytes: ``PRODUCT_COPIES * per_sample *
    samples * vectors``."""
    return PRODUCT_COPIES * int(per_sample) * int(samples) * int(vectors)


def product_piece(per_sample: int, samples: int, vectors: int, room: int) -> tuple[int, int] | None:
    """The samples and vectors of one product piece within ``room`` bytes: all ``vectors`` and
    ``samples`` when they fit, else fewer vectors (down to 1), then fewer samples (down to 1);
    ``None`` when even one sample and one vector do not fit."""
    if per_sample <= 0 or product_bytes(per_sample, samples, vectors) <= room:
        return samples, vectors
    one = product_bytes(per_sample, 1, 1)
    if one > room:
        return None
    cols = min(vectors, max(1, room // (one * samples)))
    if product_bytes(per_sample, samples, cols) <= room:
        return samples, cols
    return max(1, min(samples, room // (one * cols))), cols


@dataclass(frozen=True)
class MemoryEstimate:
    """A peak memory estimate from shapes, before any pass.

    Attributes:
        what: who holds it (``"CgInfluence's solve"``).
        pieces: ``(name, bytes)`` of every piece held at the peak; their sum is :attr:`total`.
    """

    what: str
    pieces: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, what: str, pieces: Iterable[tuple[str, int]]) -> MemoryEstimate:
        """The estimate of ``pieces`` (pieces of 0 bytes left out)."""
        return cls(what, tuple((name, int(size)) for name, size in pieces if size > 0))

    @property
    def total(self) -> int:
        """Bytes of all the pieces together."""
        return sum(size for _, size in self.pieces)

    def largest(self) -> tuple[str, int]:
        """The largest piece ``(name, bytes)``."""
        return max(self.pieces, key=lambda piece: piece[1], default=("nothing", 0))

    def bytes_of(self, prefix: str) -> int:
        """Bytes of the pieces whose name starts with ``prefix``."""
        return sum(size for name, size in self.pieces if name.startswith(prefix))

    def check(self, budget: int, fix: str) -> None:
        """A one-line ``ValueError`` when :attr:`total` exceeds ``budget``: the total, the largest
        piece and its bytes, the budget and ``fix``."""
        if self.total <= budget:
            return
        name, size = self.largest()
        raise ValueError(
            f"{self.what} needs {readable(self.total)}, beyond memory_budget={readable(budget)}; the largest "
            f"piece is {name}, {readable(size)}. {fix}"
        )

    def __str__(self) -> str:
        lines = [f"{self.what}: {readable(self.total)}"]
        lines += [f"  {name}: {readable(size)}" for name, size in self.pieces]
        return "\n".join(lines)


PRODUCT_PIECE = "one piece of a curvature product"
"""The name of the product's piece in an estimate (what :meth:`MemoryEstimate.bytes_of` finds)."""


def common_pieces(p: int, size: int, chunk: int) -> list[tuple[str, int]]:
    """What every solver holds: the model's parameters and their flat copy ``theta`` (``2 x p``),
    and one chunk's per-sample gradients ``(chunk, p)`` with their factors ``(chunk, p)``."""
    return [
        (f"the parameters and their flat copy (2 x p = 2 x {p:,})", 2 * p * size),
        (f"a chunk's per-sample gradients and factors (2 x ({chunk:,}, {p:,}))", 2 * matrix_bytes(chunk, p, size)),
    ]
