"""``dask-influence run JOB.toml``: compute a job's influence matrix into its zarr store.

Steps: read and validate the job file, call its factory (model, loss, train and test
datasets), fit the solver on the train data (over its blocks on the cluster unless
``[solver] distributed_fit = false``; a matching saved fit next to the store is reused, and
a new one is saved there), compute the influences in blocks on Dask and write them to the
store, then check that the store is complete. The exit code is 0 only when it is.
``--fit-only`` stops after the fit.

Where the blocks are computed, in this order: ``--scheduler``; ``[cluster] scheduler``;
``DASK_SCHEDULER_ADDRESS`` from the environment; ``[cluster] sequential = true`` (this
process); an embedded ``LocalCluster`` with ``[cluster] workers / threads / memory_limit``.
A ``tls://`` scheduler is reached with the certificates of ``--tls-ca-file/--tls-cert/--tls-key``,
else ``[cluster] security``, else Dask's ``distributed.comm.tls.*`` configuration
(:mod:`dask_influence.mapping.security`); a plain ``tcp://`` scheduler on another host gets
one warning.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from ..errors import JobFileError, StoreError
from ..job.cluster import _CRITICAL_ONLY, SCHEDULER_ENV, job_client, job_model
from .cluster_options import tls_from_options, tls_options
from .options import BREAK_LOCK, JOB_ARGUMENT, TRACEBACK, WAIT_FOR_LOCK

# errors shown as one "Error: ..." line: the library's own (ValueError/TypeError/RuntimeError
# subclasses), torch's errors on bad shapes, and failures to reach a scheduler or a store
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, ImportError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as click prints it after ``Error:``.

    A job file's problems stay one per line; any other message is joined into one line.
    """
    if isinstance(exc, JobFileError):
        return str(exc)
    return " ".join(str(exc).split()) or type(exc).__name__


def _stop_on_sigterm() -> Any:
    """Make SIGTERM (``kill``, a Kubernetes pod being stopped) end ``run`` as Ctrl-C does: the
    lock released, one line saying how to resume. Returns the previous handler (``None``
    off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


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
        end_progress_line()
        raise click.ClickException(message) from None
    except Exception as exc:  # noqa: BLE001 - an error of the user's model, loss or data: one line
        if traceback:
            raise
        end_progress_line()
        raise click.ClickException(foreign_error(exc)) from None


_BAR = {"drawn": False}
"""Whether a progress bar may have been drawn on stdout since the last line break."""


@contextmanager
def progress_bar(show: bool) -> Iterator[None]:
    """Mark a call that draws Dask's progress bar (``show``): after it, the bar's line is ended
    (a newline where stdout is not a terminal, on success and on error), so that a summary or
    an ``Error:`` line written next is not glued to the bar in a log file. Where the library's
    progress lines are shown (:mod:`dask_influence.progress`, on unless ``--quiet``), they take the
    bar's place (on stderr, each a line of its own): nothing to end."""
    from .. import progress

    _BAR["drawn"] = _BAR["drawn"] or (show and not progress.resolve(None))
    try:
        yield
    finally:
        end_progress_line()


def end_progress_line() -> None:
    """End the line of a progress bar drawn on stdout, if one was (a terminal needs nothing:
    the bar erases its own line)."""
    import sys

    if not _BAR["drawn"]:
        return
    _BAR["drawn"] = False
    try:
        sys.stdout.flush()
        if not sys.stdout.isatty():
            sys.stdout.write("\n")
            sys.stdout.flush()
    except (OSError, ValueError):  # stdout closed: nothing to end
        pass


@contextmanager
def interrupts_say_how_to_resume(hint: str) -> Iterator[None]:
    """Ctrl-C and SIGTERM (``kill``, a Kubernetes pod being stopped) end a command with one line,
    ``Interrupted.`` and ``hint`` (how to resume), and exit code 130; the store's lock is
    released on the way out (the library's ``with`` blocks hold it)."""
    previous = _stop_on_sigterm()
    try:
        yield
    except KeyboardInterrupt:
        end_progress_line()
        click.echo(f"\nInterrupted. {hint}", err=True)
        raise SystemExit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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


@click.command()
@JOB_ARGUMENT
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="Address of a running Dask scheduler, e.g. tls://scheduler:8786 (default: [cluster] "
    f"scheduler of the job, else ${SCHEDULER_ENV}, else an embedded LocalCluster).",
)
@tls_options
@click.option(
    "--resume",
    is_flag=True,
    help="Complete an existing store of the same job, computing only its missing chunks "
    "(creates the store if there is none).",
)
@click.option(
    "--verify",
    "verify",
    is_flag=True,
    help="With --resume, read and decode every done flag and chunk before trusting them (about one "
    "read of the store); by default only the chunk files are listed (finds deleted chunks).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@BREAK_LOCK
@WAIT_FOR_LOCK
@click.option(
    "--wait-for-workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    metavar="N",
    help="With a scheduler: wait until N workers have joined before starting.",
)
@click.option(
    "--timeout",
    "workers_timeout",
    type=click.FloatRange(0),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="How long --wait-for-workers waits.",
)
@click.option(
    "--fit-only",
    is_flag=True,
    help="Fit the solver and save the fit (next to the store, or [solver] fit_file), then exit; "
    "later runs of the job reuse it.",
)
@click.option("--refit", is_flag=True, help="Fit again even if a saved fit exists, and replace it.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (no progress bar).")
@TRACEBACK
def run(
    job_file: Path,
    scheduler: str | None,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    resume: bool,
    verify: bool,
    overwrite: bool,
    break_lock: bool,
    wait_for_lock: float,
    wait_for_workers: int,
    workers_timeout: float,
    fit_only: bool,
    refit: bool,
    quiet: bool,
    traceback: bool,
) -> None:
    """Run the job in JOB.toml: fit its solver, write its influence matrix to zarr.

    Exits with 0 only when the store is complete; after an interruption, rerun with
    --resume to compute the missing chunks. See docs/cli.md for the job file.
    """
    if resume and overwrite:
        raise click.UsageError("Pass --resume or --overwrite, not both.")
    if fit_only and (resume or overwrite or break_lock):
        raise click.UsageError("--fit-only writes no store; drop --resume, --overwrite and --break-lock.")
    if not traceback:  # the Dask client logs a lost scheduler with tracebacks; run says it in one line
        # a filter, not a level: distributed sets its loggers' levels when it is imported, which
        # a job in this process (sequential) never needs to do
        logging.getLogger("distributed.client").addFilter(_CRITICAL_ONLY)
    previous = _stop_on_sigterm()
    try:
        with user_errors(traceback):
            complete, summary = run_job(
                job_file,
                scheduler=scheduler,
                tls=tls_from_options(tls_ca_file, tls_cert, tls_key),
                resume=resume,
                overwrite=overwrite,
                quiet=quiet,
                break_lock=break_lock,
                fit_only=fit_only,
                refit=refit,
                verify=verify,
                wait_for_lock=wait_for_lock,
                wait_for_workers=wait_for_workers,
                workers_timeout=workers_timeout,
            )
    except KeyboardInterrupt:
        end_progress_line()
        click.echo(
            f"\nInterrupted. The store keeps every chunk written so far: rerun with --resume "
            f"(dask-influence run {job_file} --resume) to compute only the missing ones.",
            err=True,
        )
        raise SystemExit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not complete:
        raise click.ClickException(summary)
    if not quiet:
        click.echo(summary)


class _Progress(logging.Handler):
    """The library's INFO lines on stderr: its progress (:mod:`dask_influence.progress`: every pass
    of a fit, an index build or query, a job's chunks, evaluation runs, with counts, rate and
    ETA) and its other notes (client-side solves, top-k merges, waiting for a lock)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"  {record.getMessage()}", err=True)


def _progress_lines(quiet: bool) -> None:
    """Show the library's progress lines (every pass, with counts, rate and ETA) unless quiet:
    the library's calls report (``progress=None`` means on in this process, off with ``--quiet``)."""
    from .. import progress

    log = logging.getLogger("dask_influence")
    for handler in [h for h in log.handlers if isinstance(h, _Progress)]:
        log.removeHandler(handler)
    level = log.level
    progress.set_default(not quiet)
    if not quiet:
        log.addHandler(_Progress(logging.INFO))
        log.setLevel(logging.INFO)
    context = click.get_current_context(silent=True)
    if context is not None:  # a command run in a process that goes on (a test, a notebook): undone after it

        def restore() -> None:
            progress.set_default(None)
            for handler in [h for h in log.handlers if isinstance(h, _Progress)]:
                log.removeHandler(handler)
            log.setLevel(level)

        context.call_on_close(restore)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def _warn(message: str) -> None:
    """A warning line on stderr, printed even with --quiet."""
    click.echo(message, err=True)


def run_job(
    job_file: str | os.PathLike,
    *,
    scheduler: str | None = None,
    tls: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    break_lock: bool = False,
    fit_only: bool = False,
    refit: bool = False,
    verify: bool = False,
    wait_for_lock: float = 0.0,
    wait_for_workers: int = 1,
    workers_timeout: float = 300.0,
) -> tuple[bool, str]:
    """Run a job file; returns ``(complete, one-line summary)``. Errors propagate.

    ``fit_only``: fit (or find the saved fit), save it and stop; ``refit``: fit even if a
    saved fit exists, and (with ``resume``) recompute every chunk of an earlier fit;
    ``verify``: with ``resume``, read every done flag and chunk before trusting them (else
    the chunk files are only listed); ``tls``: the certificates of ``--tls-*``
    (:class:`~dask_influence.mapping.security.TlsFiles`), if any.
    """
    from torch.utils.data import DataLoader

    from ..jobfile import load_job, load_problem, make_solver
    from ..storage.store import is_complete, load_state

    start = time.perf_counter()
    _progress_lines(quiet)
    job = load_job(job_file)
    if not fit_only:
        _check_store_early(
            job.output.store, resume=resume, overwrite=overwrite, break_lock=break_lock, wait=wait_for_lock
        )
    section = job.need_solver()
    _say(quiet, f"Job {job_file}: {section.class_name} ({section.method}), store {job.output.store}")
    problem = load_problem(job)
    model = job_model(job, problem)
    solver = make_solver(job, model, problem.loss)
    train = DataLoader(problem.train, batch_size=job.blocks.train, shuffle=False)
    test = DataLoader(problem.test, batch_size=job.blocks.test, shuffle=False)
    n_train, n_test = len(problem.train), len(problem.test)
    distributed = job.need_solver().distributed_fit
    if distributed is None:  # default: over the blocks on the cluster, when there is one
        distributed = bool(scheduler or job.cluster.scheduler) or not job.cluster.sequential

    with ExitStack() as stack:
        calc, where = (
            (None, "")
            if fit_only and not distributed
            else _calculator(
                job,
                solver,
                scheduler,
                quiet,
                stack,
                wait_for_workers=wait_for_workers,
                timeout=workers_timeout,
                tls=tls,
            )
        )
        fit_path = _fit(
            job,
            solver,
            train,
            calc if distributed else None,
            where,
            refit=refit,
            quiet=quiet,
            verify_data=verify or not resume,  # a resume reuses its fit without a pass over the data
        )
        if fit_only:
            return True, f"Fitted: {fit_path} in {time.perf_counter() - start:.1f} s; runs of this job reuse it."
        assert calc is not None  # _calculator() made one: influences are computed
        _say(
            quiet,
            f"Computing influences of {n_train:,} training points on {n_test:,} test points "
            f"(blocks of {job.blocks.test:,} x {job.blocks.train:,}) {where}...",
        )
        with progress_bar(not quiet):
            calc.influences_to_zarr(
                test,
                train,
                job.output.store,
                mode=job.output.mode,
                resume=resume,
                overwrite=overwrite,
                top_k=job.output.top_k,
                self_influences=job.output.self_influences,
                break_lock=break_lock,
                wait_for_lock=wait_for_lock,
                verify="full" if verify else "exists",
                refit=refit,
            )
    if calc.last_run_.get("lock_broken"):
        _say(quiet, f"Removed the lock of {job.output.store} held by {calc.last_run_['lock_broken']}.")
    import zarr

    group = zarr.open_group(job.output.store, mode="r")
    run_info = calc.last_run_
    done = run_info.get("completion_counts") or load_state(group).counts()  # the job's own counts at its end
    chunks_done, chunks_total = done.get("influences", (0, 0))
    if is_complete(group):  # the store's own say (one listing of the flags)
        computed = run_info.get("chunks_computed", 0)
        skipped = run_info.get("chunks_skipped", 0)
        repaired = run_info.get("chunks_repaired", 0)
        repaired_text = f" ({repaired} damaged, recomputed)" if repaired else ""
        if run_info.get("new_fit"):
            repaired_text += f" (new fit, generation {run_info['fit_generation']}: chunks of earlier fits recomputed)"
        return True, (
            f"Complete: {job.output.store} ({chunks_done}/{chunks_total} chunks; {computed} computed"
            f"{repaired_text}, {skipped} already done) in {time.perf_counter() - start:.1f} s."
        )
    missing = ", ".join(f"{name} {d}/{t}" for name, (d, t) in done.items())
    return False, (
        f"The store {job.output.store} is incomplete ({missing} done); rerun with --resume "
        "to compute the missing chunks."
    )


def _fit(
    job: Any,
    solver: Any,
    train: Any,
    calc: Any,
    where: str,
    *,
    refit: bool,
    quiet: bool,
    verify_data: bool = True,
) -> str:
    """Fit the solver over the train blocks with ``calc`` (``None``: in this process), or reuse
    the saved fit; save it. Returns the fit file.

    ``verify_data=False`` (``--resume`` without ``--verify``): a saved fit is reused without
    reading the training data (its model weights, solver and the data's size, blocks and
    feature shape are checked, not its contents; see ``calc.fit``)."""
    import dask_influence as di

    from ..mapping.fitting import fit_path_for

    path = job.need_solver().fit_file or fit_path_for(job.output.store)
    fitter = calc if calc is not None else di.SequentialInfluenceCalculator(solver, progress=not quiet)
    place = f"over its blocks {where}" if calc is not None else "in this process"
    _say(
        quiet,
        f"Fitting {type(solver).__name__} ({solver.num_params:,} parameters) on {len(train.dataset):,} "
        f"training points in blocks of {job.blocks.train:,} {place}...",
    )
    fitter.fit(train, path=path, refit=refit, verify_data=verify_data)
    info = fitter.last_fit_
    if info["reused"]:
        checked = (
            "training data"
            if info.get("data_checked", True)
            else "size and blocks of the training data; --verify also checks its contents"
        )
        _say(quiet, f"Reusing the saved fit {path} (same solver, model weights and {checked}).")
    else:
        _say(
            quiet,
            f"Fitted in {info['seconds']:.1f} s ({info['sweeps']} passes over {info['blocks']} blocks); "
            f"saved to {path}.",
        )
    return path


def _check_store_early(
    store: str, *, resume: bool, overwrite: bool, break_lock: bool = False, wait: float = 0.0
) -> None:
    """Refuse an unusable store before the (possibly long) fit; the library checks again.

    A path that is a file or cannot be written, a store locked by a live job, and an existing
    local store without ``--resume`` or ``--overwrite``.
    """
    from ..storage.lock import check_lock
    from ..storage.store import check_path
    from ..storage.urls import is_url

    check_path(store)
    check_lock(store, break_lock=break_lock, wait_seconds=wait)
    if resume or overwrite or is_url(store):
        return
    if os.path.isdir(store) and os.listdir(store):
        raise StoreError(
            f"The output store {store!r} already exists; pass --resume to complete it or --overwrite to replace it."
        )


def _calculator(
    job: Any,
    solver: Any,
    scheduler: str | None,
    quiet: bool,
    stack: ExitStack,
    *,
    wait_for_workers: int = 1,
    timeout: float = 300.0,
    tls: Any = None,
) -> tuple[Any, str]:
    """The calculator and where it computes, per the resolution order of the module docstring."""
    import dask_influence as di

    client, where = job_client(
        job,
        scheduler,
        stack,
        say=lambda message: _say(quiet, message),
        warn=_warn,
        wait_for_workers=wait_for_workers,
        timeout=timeout,
        gpu=solver.device.type == "cuda",
        tls=tls,
    )
    if client is None:
        return di.SequentialInfluenceCalculator(solver, progress=not quiet), where
    return di.DaskInfluenceCalculator(solver, client, progress=not quiet), where
