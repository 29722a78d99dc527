"""What the commands print besides their results: the library's log lines on stderr, errors as
one ``Error:`` line, and Ctrl-C / SIGTERM as one line saying how to resume.

The job layer (:mod:`dask_influence.job`) prints nothing: it logs its notes to the loggers
under ``dask_influence.job`` (INFO: what it does and where; WARNING: an unencrypted remote
scheduler) and the library logs its progress to ``dask_influence.progress``. A command shows
them with :func:`show_log_lines`: the job's notes as lines of their own, the library's progress
and other notes indented by two spaces, all on stderr; ``--quiet`` keeps only the warnings.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..errors import JobFileError, StoreError

USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, ImportError)
"""Errors shown as one ``Error: ...`` line: the library's own (ValueError/TypeError/RuntimeError
subclasses), torch's errors on bad shapes, and failures to reach a scheduler or a store."""

JOB_LOGGER = "dask_influence.job"


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as click prints it after ``Error:``.

    A job file's problems stay one per line; any other message is joined into one line.
    """
    if isinstance(exc, JobFileError):
        return str(exc)
    return " ".join(str(exc).split()) or type(exc).__name__


def _lost_cluster(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to the Dask scheduler (or the job's futures) was lost."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    return bool(
        names & {"FutureCancelledError", "CancelledError", "CommClosedError", "StreamClosedError"}
        or "scheduler" in str(exc).lower()
        and ("lost" in str(exc).lower() or "closed" in str(exc).lower())
    )


def foreign_error(exc: BaseException) -> str:
    """One line for an error the library does not raise itself (from the model, the loss, the
    data or a dependency): its type and message, what probably caused it, and ``--traceback``."""
    message = f"{type(exc).__name__}: {one_line(exc)}"
    text = str(exc)
    if isinstance(exc, IndexError) and "Target" in text and "out of bounds" in text:
        hint = (
            "a label is not a valid class index for the model's outputs (0 to number of classes - 1); "
            "check the labels of the datasets the factory returns"
        )
    elif _lost_cluster(exc):
        return (
            f"lost the Dask scheduler or its workers ({message}). The store keeps every chunk written so "
            "far: once the scheduler and workers are back, rerun with --resume to compute only the "
            "missing chunks (--traceback for the full traceback)."
        )
    else:
        hint = "raised while running the model, the loss or the data loading of the job"
    return f"{message} ({hint}; rerun with --traceback for the full traceback)"


@contextmanager
def user_errors(traceback: bool) -> Iterator[None]:
    """Turn expected errors into a one-line ``click.ClickException`` (unless ``traceback``)."""
    try:
        yield
    except click.ClickException:
        raise
    except USER_ERRORS as exc:
        if traceback:
            raise
        message = one_line(exc)
        if isinstance(exc, StoreError):  # the library's keyword arguments are this command's flags
            message = (
                message.replace("resume=True", "--resume")
                .replace("overwrite=True", "--overwrite")
                .replace("break_lock=True", "--break-lock")
                .replace("wait_for_lock=SECONDS", "--wait-for-lock SECONDS")
            )
        raise click.ClickException(message) from None
    except Exception as exc:  # noqa: BLE001 - an error of the user's model, loss or data: one line
        if traceback:
            raise
        raise click.ClickException(foreign_error(exc)) from None


def stop_on_sigterm() -> Any:
    """Make SIGTERM (``kill``, a Kubernetes pod being stopped) end a command as Ctrl-C does: the
    lock released, one line saying how to resume. Returns the previous handler (``None``
    off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


@contextmanager
def interrupts_say_how_to_resume(hint: str) -> Iterator[None]:
    """Ctrl-C and SIGTERM (``kill``, a Kubernetes pod being stopped) end a command with one line,
    ``Interrupted.`` and ``hint`` (how to resume), and exit code 130; the store's lock is
    released on the way out (the library's ``with`` blocks hold it)."""
    previous = stop_on_sigterm()
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted. {hint}", err=True)
        raise SystemExit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def resume_hint(command: str, job_file: object) -> str:
    """What ``run`` and ``query`` say after ``Interrupted.``: how to compute only the missing chunks."""
    return (
        "The store keeps every chunk written so far: rerun with --resume "
        f"(dask-influence {command} {job_file} --resume) to compute only the missing ones."
    )


@contextmanager
def job_command(quiet: bool, traceback: bool, interrupted: str) -> Iterator[None]:
    """The frame of a command that runs a job (``run``, ``index``, ``query``, ``evaluate``): the
    job's log lines shown (:func:`show_log_lines`), every error one ``Error:`` line
    (:func:`user_errors`), Ctrl-C and SIGTERM one line, ``Interrupted.`` and ``interrupted`` (how
    to resume; :func:`interrupts_say_how_to_resume`)."""
    with interrupts_say_how_to_resume(interrupted), user_errors(traceback):
        show_log_lines(quiet)
        yield


class _Progress(logging.Handler):
    """The library's INFO lines on stderr, indented: its progress (:mod:`dask_influence.progress`:
    every pass of a fit, an index build or query, a job's chunks, evaluation runs, with counts,
    rate and ETA) and its other notes (client-side solves, top-k merges, waiting for a lock).
    The job layer's notes are :class:`_JobLines`'."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == JOB_LOGGER or record.name.startswith(JOB_LOGGER + "."):
            return
        click.echo(f"  {record.getMessage()}", err=True)


class _JobLines(logging.Handler):
    """The job layer's notes (what it does, where it computes) and warnings on stderr, a line each."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


def show_log_lines(quiet: bool) -> None:
    """Show the job layer's notes and the library's progress lines (every pass, with counts, rate
    and ETA) on stderr unless ``quiet`` (then the job's warnings only); the library's calls report
    (``progress=None`` means on in this process, off with ``--quiet``). In a process that goes on
    after the command (a test, a notebook) all of it is undone when the command ends."""
    from .. import progress

    log, job_log = logging.getLogger("dask_influence"), logging.getLogger(JOB_LOGGER)
    for logger in (log, job_log):
        for handler in [h for h in logger.handlers if isinstance(h, (_Progress, _JobLines))]:
            logger.removeHandler(handler)
    levels = log.level, job_log.level
    progress.set_default(not quiet)
    job_log.addHandler(_JobLines(logging.WARNING if quiet else logging.INFO))
    job_log.setLevel(logging.INFO)
    if not quiet:
        log.addHandler(_Progress(logging.INFO))
        log.setLevel(logging.INFO)
    context = click.get_current_context(silent=True)
    if context is not None:

        def restore() -> None:
            progress.set_default(None)
            for logger, level in zip((log, job_log), levels):
                for handler in [h for h in logger.handlers if isinstance(h, (_Progress, _JobLines))]:
                    logger.removeHandler(handler)
                logger.setLevel(level)

        context.call_on_close(restore)
