"""A driver restarted by an orchestrator (issue 17, item 2): the old driver's lock is in
another process namespace (a killed pod), so its process cannot be checked and its
heartbeat must go stale first. With a wait the new driver takes the lock as soon as it is
stale instead of failing; without one it is refused, saying how to wait."""

import time

import pytest

from dask_influence.errors import StoreError
from dask_influence.storage import lock as zlock


def _foreign_lock(store, heartbeat):
    """The lock of a driver in another pid namespace (its process cannot be seen from here)."""
    info = zlock.LockInfo(
        owner="old-pod",
        hostname="old-pod",
        pid=1,
        pid_start=None,
        host_id="another-namespace",
        acquired=heartbeat,
        heartbeat=heartbeat,
        store=str(store),
    )
    assert zlock._Files(zlock.lock_path(str(store))).create(info.to_json())


def test_a_restarted_driver_waits_for_the_killed_drivers_lock_to_go_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(zlock, "STALE_SECONDS", 2.0)
    monkeypatch.setattr(zlock, "POLL_SECONDS", 0.2)
    store = tmp_path / "out.zarr"
    _foreign_lock(store, time.time())  # killed just now: the heartbeat is fresh
    with pytest.raises(StoreError, match=r"being written by another job: host old-pod.*wait_for_lock=SECONDS waits"):
        zlock.StoreLock(store).acquire()
    began = time.monotonic()
    with zlock.StoreLock(store, wait_seconds=30) as held:
        waited = time.monotonic() - began
        assert 1.0 < waited < 10.0  # taken once the heartbeat was 2 s old, not after the 30 s
        assert "its last heartbeat was" in held.broken
        assert zlock.read_lock(store).owner == held.info.owner


def test_a_live_lock_is_refused_after_the_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(zlock, "POLL_SECONDS", 0.1)
    store = tmp_path / "out.zarr"
    with zlock.StoreLock(store):  # a live job of this process keeps its heartbeat fresh
        began = time.monotonic()
        with pytest.raises(StoreError, match=r"waited 0.5 s for it"):
            zlock.StoreLock(store, wait_seconds=0.5).acquire()
        assert 0.4 < time.monotonic() - began < 5
    with pytest.raises(ValueError, match="wait_seconds must be >= 0"):
        zlock.StoreLock(store, wait_seconds=-1)
