"""Progress of a fit: each pass over the training blocks reported as it runs.

:func:`fit_reported` is the body of :meth:`~.engine.SolverEngine.fit_blocks` (the one fitting
path): the solver's ``_fit`` sees the blocks through :class:`ReportedBlocks`, which opens a
:class:`~dask_influence.progress.Meter` per pass (``EK-FAC fit: pass 1 of 2 (Kronecker
factors)``) and says the end of the fit. The names in those lines come from the solver
(``_progress_title``, ``_fit_passes``, ``_pass_name``) with the defaults here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ... import progress as _progress
from ...errors import NotPositiveDefiniteError
from ..blocks import BlockSums
from ..data import TrainingData

if TYPE_CHECKING:
    from .engine import SolverEngine


_PASS_NAMES = {"curvature_block": "curvature products", "dense_block": "dense curvature"}
_TITLES = {
    "CgInfluence": "CG",
    "LissaInfluence": "LiSSA",
    "NystroemSketchInfluence": "Nystroem",
    "EkfacInfluence": "EK-FAC",
}


def title(name: str) -> str:
    """A solver class's name in progress lines (``CG``, ``EK-FAC``, ...): the default of
    :meth:`~.engine.SolverEngine._progress_title`."""
    return _TITLES.get(name, name.removesuffix("Influence"))


def pass_name(fn: object) -> str:
    """What a fitting pass of block function ``fn`` computes, for progress lines."""
    name = getattr(fn, "__name__", "block sums")
    return _PASS_NAMES.get(name, name.removesuffix("_block").replace("_", " "))


class ReportedBlocks:
    """The training blocks of a fit with each pass reported: a :class:`~dask_influence.progress.Meter`
    per pass, counting samples as blocks that say so (``on_block``: the in-process blocks) are
    summed, else at the end of the pass. Everything else is the blocks' own."""

    def __init__(self, blocks: BlockSums, solver: SolverEngine, reporter: _progress.Progress):
        self._blocks, self._solver, self._reporter = blocks, solver, reporter
        self._passes = 0
        self._started = reporter.clock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blocks, name)

    @property
    def n(self) -> int:
        """The number of training samples (the blocks' own)."""
        return self._blocks.n

    @n.setter
    def n(self, value: int) -> None:
        self._blocks.n = value

    @property
    def sweeps(self) -> int:
        """Passes made so far (the blocks' own count)."""
        return self._blocks.sweeps

    @sweeps.setter
    def sweeps(self, value: int) -> None:
        self._blocks.sweeps = value

    def sum(self, fn: Any, payload: Any = None, each: Any = None) -> Any:
        """The blocks' ``sum(fn, payload, each)``, reported as one pass (a meter of its samples)."""
        self._passes += 1
        total = self._solver._fit_passes()
        of = f" of {total}" if total and total >= self._passes else ""
        meter = self._reporter.meter(
            f"{self._solver._progress_title()} fit: pass {self._passes}{of} ({self._solver._pass_name(fn, payload)})",
            self._blocks.n,
            "samples",
            force=bool(total),  # a known, small number of passes: each one's start is said
        )
        hooked = self._reporter.show and hasattr(self._blocks, "on_block")
        if hooked:
            self._blocks.on_block = meter.advance  # type: ignore[attr-defined]
        try:
            result = self._blocks.sum(fn, payload, each)
        finally:
            if hooked:
                self._blocks.on_block = None  # type: ignore[attr-defined]
        if not hooked:
            meter.advance(self._blocks.n - meter.done)
        meter.finish()
        return result

    def done(self) -> None:
        """Say the end of the fit (after at least one pass)."""
        if not self._passes:
            return
        elapsed = self._reporter.clock() - self._started
        self._reporter.say(
            f"{self._solver._progress_title()} fit: done, {self._passes} pass{'es' if self._passes != 1 else ''} "
            f"over {_progress.count(self._blocks.n)} samples in {_progress.duration(elapsed)}",
            force=True,
        )


def fit_reported(
    solver: SolverEngine,
    blocks: BlockSums,
    data: TrainingData | None,
    feature_shape: Sequence[int],
    float_inputs: bool | None,
    reporter: _progress.Progress,
) -> None:
    """The fit of :meth:`~.engine.SolverEngine.fit_blocks` with each pass over the blocks reported
    (:class:`ReportedBlocks`), then the end of the fit. A refused regularization that is a
    solve-time setting keeps the fit (the advice then needs no refit)."""
    theta = solver.trained_parameters()
    solver._theta = None
    reported = ReportedBlocks(blocks, solver, reporter)
    try:
        solver._fit(solver.curvature_over(reported, theta), reported)
    except NotPositiveDefiniteError as err:
        # A solver whose regularization is a solve-time setting keeps a fit whose state it
        # stored before refusing the regularization: following the advice needs no refit.
        if "regularization" not in solver.config.solve_time or getattr(solver, "state_", None) is None:
            raise
        solver.finish_fit(theta, data, n=blocks.n, feature_shape=feature_shape, float_inputs=float_inputs)
        suggested = err.suggested_regularization
        raise NotPositiveDefiniteError(
            f"{err} The fit is kept: set solver.regularization = {suggested:g} and call the solver "
            "again (no refit needed).",
            smallest_eigenvalue=err.smallest_eigenvalue,
            suggested_regularization=suggested,
        ) from None
    solver.finish_fit(theta, data, n=blocks.n, feature_shape=feature_shape, float_inputs=float_inputs)
    reported.done()
