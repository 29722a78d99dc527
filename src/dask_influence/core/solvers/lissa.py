"""LissaInfluence: the stochastic Neumann-series recursion of Agarwal, Bullins & Hazan (2017).

With right-hand sides ``B`` ``(p, k)`` and a fresh random training batch ``b_j`` each step,

    h_0 = B (or scale * h0),   h_{j+1} = B + (1 - dampen) h_j - (H_{b_j} + lambda I) h_j / scale,

and the solution is ``h / scale``. Its fixed point solves
``(H + lambda I + dampen * scale * I) x = B``: ``dampen`` adds ``dampen * scale`` to the
regularization. The recursion converges when ``scale`` exceeds half the largest eigenvalue
of every batch curvature plus ``lambda``; with a smaller ``scale`` it diverges, which is
detected (non-finite or growing updates) and reported with the scale to use.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import ConvergenceWarning, DivergenceError
from ..blocks import BlockSums
from ..data import TrainingData
from ..operators import CurvatureOperator, DampedOperator, LinearOperator
from .base import InfluenceModel
from .config import SolverConfig, check_nonnegative, check_positive_int, hyperparameter
from .registry import register


@dataclass(frozen=True)
class LissaInfo:
    """How a LiSSA solve ended: ``iterations`` run and the last ``relative_update`` (max over columns)."""

    iterations: int
    relative_update: float
    converged: bool


def largest_eigenvalue(operator: LinearOperator, *, iterations: int = 30, seed: int = 0) -> float:
    """Estimate the largest-magnitude eigenvalue of a symmetric operator by power iteration."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(operator.size, generator=gen, dtype=torch.float64).to(operator.device, operator.dtype)
    v = v / torch.linalg.vector_norm(v)
    value = 0.0
    for _ in range(iterations):
        w = operator.matvec(v)
        value = float(v @ w)
        norm = torch.linalg.vector_norm(w)
        if float(norm) == 0.0:
            return 0.0
        v = w / norm
    return abs(value)


@dataclass(frozen=True)
class LissaConfig(SolverConfig):
    """Hyperparameters of :class:`LissaInfluence`."""

    maxiter: int = hyperparameter(1000, "Iterations (each one batch curvature product with all right-hand sides).")
    dampen: float = hyperparameter(0.0, "d in [0, 1) in the recursion; adds d * scale to the regularization.")
    scale: float | None = hyperparameter(
        None,
        "s, must exceed half the largest eigenvalue of the batch curvature plus regularization; "
        "None estimates the largest eigenvalue of H at fit time (power iteration) and takes twice it "
        "plus the regularization.",
    )
    h0: Tensor | None = hyperparameter(None, "Initial guess of the solution, (p,) or (p, k); default B / scale.")
    rtol: float = hyperparameter(1e-4, "Stop when the largest relative change of h in one step is below it.")
    batch_size: int | None = hyperparameter(
        None, "Samples per random batch (default: the training loader's batch size)."
    )
    seed: int = hyperparameter(0, "Seeds the batch draws.")

    solve_time: ClassVar[frozenset[str]] = frozenset({"maxiter", "rtol", "h0", "batch_size"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("maxiter", self.maxiter)
        self._set("dampen", check_nonnegative("dampen", self.dampen))
        if self.dampen >= 1:
            raise ValueError(f"dampen must be in [0, 1); got {self.dampen}.")
        if self.scale is not None:
            if check_nonnegative("scale", self.scale) == 0:
                raise ValueError("scale must be positive; got 0. Omit it to estimate it at fit time.")
            self._set("scale", float(self.scale))
        self._set("rtol", check_nonnegative("rtol", self.rtol))
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)
        self._set("seed", int(self.seed))


@register("lissa")
class LissaInfluence(InfluenceModel):
    """Influences by the LiSSA recursion, using batch curvature-vector products only.

    Args:
        model, loss, regularization, curvature, chunk_size: as for every solver.
        maxiter: iterations (each one batch curvature product with all right-hand sides).
        dampen: ``d`` in the recursion, in ``[0, 1)``; adds ``d * scale`` to the regularization.
        scale: ``s``, must exceed half the largest eigenvalue of the batch curvature plus
            regularization; ``None`` estimates the largest eigenvalue of ``H`` at fit time
            (power iteration) and takes twice it plus the regularization.
        h0: initial guess of the solution, ``(p,)`` or ``(p, k)``; default ``B / scale``.
        rtol: stop when the largest relative change of ``h`` in one step is below it.
        batch_size: samples per random batch (default: the training loader's batch size).
        seed: seeds the batch draws.

    Raises:
        DivergenceError: when the iterates become non-finite or their updates grow a
            thousandfold; the message gives a safe ``scale``.
    """

    config_class = LissaConfig
    config: LissaConfig

    def __init__(
        self,
        model: torch.nn.Module,
        loss: Callable[[Tensor, Tensor], Tensor],
        config: LissaConfig | None = None,
        /,
        **hyperparameters: Any,
    ):
        super().__init__(model, loss, config, **hyperparameters)
        self._operator: CurvatureOperator | None = None
        self._data: TrainingData | None = None
        self.scale_: float | None = None
        self.info_: LissaInfo | None = None

    needs_training_data = True
    _saved_attributes = ("scale_",)

    def _detach(self) -> None:
        self._operator = None
        self._data = None

    def _attach(self, operator: CurvatureOperator, data: TrainingData | None) -> None:
        self._operator = operator
        self._data = data

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        if self.scale is None:
            top = largest_eigenvalue(operator, seed=self.seed)
            self.scale_ = 2.0 * top + self.regularization
        else:
            self.scale_ = self.scale

    reports_solves = True

    def _solve(self, rhs: Tensor) -> Tensor:
        return self._solve_with_report(rhs)[0]

    def _solve_with_report(self, rhs: Tensor) -> tuple[Tensor, LissaInfo]:
        assert self._operator is not None and self._data is not None and self.scale_ is not None
        b = rhs.T
        s, d, lam = self.scale_, self.dampen, self.regularization
        h = b.clone() if self.h0 is None else (s * self._initial_guess(b)).clone()
        gen = torch.Generator().manual_seed(self.seed)
        batch_size = self.batch_size or self._data.batch_size
        first_update: float | None = None
        smallest_update = math.inf
        relative = math.inf
        iterations = 0
        for iterations in range(1, self.maxiter + 1):
            batch = self._data.random_batch(gen, batch_size)
            curv = self._operator.batch_matmat(batch, h) + lam * h
            h_new = b + (1 - d) * h - curv / s
            update = torch.linalg.vector_norm(h_new - h, dim=0)
            size = torch.linalg.vector_norm(h_new, dim=0)
            if not bool(torch.isfinite(h_new).all()):
                self._raise_divergence(iterations, "the iterates became NaN/Inf")
            step = float(update.max())
            first_update = step if first_update is None else first_update
            smallest_update = min(smallest_update, step)
            if iterations > 5 and step > 1e3 * max(smallest_update, 1e-300) and step > first_update:
                self._raise_divergence(iterations, f"the update norm grew from {smallest_update:.3e} to {step:.3e}")
            h = h_new
            relative = float((update / torch.clamp(size, min=torch.finfo(size.dtype).tiny)).max())
            if relative < self.rtol:
                break
        converged = relative < self.rtol
        info = LissaInfo(iterations, relative, converged)
        if not converged:
            warnings.warn(
                f"LiSSA stopped at maxiter={self.maxiter} with a relative update of "
                f"{relative:.3e} > rtol={self.rtol:g}. Raise maxiter, use larger batches "
                "(batch_size) to lower the noise, or raise rtol.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return (h / s).T, info

    def _initial_guess(self, b: Tensor) -> Tensor:
        h0 = torch.as_tensor(self.h0, dtype=b.dtype, device=b.device)
        if h0.ndim == 1:
            h0 = h0[:, None].expand_as(b)
        if h0.shape != b.shape:
            raise ValueError(f"h0 must have shape ({b.shape[0]},) or {tuple(b.shape)}; got {tuple(h0.shape)}.")
        return h0

    def _raise_divergence(self, iteration: int, what: str) -> None:
        assert self._operator is not None and self.scale_ is not None
        top = largest_eigenvalue(DampedOperator(self._operator, self.regularization), seed=self.seed)
        safe = 2.0 * top
        raise DivergenceError(
            f"LiSSA diverged at iteration {iteration}: {what}. The recursion needs scale > "
            f"(largest eigenvalue of H + regularization)/2 = {top / 2:.3g} at least (batch curvature "
            f"can exceed it); scale is {self.scale_:.3g}. Raise scale to {safe:.3g} or more "
            "(or omit scale to have it estimated), or raise dampen."
        )
