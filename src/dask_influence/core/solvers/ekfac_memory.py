"""EK-FAC's memory, known before any pass: the factor-sized pieces from the layers' shapes.

:class:`FitMemory` estimates the bytes of the Kronecker factors' sums, their
eigendecompositions, the fitted state and the corrected eigenvalues' sums; :func:`plan_factors`
keeps the widest dense sides diagonal until they fit the budget (``memory_budget``, by default
:func:`default_memory_budget`), or says what still does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kronecker import KroneckerLayer
from ..memory import default_budget
from .ekfac_layers import _warn_fallback


def default_memory_budget(device: torch.device) -> int:
    """Half the machine's memory (80% of the GPU's for a CUDA device): ``memory_budget=None``
    (the budget every solver defaults to: :func:`~..memory.default_budget`)."""
    return default_budget(device)


def _bytes(n: float) -> str:
    """``n`` bytes, readable: ``'1,234,567 bytes (1.2 MB)'``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{int(n):,} bytes ({n / size:.1f} {unit})"
    return f"{int(n):,} bytes"


@dataclass(frozen=True)
class FitMemory:
    """EK-FAC's fitting memory in bytes, from the layers' shapes (before any pass).

    Attributes:
        pieces: ``(layer, what, bytes)`` of every factor-sized piece: the float64 sums of
            ``A`` (``i x i``, or ``i`` when diagonal) and ``G`` (``o x o`` or ``o``), their
            float64 eigendecompositions (eigenvectors and workspace, ``2 d^2``), the fitted
            state in the model's dtype and the float64 sums of the corrected eigenvalues
            (``o x i``).
        fixed: the peak of the factor-sized pieces: the first pass's sums plus the largest
            eigendecomposition, or the state plus the second pass's sums. The state does not
            add to the first: each factor's float64 sum is released as its eigendecomposition
            (float32 eigenvectors in a float32 model, at most its size) takes its place, and on a
            cluster the eigendecompositions run on the workers and the state is the client's.
    """

    pieces: tuple[tuple[str, str, int], ...]
    fixed: int

    @classmethod
    def of(
        cls, layers: Sequence[KroneckerLayer], itemsize: int, diagonal: set[tuple[str, str]], corrected: bool
    ) -> FitMemory:
        """The estimate for ``layers`` with the ``(layer, "A" | "G")`` sides in ``diagonal`` kept diagonal."""
        pieces: list[tuple[str, str, int]] = []
        sums = eigh = state = corr = 0
        for layer in layers:
            o, i = layer.shape
            for side, d, diag in (
                ("A", i, layer.diagonal_a or (layer.name, "A") in diagonal),
                ("G", o, (layer.name, "G") in diagonal),
            ):
                entries = d if diag else d * d
                shape = f"{d:,}, its diagonal" if diag else f"{d:,} x {d:,}"
                pieces.append((layer.name, f"the float64 sums of its {side} ({shape})", 8 * entries))
                sums += 8 * entries
                state += itemsize * (entries + d)
                if not diag:
                    pieces.append((layer.name, f"the eigendecomposition of its {side} ({d:,} x {d:,})", 16 * d * d))
                    eigh = max(eigh, 16 * d * d)
            if corrected:
                pieces.append((layer.name, f"the float64 sums of its corrected eigenvalues ({o:,} x {i:,})", 8 * o * i))
                corr += 8 * o * i
                state += itemsize * o * i
        return cls(tuple(pieces), max(max(sums, state) + eigh, state + corr))

    def largest(self) -> tuple[str, str, int]:
        """The largest single piece ``(layer, what, bytes)``."""
        return max(self.pieces, key=lambda piece: piece[2])


def plan_factors(
    layers: Sequence[KroneckerLayer],
    itemsize: int,
    budget: int,
    corrected: bool,
    diagonal: set[tuple[str, str]] | None = None,
) -> tuple[set[tuple[str, str]], FitMemory]:
    """The sides to keep diagonal so that the factor-sized pieces fit ``budget``: the widest
    dense side first, one at a time, until they fit (or none is left), beyond those already in
    ``diagonal`` (a tied head's vocabulary side). Returns those ``(layer, "A" | "G")`` sides
    and the estimate with them."""
    diagonal = set(diagonal or ())
    memory = FitMemory.of(layers, itemsize, diagonal, corrected)
    while memory.fixed > budget:
        dense = [
            (d, layer.name, side)
            for layer in layers
            for side, d in (("A", layer.shape[1]), ("G", layer.shape[0]))
            if (layer.name, side) not in diagonal and not (side == "A" and layer.diagonal_a) and d > 1
        ]
        if not dense:
            break
        _, name, side = max(dense)
        diagonal.add((name, side))
        memory = FitMemory.of(layers, itemsize, diagonal, corrected)
    return diagonal, memory


def plan_or_refuse(
    layers: Sequence[KroneckerLayer], itemsize: int, budget: int, corrected: bool
) -> tuple[set[tuple[str, str]], FitMemory]:
    """:func:`plan_factors` for EK-FAC's layers (a tied head's vocabulary side always diagonal):
    one warning naming the sides kept diagonal for ``budget``, or a one-line ``ValueError``
    naming the largest piece when even that does not fit. Returns the diagonal sides and the estimate."""
    tied = {(layer.name, "G") for layer in layers if layer.tied_use is not None}  # a diagonal vocabulary side
    diagonal, memory = plan_factors(layers, itemsize, budget, corrected, tied)
    if memory.fixed > budget:
        name, what, size = memory.largest()
        raise ValueError(
            f"EK-FAC's factors need {_bytes(memory.fixed)} even with every wide factor kept diagonal, "
            f"beyond memory_budget={_bytes(budget)}; the largest piece is {what} of layer '{name}', "
            f"{_bytes(size)}. Pass a larger memory_budget, or leave the layer out with layers=[...]."
        )
    if diagonal - tied:
        shapes = {layer.name: layer.shape for layer in layers}
        parts = []
        for name, side in sorted(diagonal - tied):
            d = shapes[name][1 if side == "A" else 0]
            parts.append(
                f"the {side} of layer '{name}' ({d:,} x {d:,}: {_bytes(24 * d * d)} as a float64 factor "
                "and its eigendecomposition)"
            )
        _warn_fallback(
            f"EK-FAC keeps {'; '.join(parts)} DIAGONAL: the dense factors would not fit memory_budget="
            f"{_bytes(budget)} (the fit now needs {_bytes(memory.fixed)} for its factors). The curvature "
            "is then diagonal on that side of the layer, as for an embedding's inputs. Pass a larger "
            "memory_budget for the dense factors, or leave the layer out with layers=[...]."
        )
    return diagonal, memory
