"""LissaInfluence: the stochastic Neumann-series recursion of Agarwal, Bullins & Hazan (2017),
with variance reduction, iterate averaging and a stopping rule on the exact residual.

With right-hand sides ``B`` ``(p, k)``, a scale ``s`` and a fresh random training batch
``b_j`` each step, the recursion (written for the solution ``x = h / s``) is

    x_{j+1} = x_j + (B - (H_{b_j} + lambda' I) x_j) / s,      lambda' = lambda + dampen * s_fit,

a Richardson iteration on ``(H + lambda' I) x = B`` whose curvature products use one batch
each; ``dampen`` adds ``dampen * s_fit`` to the regularization (``s_fit`` the fitted scale).
It converges when ``s`` exceeds half the largest eigenvalue of every batch curvature plus
``lambda'``, at a rate of ``1 - (lambda_min + lambda') / s`` per step.

What this module adds to the textbook recursion:

- **A stopping rule that means accuracy.** Every ``epoch_length`` steps one product with the
  curvature of ALL the training data (a sweep) gives the exact residual
  ``|B - (H + lambda' I) x| / |B|`` of each right-hand side; the solve stops when every one
  is at most ``rtol``, and the report holds these residuals.
- **Variance reduction** (SVRG, Johnson & Zhang 2013): the step uses
  ``H_b (x - x_ref) + H x_ref`` instead of ``H_b x``, with ``x_ref`` the best point so far
  and ``H x_ref`` from its sweep. The batch noise is then proportional to ``x - x_ref``, which
  shrinks as the solve converges, so any tolerance is reached (the plain recursion stalls at a
  noise floor that only larger batches lower).
- **Iterate averaging**: the mean of the last half of each epoch's iterates is a candidate
  next to the last iterate; the sweep checks both, and each right-hand side keeps whichever has
  the smaller residual, never one worse than its reference point.
- **A scale that converges**: ``fit`` estimates the largest eigenvalue of ``H`` by a few
  Lanczos steps (:data:`SCALE_STEPS` sweeps) and takes it plus ``lambda``. An epoch whose
  iterates blow up, or whose best point is no better than its start, doubles the scale for the
  rest of the solve (the batch curvature exceeded what the scale allows); the report gives the
  scale used.

When a batch is the whole training set (``batch_size >= n``) the recursion is deterministic:
every step is a sweep whose update IS the exact residual, checked at every step, and a
recursion that grows is reported as divergence.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ... import progress as _progress
from ...errors import ConvergenceWarning, DivergenceError
from .. import memory
from ..blocks import BlockSums
from ..data import TrainingData
from ..lanczos import lanczos, tridiagonal
from ..operators import CurvatureOperator, DampedOperator, LinearOperator
from ..task import Task
from .base import InfluenceModel
from .config import SolverConfig, check_nonnegative, check_positive_int, hyperparameter
from .registry import register

SCALE_STEPS = 10
"""Lanczos steps (sweeps over the training data) of ``fit``'s estimate of the largest eigenvalue of ``H``."""

DEFAULT_RTOL = 1e-3
"""The default tolerance on each right-hand side's relative residual."""

MIN_EPOCH = 50
"""The default epoch is ``max(MIN_EPOCH, 2 * ceil(n / batch_size))`` steps: long enough that the
sweep ending it costs at most a third of the epoch, and that the epoch makes progress (measured on
the wine outlier problem: epochs of 20-100 steps reach a tolerance in the fewest samples read)."""

_GROWTH = 1e4  # a step this many times the size of the right-hand side (or residual) is divergence
_MAX_BACKOFFS = 10  # doublings of the scale within one solve before divergence is reported


LISSA_VECTORS = 10
"""``(p, k)`` tensors a LiSSA solve of ``k`` right-hand sides holds at once (its memory estimate)."""


@dataclass(frozen=True)
class LissaInfo:
    """How a LiSSA solve ended.

    Attributes:
        iterations: recursion steps run (each one batch curvature product with the right-hand
            sides not yet converged).
        sweeps: products with the curvature of all the training data (the residual checks; with
            batches of the whole training set every step is one).
        relative_residuals: ``(k,)`` ``|b_j - (H + lambda' I) x_j| / |b_j|`` of each returned
            solution, ``lambda' = regularization + dampen * scale_``: exact (computed by a sweep),
            or, in the deterministic recursion, that of the iterate before the returned one (an
            upper bound: the recursion contracts the residual).
        converged_columns: ``(k,)`` whether each right-hand side met ``rtol``.
        scale: the scale the solve ended with: the fitted one, doubled for each back-off.
    """

    iterations: int
    sweeps: int
    relative_residuals: Tensor
    converged_columns: Tensor
    scale: float

    @property
    def converged(self) -> bool:
        """Whether every right-hand side met the tolerance."""
        return bool(self.converged_columns.all())

    @property
    def not_converged(self) -> int:
        """How many right-hand sides missed the tolerance."""
        return int((~self.converged_columns).sum())

    @staticmethod
    def concatenate(reports: list[LissaInfo]) -> LissaInfo:
        """One report for solves of consecutive blocks of right-hand sides (e.g. chunks of training points)."""
        return LissaInfo(
            iterations=max(r.iterations for r in reports),
            sweeps=sum(r.sweeps for r in reports),
            relative_residuals=torch.cat([r.relative_residuals for r in reports]),
            converged_columns=torch.cat([r.converged_columns for r in reports]),
            scale=max(r.scale for r in reports),
        )


def spectrum_estimate(operator: LinearOperator, *, steps: int = SCALE_STEPS, seed: int = 0) -> tuple[float, float]:
    """``(smallest, largest)`` Ritz values of ``steps`` Lanczos steps on a symmetric operator.

    Both lie within the operator's spectrum (the largest converges to the largest eigenvalue in
    a few steps; a negative smallest one proves the operator indefinite). Costs ``steps``
    products with one vector.
    """
    result = lanczos(operator, min(steps, operator.size), generator=torch.Generator().manual_seed(seed))
    values = torch.linalg.eigvalsh(tridiagonal(result.alphas, result.betas))
    return float(values.min()), float(values.max())


@dataclass(frozen=True)
class LissaConfig(SolverConfig):
    """Hyperparameters of :class:`LissaInfluence`."""

    maxiter: int = hyperparameter(
        1000, "Recursion steps at most (each one batch curvature product); the residual checks come on top."
    )
    dampen: float = hyperparameter(0.0, "d in [0, 1); adds d * scale to the regularization.")
    scale: float | None = hyperparameter(
        None,
        "s, must exceed half the largest eigenvalue of the batch curvature plus regularization; "
        "None: the largest eigenvalue of H estimated at fit time (10 Lanczos steps) plus the regularization.",
    )
    h0: Tensor | None = hyperparameter(None, "Initial guess of the solution, (p,) or (p, k); default B / scale.")
    rtol: float = hyperparameter(
        DEFAULT_RTOL,
        "Stop when each right-hand side's relative residual |b - (H + lambda I) x| / |b| (exact, from a "
        "sweep over the training data) is at most rtol.",
    )
    batch_size: int | None = hyperparameter(
        None,
        "Samples per random batch (default: the training loader's batch size); at least the number of "
        "training samples makes the recursion deterministic.",
    )
    epoch_length: int | None = hyperparameter(
        None,
        "Steps between the sweeps that check the residual and re-center the variance reduction; "
        "None: max(50, 2 * ceil(n / batch_size)).",
    )
    variance_reduction: bool = hyperparameter(
        True,
        "True: batch products of x - x_ref plus H x_ref from the last sweep (SVRG), so the batch noise "
        "vanishes as the solve converges; False: the plain recursion (its noise floor limits the accuracy).",
    )
    seed: int = hyperparameter(0, "Seeds the batch draws and the scale estimate.")
    memory_budget: int | None = hyperparameter(None, memory.BUDGET_HELP)
    resource_fields: ClassVar[frozenset[str]] = frozenset({"memory_budget"})

    solve_time: ClassVar[frozenset[str]] = frozenset(
        {"maxiter", "rtol", "h0", "batch_size", "epoch_length", "variance_reduction"}
    )

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
        if self.epoch_length is not None:
            check_positive_int("epoch_length", self.epoch_length)
        if not isinstance(self.variance_reduction, bool):
            raise TypeError(f"variance_reduction must be True or False; got {self.variance_reduction!r}.")
        self._set("seed", int(self.seed))
        if self.memory_budget is not None:
            check_positive_int("memory_budget", self.memory_budget)


@register("lissa")
class LissaInfluence(InfluenceModel):
    """Influences by the LiSSA recursion, with variance reduction and an exact stopping rule.

    Args:
        model, loss, regularization, curvature, chunk_size: as for every solver.
        maxiter: recursion steps at most (each one batch curvature product with all
            right-hand sides not yet converged); the sweeps that check the residual come on top.
        dampen: ``d`` in ``[0, 1)``; adds ``d * scale_`` to the regularization.
        scale: ``s``; ``None`` (default): the largest eigenvalue of ``H`` estimated at fit time
            (:data:`SCALE_STEPS` Lanczos steps, one sweep each) plus the regularization. A
            stochastic solve doubles it when an epoch blows up or makes no progress.
        h0: initial guess of the solution, ``(p,)`` or ``(p, k)``; default ``B / scale``.
        rtol: stop when every right-hand side's relative residual
            ``|b - (H + lambda' I) x| / |b|`` is at most ``rtol`` (default ``1e-3``).
        batch_size: samples per random batch (default: the training loader's batch size; for
            arrays ``chunk_size``). At least the number of training samples makes the recursion
            deterministic.
        epoch_length: steps between residual checks (sweeps); default
            ``max(50, 2 * ceil(n / batch_size))``.
        variance_reduction: SVRG control variates (default) or the plain recursion.
        seed: seeds the batch draws and the scale estimate.

    Each solve returns a :class:`LissaInfo` (kept in ``info_`` after the one-call methods);
    right-hand sides that missed ``rtol`` after ``maxiter`` steps raise a
    :class:`ConvergenceWarning`.

    Memory: about eight ``(p, k)`` tensors during a solve.

    Raises:
        DivergenceError: when the deterministic recursion grows, or a stochastic one still
            blows up after ten doublings of the scale; the message says whether
            ``H + regularization * I`` is indefinite (no scale converges) or gives a safe scale.
    """

    config_class = LissaConfig
    config: LissaConfig

    def __init__(
        self,
        model: torch.nn.Module,
        task: Callable[[Tensor, Tensor], Tensor] | Task,
        config: LissaConfig | None = None,
        /,
        **hyperparameters: Any,
    ):
        super().__init__(model, task, config, **hyperparameters)
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

    def memory_pieces(self, batch_size: int) -> tuple[list[tuple[str, int]], int]:
        """Engine hook. The iterates of a solve of a chunk of ``k = min(chunk_size, batch)`` right-hand
        sides: :data:`LISSA_VECTORS` x ``(p, k)`` (the right-hand sides, the iterate and the best one, the
        reference point and its product, the batch product, the step, the sums), the parameters and a
        chunk's gradients; its products push ``k`` vectors, in pieces that fit."""
        p, size = self.num_params, memory.itemsize(self.dtype)
        k = min(self.chunk_size, batch_size)
        pieces = memory.common_pieces(p, size, k) + [
            (f"LiSSA's iterates ({LISSA_VECTORS} x ({p:,}, {k:,}))", LISSA_VECTORS * memory.matrix_bytes(p, k, size))
        ]
        return pieces, k

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        if self.scale is None:
            _, top = spectrum_estimate(operator, seed=self.seed)
            scale = top + self.regularization
            self.scale_ = scale if scale > 0 else 1.0  # H = 0 and no regularization: any scale
        else:
            self.scale_ = self.scale

    reports_solves = True

    def _solve(self, rhs: Tensor) -> Tensor:
        return self._solve_with_report(rhs)[0]

    def _solve_with_report(self, rhs: Tensor) -> tuple[Tensor, LissaInfo]:
        assert self._operator is not None and self._data is not None and self.scale_ is not None
        b = rhs.T
        x0 = b / self.scale_ if self.h0 is None else self._initial_guess(b).clone()
        shift = self.regularization + self.dampen * self.scale_
        batch_size = self.batch_size or self._data.batch_size
        what = f"LiSSA solve ({b.shape[1]:,} right-hand sides)"
        meter = _progress.current().meter(what, self.maxiter, "steps", bound=True)
        if b.shape[1] == 0:
            x, rel, steps, sweeps, scale = b.clone(), b.new_zeros(0), 0, 0, self.scale_
        elif batch_size >= self._data.num_samples:
            x, rel, steps, sweeps, scale = self._deterministic(b, x0, shift, meter)
        else:
            x, rel, steps, sweeps, scale = self._stochastic(b, x0, shift, batch_size, meter)
        info = LissaInfo(steps, sweeps, rel, rel <= self.rtol, scale)
        meter.finish(f", relative residual max {float(rel.max()) if rel.numel() else 0.0:.2e}")
        if not info.converged:
            failed = rel[~info.converged_columns]
            warnings.warn(
                f"LiSSA stopped at maxiter={self.maxiter} steps with {info.not_converged} of {rel.numel()} "
                f"right-hand sides above rtol={self.rtol:g}: relative residuals max {float(failed.max()):.3e}, "
                f"median {float(failed.median()):.3e}. Raise maxiter, raise regularization, or use "
                "CgInfluence (fewer sweeps for the same residual).",
                ConvergenceWarning,
                stacklevel=4,
            )
        return x.T, info

    # -- the two recursions: (p, k) in, solutions (p, k) and residuals (k,) out ----------------
    def _deterministic(
        self, b: Tensor, x: Tensor, shift: float, meter: _progress.Meter | None = None
    ) -> tuple[Tensor, Tensor, int, int, float]:
        """Every step a sweep: ``r = b - (H + shift) x`` exactly, then ``x += r / s``."""
        assert self._operator is not None and self.scale_ is not None
        s = self.scale_
        out = x.clone()
        rel = torch.full((b.shape[1],), math.inf, dtype=b.dtype, device=b.device)
        active = torch.arange(b.shape[1], device=b.device)
        b_norm = _safe_norms(b)
        first = smallest = None
        steps = 0
        for steps in range(1, self.maxiter + 1):
            r = b[:, active] - (self._operator.matmat(x) + shift * x)
            if meter is not None:
                meter.advance()
            if not bool(torch.isfinite(r).all()):
                self._raise_divergence(steps, "the iterates became NaN/Inf", s)
            size = float(torch.linalg.vector_norm(r))
            first = size if first is None else first
            smallest = size if smallest is None else min(smallest, size)
            if steps > 5 and size > 1e3 * max(smallest, 1e-300) and size > first:
                self._raise_divergence(steps, f"the residual grew from {smallest:.3e} to {size:.3e}", s)
            col = torch.linalg.vector_norm(r, dim=0) / b_norm[active]
            rel[active] = col
            x = x + r / s
            out[:, active] = x  # its residual is at most col: the recursion contracts it
            keep = col > self.rtol
            if not bool(keep.any()):
                break
            active, x = active[keep], x[:, keep]
        return out, rel, steps, steps, s

    def _stochastic(
        self, b: Tensor, x0: Tensor, shift: float, batch_size: int, meter: _progress.Meter | None = None
    ) -> tuple[Tensor, Tensor, int, int, float]:
        """Epochs of batch steps, each ended by a sweep that checks the candidates exactly."""
        assert self._operator is not None and self._data is not None and self.scale_ is not None
        op, s = self._operator, self.scale_
        epoch = self.epoch_length or max(MIN_EPOCH, 2 * math.ceil(self._data.num_samples / batch_size))
        gen = torch.Generator().manual_seed(self.seed)
        k = b.shape[1]
        out, rel = x0.clone(), torch.full((k,), math.inf, dtype=b.dtype, device=b.device)
        b_norm = _safe_norms(b)
        # the reference point of each right-hand side: its solution so far, with (H + shift) x_ref
        active = torch.arange(k, device=b.device)
        x_ref = x0
        a_ref = op.matmat(x_ref) + shift * x_ref
        rel_ref = torch.linalg.vector_norm(b - a_ref, dim=0) / b_norm
        sweeps, steps, backoffs = 1, 0, 0
        while True:
            out[:, active], rel[active] = x_ref, rel_ref
            keep = rel_ref > self.rtol
            active, x_ref, a_ref, rel_ref = active[keep], x_ref[:, keep], a_ref[:, keep], rel_ref[keep]
            if active.numel() == 0 or steps >= self.maxiter:
                break
            b_act = b[:, active]
            length = min(epoch, self.maxiter - steps)
            x, total, count = x_ref.clone(), torch.zeros_like(x_ref), 0
            limit = _GROWTH * max(
                float(torch.linalg.vector_norm(b_act)), float(torch.linalg.vector_norm(b_act - a_ref))
            )
            blown = None
            for i in range(length):
                batch = self._data.random_batch(gen, batch_size)
                if self.variance_reduction:
                    dv = x - x_ref
                    curvature = op.batch_matmat(batch, dv) + shift * dv + a_ref
                else:
                    curvature = op.batch_matmat(batch, x) + shift * x
                step = b_act - curvature
                x = x + step / s
                steps += 1
                if meter is not None:
                    meter.advance()
                if not bool(torch.isfinite(x).all()):
                    blown = "the iterates became NaN/Inf"
                    break
                size = float(torch.linalg.vector_norm(step))
                if size > limit:
                    blown = f"a step grew to {size / s:.3e}"
                    break
                if i >= length // 2:
                    total += x
                    count += 1
            if blown is not None:  # the batch curvature exceeds what the scale allows: back off
                if backoffs >= _MAX_BACKOFFS:
                    self._raise_divergence(steps, f"{blown} after {backoffs} doublings of the scale", s)
                backoffs, s = backoffs + 1, 2 * s
                continue
            candidates = [x] + ([total / count] if count >= 2 else [])
            c = torch.cat(candidates, dim=1)
            a_c = op.matmat(c) + shift * c
            sweeps += 1
            n_cand, n_act = len(candidates), active.numel()
            res = torch.linalg.vector_norm(b_act.repeat(1, n_cand) - a_c, dim=0).reshape(n_cand, n_act)
            res = res / b_norm[active]
            best, which = res.min(dim=0)
            if float(best.max()) >= float(rel_ref.max()) and backoffs < _MAX_BACKOFFS:
                backoffs, s = backoffs + 1, 2 * s  # no progress on the worst right-hand side: noise too large
            better = best < rel_ref
            pick = which * n_act + torch.arange(n_act, device=b.device)
            x_ref = torch.where(better, c[:, pick], x_ref)
            a_ref = torch.where(better, a_c[:, pick], a_ref)
            rel_ref = torch.where(better, best, rel_ref)
        return out, rel, steps, sweeps, s

    def _initial_guess(self, b: Tensor) -> Tensor:
        h0 = torch.as_tensor(self.h0, dtype=b.dtype, device=b.device)
        if h0.ndim == 1:
            h0 = h0[:, None].expand_as(b)
        if h0.shape != b.shape:
            raise ValueError(f"h0 must have shape ({b.shape[0]},) or {tuple(b.shape)}; got {tuple(h0.shape)}.")
        return h0

    def _raise_divergence(self, iteration: int, what: str, scale: float) -> None:
        assert self._operator is not None
        shift = self.regularization + self.dampen * (self.scale_ or 0.0)
        smallest, top = spectrum_estimate(DampedOperator(self._operator, shift), steps=20, seed=self.seed)
        if smallest < 0:
            raise DivergenceError(
                f"LiSSA diverged at iteration {iteration}: {what}. H + regularization*I is not positive "
                f"definite (an eigenvalue of at most {smallest:.3e}), and no scale makes the recursion "
                f"converge: raise regularization (by more than {-smallest:.3g} over {self.regularization:g}), "
                "or use curvature='ggn', which is positive semi-definite for losses convex in the model outputs."
            )
        raise DivergenceError(
            f"LiSSA diverged at iteration {iteration}: {what}. The recursion needs scale > "
            f"(largest eigenvalue of H + regularization)/2 = {top / 2:.3g} at least (batch curvature "
            f"can exceed it); scale is {scale:.3g}. Raise scale to {2 * top:.3g} or more "
            "(or omit scale to have it estimated), use larger batches (batch_size), or raise dampen."
        )


def _safe_norms(b: Tensor) -> Tensor:
    """``|b_j|`` per column, 1 where a column is zero (its residual is then absolute)."""
    norms = torch.linalg.vector_norm(b, dim=0)
    return torch.where(norms > 0, norms, torch.ones_like(norms))
