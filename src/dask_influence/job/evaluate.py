"""A job's ``[evaluate]`` section: score its influences against retraining (``dask-influence
evaluate``, or :func:`evaluate_job` from Python).

Steps: read the job and its ``[evaluate]`` section, call the ``[model]`` factory (the trained
model, the loss or ``[task]``, the datasets), import the train function (``[evaluate]
retrain``), then run each of ``[evaluate] methods`` on the store (``[evaluate] store``, default
``[output] store``), which must be complete:

- ``lds``: retrain on ``n_subsets`` random subsets (``seeds`` each), one task per run on the
  cluster: the mean LDS with its bootstrap interval;
- ``loo``: retrain without each of ``points``: the Pearson correlation;
- ``mislabel``: the AUC of finding ``corrupted`` by mean influence (and self-influence when
  the store has it).

Every finished retraining is written to the store's ``evaluation/<method>`` group at once;
running it again retrains only the runs that are missing (``overwrite`` starts afresh). Where
the runs go follows a run (:mod:`.cluster`), else this process when no method retrains. Nothing
here prints: the notes go to the ``dask_influence.job.evaluate`` logger, the runs to
``dask_influence.progress``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import ExitStack
from typing import Any

from ..errors import JobFileError
from .cluster import job_model
from .run import JobSource, open_job
from .sections import Job

log = logging.getLogger(__name__)


def evaluate_job(
    job: JobSource,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    tls: Any = None,
    overwrite: bool = False,
    break_lock: bool = False,
    wait_for_lock: float = 0.0,
) -> list[str]:
    """Run the job's ``[evaluate]`` section; returns the result lines (one per method). Errors propagate.

    Args:
        job, base_dir, scheduler, tls: as for :func:`~.run.run_job`.
        overwrite: discard the recorded retrainings of this evaluation and start afresh.
        wait_for_lock: seconds to wait for a live job's lock of the store (a driver restarted
            in a new process namespace); ``break_lock``: remove any lock of the store first.
    """
    from .. import evaluate as ev
    from .factory import load_factory, load_problem

    start = time.perf_counter()
    loaded, name = open_job(job, base_dir)
    section = loaded.evaluate
    if section is None:
        raise JobFileError(
            'the job file has no [evaluate] section; add one, e.g. [evaluate] train = "retrain:train".',
            path=None if name == "(dict)" else name,
        )
    store = section.store or loaded.output.store
    scores = ev.StoreScores(store)  # a complete store of mode "up", before anything is trained
    if {"lds", "loo"} & set(section.methods):  # they record their runs in the store, under its lock
        from ..storage.lock import await_lock

        removed = await_lock(store, wait_seconds=wait_for_lock, break_lock=break_lock)
        if removed:
            log.info(f"Removed the lock of {store} held by {removed}.")
    problem = load_problem(loaded)
    model = job_model(loaded, problem)
    train_fn = load_factory(loaded, section.retrain, "evaluate")
    _send_by_value(train_fn, loaded.model.path)
    train: Any = functools.partial(train_fn, **section.options) if section.options else train_fn
    common = {"retrain": train, "test": problem.test, "task": problem.loss, "model": model, "seed": section.seed}
    lines: list[str] = []
    with ExitStack() as stack:
        client, where = (False, "in this process")
        if {"lds", "loo"} & set(section.methods):
            client, where = _client(loaded, scheduler, stack, tls)
        log.info(f"Evaluating {store} ({', '.join(section.methods)}) {where}...")
        if "lds" in section.methods:
            r = ev.lds(
                scores,
                n_subsets=section.n_subsets,
                fraction=section.fraction,
                seeds=section.seeds,
                overwrite=overwrite,
                client=client,
                gpu=loaded.cluster.gpu,
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
                gpu=loaded.cluster.gpu,
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
    log.info(f"Evaluated in {time.perf_counter() - start:.1f} s; results in {store}/evaluation.")
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


def _client(job: Job, scheduler: str | None, stack: ExitStack, tls: Any = None) -> tuple[Any, str]:
    """The client the runs go to (``False``: this process) and where that is, as a run resolves it
    (without waiting for workers)."""
    from .cluster import connect_scheduler, refuse_tls_without_scheduler, scheduler_address, start_embedded_cluster

    address, source = scheduler_address(job, scheduler)
    if address:
        return connect_scheduler(job, address, source, tls, stack, warn=log.warning), f"on the scheduler at {address}"
    refuse_tls_without_scheduler(job, tls)
    if job.cluster.sequential:
        return False, "in this process (sequential)"
    return start_embedded_cluster(job.cluster, gpu=job.cluster.gpu, stack=stack)
