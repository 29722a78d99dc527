"""Progress of long calls: one mechanism for the library and the ``dask-influence`` command.

A long call (a solver's ``fit``, a CG or LiSSA solve over many test points, ``self_influences``,
``GradientIndex.build`` and its queries, ``di.evaluate``) reports what it is doing as lines::

    EK-FAC fit: pass 1 of 2 (Kronecker factors): 0 of 1,000 samples
    EK-FAC fit: pass 1 of 2 (Kronecker factors): 256 of 1,000 samples (26%), 51.2 samples/s, ETA 15 s
    EK-FAC fit: pass 1 of 2 (Kronecker factors): 1,000 of 1,000 samples in 19.5 s (51.3 samples/s)

Each line is a log record of the ``dask_influence.progress`` logger at level INFO. Whether a
call reports at all is its ``progress=`` argument:

- ``True``: report. When no handler of the application shows INFO records of that logger
  (plain Python: logging not configured), the lines are written to stderr instead, so that
  ``progress=True`` is always visible.
- ``False``: nothing (no lines, no log records).
- ``None`` (the default): :func:`set_default` if the process set one (the CLI's ``--quiet``
  does), else the environment variable ``DASK_INFLUENCE_PROGRESS`` (``1``/``0``), else on
  where a person is watching (stderr is a terminal, or a Jupyter kernel runs) or where the
  application's logging takes INFO records of ``dask_influence`` (``logging.basicConfig(level=logging.INFO)``);
  off otherwise (a batch job, a test, a pipe): a library does not write to a stream nobody asked for.

Lines are throttled: the first line of a call, the first count of a part (which gives its rate
and ETA), then at most one every :data:`INTERVAL` seconds, and the end of every part whose
start was shown.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger("dask_influence.progress")

INTERVAL = 5.0
"""Seconds between two lines of the same call (first and last lines are always shown)."""

ENV = "DASK_INFLUENCE_PROGRESS"

_DEFAULT: dict[str, bool | None] = {"value": None}
_CURRENT: ContextVar[Progress | None] = ContextVar("dask_influence_progress", default=None)


def set_default(enabled: bool | None) -> None:
    """The process-wide value of ``progress=None`` (``None``: back to the automatic choice).

    The CLI sets ``False`` for ``--quiet`` and ``True`` otherwise."""
    _DEFAULT["value"] = enabled


def resolve(progress: bool | None) -> bool:
    """Whether a call given ``progress`` reports (see the module docstring for ``None``)."""
    if progress is not None:
        return bool(progress)
    if _DEFAULT["value"] is not None:
        return bool(_DEFAULT["value"])
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return not _in_worker() and (_watched() or _logged())


def _in_worker() -> bool:
    """Whether this runs in a Dask worker's task (whose driver reports the job's progress)."""
    if "distributed" not in sys.modules:
        return False
    try:
        from distributed import get_worker

        get_worker()
    except (ValueError, ImportError):
        return False
    return True


def _watched() -> bool:
    """Whether a person is likely watching: stderr is a terminal, or a Jupyter kernel runs."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or replaced stream
        pass
    return "ipykernel" in sys.modules


def _logged() -> bool:
    """Whether the application's logging shows INFO records of ``dask_influence.progress``."""
    if not logger.isEnabledFor(logging.INFO):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) and h.level <= logging.INFO for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _emit(line: str) -> None:
    if _logged():
        logger.info(line)
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed: nothing to report to
        pass


def count(n: float) -> str:
    """``1,234`` for whole numbers, three significant digits otherwise."""
    if float(n).is_integer():
        return f"{int(n):,}"
    return f"{n:,.3g}"


def rate(n: float, seconds: float) -> str:
    """``n / seconds`` with three significant digits (``"-"`` when no time has passed)."""
    if seconds <= 0:
        return "-"
    r = n / seconds
    if r >= 100:
        return f"{r:,.0f}"
    return f"{r:.3g}"


def duration(seconds: float) -> str:
    """``"4.2 s"``, ``"2 min 30 s"``, ``"1 h 5 min"``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


class Progress:
    """The reporter of one long call: its parts are :meth:`meter` s, its lines throttled together.

    Args:
        show: whether to report (a resolved ``progress=``; ``False``: every method does nothing).
        interval: seconds between two throttled lines (default :data:`INTERVAL`).
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, show: bool, *, interval: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.show = bool(show)
        self.interval = INTERVAL if interval is None else float(interval)
        self.clock = clock
        self.lines = 0
        self._last = -math.inf

    def say(self, line: str, *, force: bool = False) -> bool:
        """Report ``line`` (if shown and not throttled, or ``force``); returns whether it was."""
        if not self.show:
            return False
        now = self.clock()
        if not (force or self.lines == 0 or now - self._last >= self.interval):
            return False
        self._last = now
        self.lines += 1
        _emit(line)
        return True

    def meter(self, what: str, total: int | None, unit: str, *, force: bool = False, bound: bool = False) -> Meter:
        """A part of the call with ``total`` ``unit`` s to do (``None``: not known; ``bound``: at
        most ``total``, as an iteration limit); says its start (throttled unless ``force``)."""
        return Meter(self, what, total, unit, force=force, bound=bound)


class Meter:
    """Counts one part of a long call: ``what: done of total unit (pct), rate unit/s, ETA``.

    Made by :meth:`Progress.meter`; :meth:`advance` as work is done, :meth:`finish` at the end
    (also usable as a context manager, which finishes on success)."""

    def __init__(
        self, progress: Progress, what: str, total: int | None, unit: str, *, force: bool = False, bound: bool = False
    ):
        self.progress, self.what, self.total, self.unit, self.bound = progress, what, total, unit, bound
        self.done: float = 0
        self.started = progress.clock()
        self._counted = False
        self._finished = False
        self.shown = progress.say(f"{what}: 0{self._of()} {unit}", force=force)

    def _of(self) -> str:
        if self.total is None:
            return ""
        return f" of {'at most ' if self.bound else ''}{count(self.total)}"

    def line(self) -> str:
        """The current line: counts, rate and ETA."""
        elapsed = self.progress.clock() - self.started
        text = f"{self.what}: {count(self.done)}"
        if self.total is not None and not self.bound:
            pct = 100 * self.done / self.total if self.total else 100.0
            text += f"{self._of()} {self.unit} ({pct:.0f}%)"
        else:
            text += f"{self._of()} {self.unit}"
        text += f", {rate(self.done, elapsed)} {self.unit}/s"
        if self.total is not None and self.done > 0 and elapsed > 0:
            eta = duration(elapsed * (self.total - self.done) / self.done)
            text += f", ETA {'at most ' if self.bound else ''}{eta}"
        return text

    def advance(self, k: float = 1) -> None:
        """``k`` more units done."""
        self.done += k
        if not self.progress.show:
            return
        first = not self._counted and self.shown  # the first count of a shown part gives its rate and ETA
        self._counted = True
        if self.total is not None and self.done >= self.total and not self.bound:
            return  # finish() says it
        if self.progress.say(self.line(), force=first):
            self.shown = True

    def finish(self, note: str = "") -> None:
        """Say the end of the part (when its start or a count was shown, or when it is the call's
        first line): ``what: done of total unit in T (rate unit/s)`` and ``note``."""
        if self._finished:
            return
        self._finished = True
        if not self.progress.show:
            return
        elapsed = self.progress.clock() - self.started
        of = "" if self.bound else self._of()
        text = (
            f"{self.what}: {count(self.done)}{of} {self.unit} in {duration(elapsed)} "
            f"({rate(self.done, elapsed)} {self.unit}/s){note}"
        )
        self.progress.say(text, force=self.shown)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.finish()


_SILENT = Progress(False)


def current() -> Progress:
    """The reporter of the call this code runs in (:func:`reporting`), or a silent one."""
    return _CURRENT.get() or _SILENT


@contextmanager
def silenced() -> Iterator[None]:
    """Calls made inside (``progress=None``) say nothing: the block tasks of a job that reports
    its own progress (its chunks), run in this process."""
    token = _CURRENT.set(_SILENT)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextmanager
def reporting(progress: bool | None, *, interval: float | None = None) -> Iterator[Progress]:
    """The reporter of a long call, current (:func:`current`) for the calls it makes.

    A call inside another one that reports (``progress=None``) joins the outer reporter, so
    that a fit inside ``di.evaluate`` is throttled with it; an explicit ``progress=False`` or
    ``True`` makes its own."""
    outer = _CURRENT.get()
    if progress is None and outer is not None:
        yield outer
        return
    reporter = Progress(resolve(progress), interval=interval)
    token = _CURRENT.set(reporter)
    try:
        yield reporter
    finally:
        _CURRENT.reset(token)
