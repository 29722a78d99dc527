"""The records of an evaluation that retrains (:mod:`.lds`, :mod:`.loo`), set up one way.

:func:`evaluation_records` takes the store's lock and opens the evaluation's records
(:func:`~.records.open_records`: ``<store>/evaluation/<name>``, or memory without a store)
with the configuration every retraining evaluation records (sizes, seeds, the train
function's and task's names, a checksum of the test data) and the evaluation's own entries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .records import MemoryRecords, ZarrRecords, open_records, store_lock
from .retrain import Retraining, function_name, test_checksum


def check_test_count(test: Any, n_test: int) -> int:
    """The number of test points of ``test``; ``ValueError`` unless it is ``n_test`` (the score rows)."""
    from ..core import batches

    n = batches.size(test)
    if n != n_test:
        raise ValueError(
            f"test has {n} points but scores have {n_test} rows; pass the test points the scores were computed for."
        )
    return n


@contextmanager
def evaluation_records(
    source: Any,
    retraining: Retraining,
    runs: Sequence[tuple[np.ndarray, int]],
    *,
    store: Any,
    name: str,
    kind: str,
    overwrite: bool,
    train: Any,
    seed: int,
    train_seeds: list[int],
    config: dict[str, Any],
    static: dict[str, np.ndarray],
    labels: list[str] | None = None,
) -> Iterator[MemoryRecords | ZarrRecords]:
    """The records of evaluation ``name`` (``kind``) of the scores ``source`` (``(n_test, n_train)``),
    held under the store's lock (as ``run`` takes it) for the block.

    Args:
        runs: the retrainings ``(train_indices, seed)``; the records hold ``(len(runs), n_test)``
            measurements.
        store: the store that records them (``None``: the store of ``source``, else memory).
        train, seed, train_seeds: the train function, the evaluation's seed and the training
            seeds drawn from it (recorded in the configuration).
        config: the evaluation's own configuration entries (e.g. its subsets' parameters).
        static: its arrays written once with a new group (e.g. ``subsets``); rewritten if they
            no longer decode.
        labels: each run as messages name it (e.g. ``"subset 3 of 50 (40 training points),
            training seed 7"``).
    """
    where = store if store is not None else source.store
    full_config = {
        "n_train": source.n_train,
        "n_test": source.n_test,
        **config,
        "seeds": len(train_seeds),
        "seed": seed,
        "training_seeds": train_seeds,
        "train": function_name(train),
        "task": retraining.task.describe(),
        "test_checksum": test_checksum(retraining.test),
    }
    with store_lock(where):
        yield open_records(
            where,
            name,
            kind=kind,
            config=full_config,
            n_runs=len(runs),
            n_test=source.n_test,
            overwrite=overwrite,
            static=static,
            labels=labels,
        )
