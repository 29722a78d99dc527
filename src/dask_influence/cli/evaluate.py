"""``dask-influence evaluate JOB.toml``: score a job's influences against retraining.

Steps: read the job file and its ``[evaluate]`` section, call the ``[model]`` factory (the
trained model, the loss or ``[task]``, the datasets), import the train function
(``[evaluate] retrain``), then run each of ``[evaluate] methods`` on the store
(``[evaluate] store``, default ``[output] store``), which must be complete:

- ``lds``: retrain on ``n_subsets`` random subsets (``seeds`` each), one task per run on the
  cluster, and print the mean LDS with its bootstrap interval;
- ``loo``: retrain without each of ``points`` and print the Pearson correlation;
- ``mislabel``: the AUC of finding ``corrupted`` by mean influence (and self-influence when
  the store has it).

Every finished retraining is written to the store's ``evaluation/<method>`` group at once;
running the command again retrains only the runs that are missing (``--overwrite`` starts
afresh). Where the runs go follows ``run``: ``--scheduler``, ``[cluster] scheduler``,
``DASK_SCHEDULER_ADDRESS``, ``[cluster] sequential`` (this process), else an embedded
``LocalCluster``.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from ..errors import JobFileError
from .cluster_options import tls_from_options, tls_options
from .options import BREAK_LOCK, JOB_ARGUMENT, SCHEDULER, TRACEBACK, WAIT_FOR_LOCK


@click.command()
@JOB_ARGUMENT
@SCHEDULER
@tls_options
@click.option("--overwrite", is_flag=True, help="Discard the recorded retrainings of this evaluation and start afresh.")
@BREAK_LOCK
@WAIT_FOR_LOCK
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but the results and errors.")
@TRACEBACK
def evaluate(
    job_file: Path,
    scheduler: str | None,
    tls_ca_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    overwrite: bool,
    break_lock: bool,
    wait_for_lock: float,
    quiet: bool,
    traceback: bool,
) -> None:
    """Evaluate the influences of JOB.toml's store against retraining ([evaluate] section).

    Writes the runs and results to the store's evaluation/ group (`inspect` shows them,
    `plot --evaluation lds` draws them); an interrupted evaluation, run again, retrains
    only what is missing (SIGTERM and Ctrl-C end it with one line saying so, exit code 130,
    the store's lock released). See docs/evaluation.md.
    """
    from .run import interrupts_say_how_to_resume, user_errors

    hint = (
        "Every finished retraining is recorded in the store: rerun "
        f"(dask-influence evaluate {job_file}) to retrain only the missing runs."
    )
    with interrupts_say_how_to_resume(hint), user_errors(traceback):
        lines = evaluate_job(
            job_file,
            scheduler=scheduler,
            overwrite=overwrite,
            quiet=quiet,
            break_lock=break_lock,
            wait_for_lock=wait_for_lock,
            tls=tls_from_options(tls_ca_file, tls_cert, tls_key),
        )
    for line in lines:
        click.echo(line)


def evaluate_job(
    job_file: str | os.PathLike,
    *,
    scheduler: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    tls: Any = None,
    break_lock: bool = False,
    wait_for_lock: float = 0.0,
) -> list[str]:
    """Run the ``[evaluate]`` section of a job file; returns the result lines. Errors propagate.

    ``wait_for_lock``: seconds to wait for a live job's lock of the store (a driver restarted
    in a new process namespace); ``break_lock``: remove any lock of the store first.

    ``tls``: the certificates of ``--tls-*`` (:class:`~dask_influence.mapping.security.TlsFiles`), if any."""
    from .. import evaluate as ev
    from ..job.cluster import job_model
    from ..jobfile import load_factory, load_job, load_problem
    from .run import _progress_lines

    start = time.perf_counter()
    _progress_lines(quiet)
    job = load_job(job_file)
    section = job.evaluate
    if section is None:
        raise JobFileError(
            'the job file has no [evaluate] section; add one, e.g. [evaluate] train = "retrain:train".',
            path=str(job_file),
        )
    store = section.store or job.output.store
    scores = ev.StoreScores(store)  # a complete store of mode "up", before anything is trained
    if {"lds", "loo"} & set(section.methods):  # they record their runs in the store, under its lock
        from ..storage.lock import await_lock

        removed = await_lock(store, wait_seconds=wait_for_lock, break_lock=break_lock)
        if removed:
            _say(quiet, f"Removed the lock of {store} held by {removed}.")
    problem = load_problem(job)
    model = job_model(job, problem)
    train_fn = load_factory(job, section.retrain, "evaluate")
    _send_by_value(train_fn, job.model.path)
    train: Any = functools.partial(train_fn, **section.options) if section.options else train_fn
    common = {"retrain": train, "test": problem.test, "task": problem.loss, "model": model, "seed": section.seed}
    lines: list[str] = []
    with ExitStack() as stack:
        client, where = (False, "in this process")
        if {"lds", "loo"} & set(section.methods):
            client, where = _client(job, scheduler, stack, tls)
        _say(quiet, f"Evaluating {store} ({', '.join(section.methods)}) {where}...")
        if "lds" in section.methods:
            r = ev.lds(
                scores,
                n_subsets=section.n_subsets,
                fraction=section.fraction,
                seeds=section.seeds,
                overwrite=overwrite,
                client=client,
                gpu=job.cluster.gpu,
                confidence=section.confidence,
                n_bootstrap=section.n_bootstrap,
                **common,
            )
            lines.append(
                f"LDS: mean {r.mean:.4f}, {section.confidence:.0%} interval [{r.interval[0]:.4f}, "
                f"{r.interval[1]:.4f}] over {r.per_test.size:,} test points ({section.n_subsets} subsets of "
                f"{section.fraction:g} x {section.seeds} seed(s); {r.retrained} retrained, {r.skipped} already done)"
            )
        if "loo" in section.methods:
            points: Any
            if isinstance(section.points, int):
                points = ev.random_points(scores.n_train, min(section.points, scores.n_train), seed=section.seed)
            else:
                points = list(section.points)
            loo_result = ev.loo(
                scores,
                points=points,
                warm_start=section.warm_start,
                seeds=section.seeds,
                overwrite=overwrite,
                client=client,
                gpu=job.cluster.gpu,
                **common,
            )
            summary = loo_result.summary()
            lines.append(
                f"LOO: Pearson {loo_result.pearson:.4f} (per test point, mean {summary['pearson_per_test_mean']:.4f}) "
                f"over {loo_result.points.size:,} left-out points x {loo_result.base.size:,} test points "
                f"({loo_result.retrained} retrained, {loo_result.skipped} already done)"
            )
        if "mislabel" in section.methods:
            aucs = ev.mislabel_detection(list(section.corrupted), scores=scores)
            _record_mislabel(store, aucs, section.corrupted)
            lines.append(
                "Mislabel detection AUC: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in aucs.items())
            )
    _say(quiet, f"Evaluated in {time.perf_counter() - start:.1f} s; results in {store}/evaluation.")
    return lines


def _record_mislabel(store: str, aucs: dict[str, float], corrupted: tuple[int, ...]) -> None:
    """The mislabel AUCs as an evaluation group without runs (``evaluation/mislabel``)."""
    import datetime as _dt

    import numpy as np
    import zarr

    from ..evaluate.records import ATTR, GROUP, write_array

    group: Any = zarr.open_group(store, mode="a").require_group(GROUP).create_group("mislabel", overwrite=True)
    write_array(group, "corrupted", np.asarray(corrupted, dtype=np.int64))
    group.attrs[ATTR] = {
        "kind": "mislabel",
        "config": {"corrupted": len(corrupted)},
        "result": {f"auc_{k}": v for k, v in aucs.items()},
        "computed": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }


def _send_by_value(fn: Any, paths: tuple[str, ...]) -> None:
    """Pickle the train function's module by value when it lives in the job's ``[model] path``.

    The workers then need not import it (they may not have the job's directory on their path).
    """
    import sys

    import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    where = os.path.realpath(getattr(module, "__file__", "") or "")
    if module is not None and where and any(where.startswith(os.path.realpath(p) + os.sep) for p in paths):
        cloudpickle.register_pickle_by_value(module)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def _client(job: Any, scheduler: str | None, stack: ExitStack, tls: Any = None) -> tuple[Any, str]:
    """The client the runs go to (``None``: this process) and where that is, as ``run`` resolves it."""
    from ..job.cluster import connect_scheduler, refuse_tls_without_scheduler, scheduler_address
    from .run import _warn

    address, source = scheduler_address(job, scheduler)
    if address:
        return connect_scheduler(job, address, source, tls, stack, warn=_warn), f"on the scheduler at {address}"
    refuse_tls_without_scheduler(job, tls)
    if job.cluster.sequential:
        return False, "in this process (sequential)"
    from ..job.cluster import start_embedded_cluster

    return start_embedded_cluster(job.cluster, gpu=job.cluster.gpu, stack=stack)
