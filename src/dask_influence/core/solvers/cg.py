"""CgInfluence: block conjugate gradients on ``(H + lambda I) X = G^T``.

All right-hand sides of a call are solved together by the breakdown-free block CG of
Ji & Li (2017): each iteration costs ONE sweep over the training data with a block of
vectors, whatever the number of right-hand sides, and the search block is re-orthonormalized
so that converged or linearly dependent columns drop out instead of breaking the iteration.
Each right-hand side ``b_j`` has its own stopping test ``|r_j| <= max(rtol |b_j|, atol)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from ... import progress as _progress
from ...errors import ConvergenceWarning, NotPositiveDefiniteError
from .. import memory
from ..blocks import BlockSums
from ..data import TrainingData
from ..eigen import factor_solve
from ..operators import Curvature, DampedOperator, LinearOperator
from ..preconditioners import Preconditioner, make_preconditioner, preconditioner_name
from ..task import Task
from .base import InfluenceModel
from .config import SolverConfig, check_blocks, check_nonnegative, check_positive_int, check_seed, hyperparameter
from .registry import register

MatMat = Callable[[Tensor], Tensor]


CG_VECTORS = 8
"""``(p, k)`` tensors block CG holds for ``k`` right-hand sides (x, r, p, A p, b, the best x and r, the
preconditioned residual): its memory estimate."""

CG_PIECE = "block CG's vectors"


@dataclass(frozen=True)
class CgInfo:
    """How a block CG solve ended.

    Attributes:
        iterations: iterations run (each one sweep over the training data).
        residual_norms: ``(k,)`` final ``|b_j - A x_j|`` per right-hand side.
        relative_residuals: ``(k,)`` the same divided by ``|b_j|``.
        converged: ``(k,)`` whether each right-hand side met its tolerance.
    """

    iterations: int
    residual_norms: Tensor
    relative_residuals: Tensor
    converged: Tensor

    @property
    def not_converged(self) -> int:
        """How many right-hand sides missed their tolerance."""
        return int((~self.converged).sum())

    @staticmethod
    def concatenate(reports: list[CgInfo]) -> CgInfo:
        """One report for solves of consecutive blocks of right-hand sides (e.g. chunks of training points)."""
        return CgInfo(
            iterations=max(r.iterations for r in reports),
            residual_norms=torch.cat([r.residual_norms for r in reports]),
            relative_residuals=torch.cat([r.relative_residuals for r in reports]),
            converged=torch.cat([r.converged for r in reports]),
        )


def _orthonormal_basis(z: Tensor) -> Tensor:
    """An orthonormal basis ``(p, r)`` of the column span of ``z`` ``(p, k)``, ``r <= k``."""
    u, s, _ = torch.linalg.svd(z, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    keep = s > s[0] * max(z.shape) * torch.finfo(z.dtype).eps
    return u[:, keep]


def _spd_solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve with the projected matrix ``a = P^T A P``; refuse clear negative curvature.

    ``P`` has orthonormal columns, so the eigenvalues of ``a`` are Rayleigh quotients of
    ``A``: a clearly negative one proves that ``A`` is not positive definite, and CG on such
    a matrix would return garbage. A tiny negative one is rounding (solved by least squares).
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return factor_solve(chol, b)
    evals = torch.linalg.eigvalsh(a)
    smallest, largest = float(evals.min()), float(evals.abs().max())
    if smallest < -100 * a.shape[0] * torch.finfo(a.dtype).eps * largest:
        raise NotPositiveDefiniteError(
            f"CG met negative curvature: the matrix has a Rayleigh quotient of {smallest:.3e}, "
            "so it is not positive definite and CG cannot solve with it.",
            smallest_eigenvalue=smallest,
            suggested_regularization=float("nan"),
        )
    return torch.linalg.lstsq(a, b).solution


def block_cg(
    apply_a: MatMat,
    b: Tensor,
    *,
    rtol: float,
    atol: float = 0.0,
    maxiter: int,
    precondition: MatMat | None = None,
    verify: bool = True,
) -> tuple[Tensor, CgInfo]:
    """Solve ``A X = B`` for symmetric positive definite ``A``, all columns at once.

    CG updates its residual by recurrence; in float32 that recurrence drifts from the true
    residual ``B - A X`` (measured: 7e-6 reported, 4e-5 true, on a 3,000-parameter BERT at
    ``rtol=1e-5``). With ``verify`` (default) the end of the iteration computes the true
    residual with one more product, restarts CG from it for the columns above tolerance while
    that still lowers it (a restart that does not halve the worst one has met the precision
    floor), and reports the true residuals. The same product gives the Rayleigh quotient
    ``x^T A x / x^T x`` of every solution: a negative one proves ``A`` indefinite, whatever
    the residuals say (CG on an indefinite matrix can "converge" to a solution whose
    ``b^T x``, a self-influence, is negative).

    Args:
        apply_a: ``V (p, r) -> A V (p, r)``.
        b: right-hand sides ``(p, k)``.
        rtol, atol: column ``j`` is done when ``|r_j| <= max(rtol * |b_j|, atol)``.
        maxiter: at most this many iterations (the verifying products come on top).
        precondition: ``R (p, k) -> M R``, ``M`` symmetric positive definite ~ ``A^-1``.
        verify: check (and restart from) the true residual at the end.

    Returns:
        ``X`` ``(p, k)`` and a :class:`CgInfo` (with the true residuals when ``verify``).

    Raises:
        NotPositiveDefiniteError: ``A`` met negative curvature (a projected matrix or a
            solution's Rayleigh quotient clearly below zero).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = torch.linalg.vector_norm(b, dim=0)
    tol = torch.clamp(rtol * b_norm, min=atol)
    safe_b = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    r_norm = b_norm.clone()
    done = r_norm <= tol
    iterations = 0
    worst: float | None = None
    largest = [0.0]  # the largest Rayleigh quotient of a search direction: |A| at least
    best: tuple[Tensor, Tensor, Tensor] | None = None  # per column: the verified x with the smallest residual
    while True:
        if not bool(done.all()) and iterations < maxiter:
            x, r, r_norm, done, iterations = _cg_iterations(
                apply_a, x, r, tol, done, iterations, maxiter=maxiter, precondition=precondition, largest=largest
            )
        if not verify or iterations == 0:
            break
        ax = apply_a(x)
        _check_rayleigh_quotients(x, ax, largest[0])
        r = b - ax
        r_norm = torch.linalg.vector_norm(r, dim=0)
        if best is not None:  # a restart must not make a column worse
            better = r_norm < best[2]
            x, r, r_norm = (torch.where(better, new, old) for new, old in zip((x, r, r_norm), best))
        best = (x, r, r_norm)
        done = r_norm <= tol
        if bool(done.all()) or iterations >= maxiter:
            break
        now = float((r_norm / safe_b)[~done].max())
        if worst is not None and now > 0.5 * worst:
            break  # a restart no longer halves the true residual: the precision floor
        worst = now
    info = CgInfo(iterations, r_norm, r_norm / safe_b, done)
    return x, info


def _cg_iterations(
    apply_a: MatMat,
    x: Tensor,
    r: Tensor,
    tol: Tensor,
    done: Tensor,
    iterations: int,
    *,
    maxiter: int,
    precondition: MatMat | None,
    largest: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Block CG iterations from ``x`` with residual ``r`` until every column is done or
    ``maxiter``: ``(x, r, |r|, done, iterations)``; ``largest[0]`` is raised to the largest
    Rayleigh quotient of a search direction seen."""
    r_norm = torch.linalg.vector_norm(r, dim=0)
    z = precondition(r) if precondition else r
    direction = _orthonormal_basis(z.masked_fill(done, 0))
    while iterations < maxiter and direction.shape[1] > 0:
        iterations += 1
        q = apply_a(direction)
        pq = direction.T @ q
        pq = 0.5 * (pq + pq.T)
        largest[0] = max(largest[0], float(pq.diagonal().abs().max()))
        alpha = _spd_solve(pq, direction.T @ r)
        x = x + direction @ alpha
        r = r - q @ alpha
        r_norm = torch.linalg.vector_norm(r, dim=0)
        done = r_norm <= tol
        if bool(done.all()) or iterations >= maxiter:
            break  # no next direction to build: it would cost a preconditioning and an SVD
        z = precondition(r) if precondition else r
        z = z.masked_fill(done, 0)
        beta = -_spd_solve(pq, q.T @ z)
        direction = _orthonormal_basis(z + direction @ beta)
    return x, r, r_norm, done, iterations


def _check_rayleigh_quotients(x: Tensor, ax: Tensor, norm: float) -> None:
    """Raise :class:`NotPositiveDefiniteError` when a column's ``x^T A x / x^T x`` is clearly
    negative: below ``-10 sqrt(p) eps |A|`` (the rounding of ``A x``), ``norm`` an estimate of
    ``|A|``; ``x``, ``ax`` ``(p, k)``."""
    x_norm = torch.linalg.vector_norm(x, dim=0)
    nonzero = x_norm > 0
    if not bool(nonzero.any()):
        return
    quotients = (x * ax).sum(dim=0)[nonzero] / x_norm[nonzero] ** 2
    rounding = 10 * x.shape[0] ** 0.5 * torch.finfo(x.dtype).eps * norm
    bad = quotients < -rounding
    if bool(bad.any()):
        smallest = float(quotients[bad].min())
        raise NotPositiveDefiniteError(
            f"CG's solution of a right-hand side has the Rayleigh quotient x^T A x / x^T x = {smallest:.3e} "
            "< 0 (its b^T x, e.g. a self-influence, can come out negative), so the matrix is not positive "
            "definite and CG cannot solve with it.",
            smallest_eigenvalue=smallest,
            suggested_regularization=float("nan"),
        )


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative tolerance: ``1e-10`` in float64, ``1e-5`` in lower precision."""
    return 1e-10 if dtype == torch.float64 else 1e-5


@dataclass(frozen=True)
class CgConfig(SolverConfig):
    """Hyperparameters of :class:`CgInfluence`."""

    rtol: float | None = hyperparameter(
        None,
        "Relative tolerance per right-hand side; default 1e-10 for float64 models and 1e-5 "
        "for float32, tight enough to agree with the direct solver.",
    )
    atol: float = hyperparameter(0.0, "Absolute tolerance per right-hand side.")
    maxiter: int | None = hyperparameter(None, "Iteration limit (one sweep each); default min(2p, 1000).")
    preconditioner: Any = hyperparameter(
        None,
        "None, 'jacobi' (Hutchinson diagonal), 'nystroem' (rank preconditioner_rank) or a "
        "Preconditioner instance; fitted in fit and applied at every iteration.",
    )
    preconditioner_rank: int = hyperparameter(10, "Rank of the Nystroem preconditioner.")
    rhs_block_size: int | None = hyperparameter(
        None,
        "Right-hand sides (test points) solved together by one block CG, at most (default: all of a call's; "
        "formerly block_size). Not a data block: a memory and convergence knob of the solve.",
    )
    seed: int = hyperparameter(0, "Seeds the preconditioner's random probes.")
    blocks: str = hyperparameter("full", "'full' or 'layer' (block-diagonal curvature, one block per layer).")
    memory_budget: int | None = hyperparameter(None, memory.BUDGET_HELP)
    resource_fields: ClassVar[frozenset[str]] = frozenset({"memory_budget"})

    solve_time: ClassVar[frozenset[str]] = frozenset({"regularization", "rtol", "atol", "maxiter", "rhs_block_size"})
    renamed = MappingProxyType({"block_size": "rhs_block_size"})  # block sizes name data blocks (docs/api.md)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rtol is not None:
            self._set("rtol", check_nonnegative("rtol", self.rtol))
        self._set("atol", check_nonnegative("atol", self.atol))
        if self.maxiter is not None:
            check_positive_int("maxiter", self.maxiter)
        if self.rhs_block_size is not None:
            check_positive_int("rhs_block_size", self.rhs_block_size)
        check_positive_int("preconditioner_rank", self.preconditioner_rank)
        check_seed(self.seed)
        check_blocks(self.blocks)
        if self.memory_budget is not None:
            check_positive_int("memory_budget", self.memory_budget)
        make_preconditioner(self.preconditioner)  # refuses an unknown name
        if isinstance(self.preconditioner, str):
            self._set("preconditioner", self.preconditioner.strip().lower().replace("nystrom", "nystroem"))

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`SolverConfig.to_dict`; a built-in preconditioner instance is recorded by name."""
        out = super().to_dict()
        out["preconditioner"] = preconditioner_name(self.preconditioner)
        return out


@register("cg")
class CgInfluence(InfluenceModel):
    """Influences by block conjugate gradients, using curvature-vector products only.

    Args:
        model, loss, regularization, curvature, chunk_size: as for every solver.
        rtol: relative tolerance per right-hand side; default ``1e-10`` for float64 models
            and ``1e-5`` for float32, tight enough to agree with the direct solver.
        atol: absolute tolerance per right-hand side.
        maxiter: iteration limit; default ``min(2p, 1000)``. Each iteration sweeps the
            training data once.
        preconditioner: ``None``, ``"jacobi"`` (Hutchinson diagonal), ``"nystroem"`` (rank
            ``preconditioner_rank``) or a :class:`Preconditioner` instance. It is fitted in
            ``fit`` and applied at every iteration.
        preconditioner_rank: rank of the Nystroem preconditioner.
        rhs_block_size: solve at most this many right-hand sides together (default: all; formerly
            ``block_size``, which still works with a ``RenamedWarning``).
        blocks: ``"full"`` or ``"layer"`` (block-diagonal curvature, one block per layer).
        seed: seeds the preconditioner's random probes.

    ``solve`` returns a :class:`CgInfo` with each solution (after the one-call methods it is
    also kept in ``info_``): the TRUE residuals, verified by one more sweep at the end of each
    solve (see :func:`block_cg`, which also refuses a solution whose Rayleigh quotient proves
    ``H + regularization * I`` indefinite); a right-hand side that missed its tolerance raises a
    :class:`ConvergenceWarning` with the residuals.
    """

    config_class = CgConfig
    needs_training_data = True
    _saved_attributes = ("preconditioner_",)

    def __init__(
        self,
        model: torch.nn.Module,
        task: Callable[[Tensor, Tensor], Tensor] | Task,
        config: CgConfig | None = None,
        /,
        **hyperparameters: Any,
    ):
        super().__init__(model, task, config, **hyperparameters)
        self.preconditioner_: Preconditioner | None = make_preconditioner(
            self.config.preconditioner, rank=self.config.preconditioner_rank, seed=self.config.seed
        )
        self._operator: LinearOperator | None = None
        self.info_: CgInfo | None = None

    config: CgConfig

    @property
    def preconditioner(self) -> Preconditioner | None:
        """The preconditioner (fitted by ``fit``), or ``None``."""
        return self.preconditioner_

    @property
    def rtol(self) -> float:
        """The relative tolerance in use: the configured one or :func:`default_rtol` of the model's dtype."""
        return default_rtol(self.dtype) if self.config.rtol is None else self.config.rtol

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        if self.preconditioner_ is not None:
            self.preconditioner_.fit(operator, self.regularization)

    def _detach(self) -> None:
        self._operator = None

    def memory_pieces(self, batch_size: int) -> tuple[list[tuple[str, int]], int]:
        """Engine hook. Block CG's vectors for one right-hand side, :data:`CG_VECTORS` x ``(p, 1)`` (a solve
        takes as many right-hand sides per block as fit the room left, :meth:`_rhs_per_block`); the
        preconditioner (Jacobi: ``2 p``; Nystroem: 4 x ``(p, rank)`` float64), the parameters and a
        chunk's gradients; its products push ``k = min(chunk_size, batch)`` vectors, in pieces that fit."""
        p, size = self.num_params, memory.itemsize(self.dtype)
        k = min(self.chunk_size, batch_size)
        name = preconditioner_name(self.config.preconditioner)
        rank = self.config.preconditioner_rank
        extra = {None: 0, "jacobi": 2 * p * size, "nystroem": memory.matrix_bytes(p, min(rank, p), 4 * 8)}
        pieces = memory.common_pieces(p, size, k) + [
            (f"{CG_PIECE} for one right-hand side ({CG_VECTORS} x ({p:,}, 1))", CG_VECTORS * p * size),
            (f"the {name} preconditioner", extra.get(name, 0)),
        ]
        return pieces, k

    def _rhs_per_block(self, block: int) -> int:
        """At most ``block`` right-hand sides per block CG solve, fewer where :data:`CG_VECTORS` x
        ``(p, block)`` would not fit the room the fit's estimate left (a one-line refusal where one
        does not); ``block`` when the fit made no estimate (a loaded solver)."""
        estimate = getattr(self, "estimated_memory_", None)
        if not isinstance(estimate, memory.MemoryEstimate):
            return block
        budget = memory.budget_of(self.config.memory_budget, self.device)
        room = budget - (estimate.total - estimate.bytes_of(CG_PIECE))
        one = CG_VECTORS * self.num_params * memory.itemsize(self.dtype)
        if one > room:
            raise ValueError(
                f"CgInfluence cannot hold one right-hand side's {CG_PIECE} ({memory.readable(one)}) beside its other "
                f"pieces within memory_budget={memory.readable(budget)}. Pass a larger memory_budget, or a smaller "
                "chunk_size."
            )
        return max(1, min(block, room // one))

    def _attach(self, operator: LinearOperator, data: TrainingData | None) -> None:
        self._operator = operator

    reports_solves = True
    solves_with_sweeps = True

    def _solve(self, rhs: Tensor) -> Tensor:
        return self._solve_with_report(rhs)[0]

    def _solve_with_report(self, rhs: Tensor) -> tuple[Tensor, CgInfo]:
        assert self._operator is not None
        damped = DampedOperator(self._operator, self.regularization)
        maxiter = self.config.maxiter or min(2 * self.num_params, 1000)
        precondition = self.preconditioner_.apply if self.preconditioner_ is not None else None
        block = self.config.rhs_block_size or rhs.shape[0]
        block = self._rhs_per_block(block)
        solutions, infos = [], []
        reporter = _progress.current()
        k = rhs.shape[0]
        points = reporter.meter("CG solve", k, "right-hand sides") if k > block else None
        for start in range(0, rhs.shape[0], block):
            stop = min(start + block, k)
            which = f"right-hand sides {start + 1:,}-{stop:,} of {k:,}" if k > block else f"{k:,} right-hand sides"
            iterations = reporter.meter(f"CG solve ({which})", maxiter, "iterations", bound=True)
            apply = damped.matmat
            if reporter.show:

                def apply(v: Tensor, meter: _progress.Meter = iterations) -> Tensor:
                    out = damped.matmat(v)
                    meter.advance()
                    return out

            try:
                x, info = block_cg(
                    apply,
                    rhs[start : start + block].T,
                    rtol=self.rtol,
                    atol=self.config.atol,
                    maxiter=maxiter,
                    precondition=precondition,
                )
            except NotPositiveDefiniteError as err:
                raise self._negative_curvature(err) from None
            solutions.append(x.T)
            infos.append(info)
            residual = float(info.relative_residuals.max()) if info.relative_residuals.numel() else 0.0
            iterations.finish(f", relative residual max {residual:.2e}")
            if points is not None:
                points.advance(stop - start)
        if points is not None:
            points.finish()
        info = CgInfo.concatenate(infos)
        self._warn_if_not_converged(info, maxiter)
        return torch.cat(solutions), info

    def _negative_curvature(self, err: NotPositiveDefiniteError) -> NotPositiveDefiniteError:
        from ..lanczos import lanczos  # only on this error path

        lam = self.regularization
        bound = err.smallest_eigenvalue - lam  # H has an eigenvalue at most this
        # a short Lanczos run sharpens the bound: its smallest Ritz value converges fast
        # to H's smallest eigenvalue (and never goes below it)
        assert self._operator is not None
        result = lanczos(self._operator, min(self.num_params, 40), generator=torch.Generator().manual_seed(0))
        t = torch.diag(result.alphas) + torch.diag(result.betas, 1) + torch.diag(result.betas, -1)
        bound = min(bound, float(torch.linalg.eigvalsh(t).min()))
        suggestion = float(f"{2 * abs(bound):.1g}")
        if suggestion <= abs(bound):
            suggestion = float(f"{4 * abs(bound):.1g}")
        if self.curvature is Curvature.ggn:
            # the GGN is positive semi-definite in exact arithmetic: what CG met is rounding
            advice = (
                f" The GGN is positive semi-definite in exact arithmetic, so this is rounding in its products "
                f"({str(self.dtype).replace('torch.', '')}): use a float64 model (model.double()) or a "
                "regularization above the rounding level."
            )
        else:
            advice = (
                " Or use curvature='ggn', which is positive semi-definite for losses convex in the model "
                "outputs (the model may also not be at a minimum of its loss)."
            )
        return NotPositiveDefiniteError(
            f"{err} H + regularization*I is not positive definite: H has an eigenvalue of at "
            f"most {bound:.3e} (regularization={lam:g}). Pass regularization={suggestion:g} or "
            f"larger.{advice}",
            smallest_eigenvalue=err.smallest_eigenvalue,
            suggested_regularization=suggestion,
        )

    def _warn_if_not_converged(self, info: CgInfo, maxiter: int) -> None:
        failed = ~info.converged
        if not bool(failed.any()):
            return
        rel = info.relative_residuals[failed]
        warnings.warn(
            f"CG stopped after {info.iterations} iterations (maxiter={maxiter}) with "
            f"{int(failed.sum())} of {failed.numel()} right-hand sides above tolerance "
            f"(rtol={self.rtol:g}, atol={self.config.atol:g}): relative residuals max "
            f"{float(rel.max()):.3e}, median {float(rel.median()):.3e}. Raise maxiter, raise "
            "regularization, or use preconditioner='nystroem'."
            + (
                ""
                if self.dtype == torch.float64
                else f" In {str(self.dtype).replace('torch.', '')} rounding limits the attainable residual "
                "(the true residual is reported): a float64 model (model.double()) or a larger rtol may be needed."
            ),
            ConvergenceWarning,
            stacklevel=5,
        )
