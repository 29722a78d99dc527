"""The embedded cluster's workers start with glibc's dynamic malloc thresholds: Dask's default
``MALLOC_TRIM_THRESHOLD_=65536`` (which turns them off, so every allocation above 128 KiB is mapped and
faulted afresh) is left out of their environment; a value the user configured is kept."""

import os

import dask
import distributed  # noqa: F401  (its configuration)

from dask_influence.mapping.clients import DASK_MALLOC_TRIM, glibc_dynamic_malloc, local_cluster


def _trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_embedded_workers_start_without_dasks_malloc_trim_threshold(monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # an earlier nanny in this process sets it here
    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"] == DASK_MALLOC_TRIM
    with local_cluster(1, host="127.0.0.1") as client:
        assert list(client.run(_trim_threshold).values()) == [None]
    assert _trim_threshold() is None  # nor did the nanny set it in this process
    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"] == DASK_MALLOC_TRIM


def test_a_configured_trim_threshold_is_kept():
    key = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({f"{key}.MALLOC_TRIM_THRESHOLD_": 1234}), glibc_dynamic_malloc():
        assert dask.config.get(key)["MALLOC_TRIM_THRESHOLD_"] == 1234
    with glibc_dynamic_malloc():
        assert "MALLOC_TRIM_THRESHOLD_" not in dask.config.get(key)
        assert dask.config.get(key)["OMP_NUM_THREADS"] == 1  # the others stay
