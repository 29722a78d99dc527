"""The ownership marker of a store being written: ``<store>.lock``, a JSON file NEXT TO the store.

A job that writes a store (``influences_to_zarr``) holds its lock from before the store is
created or opened until it is marked complete, and removes it on success and on failure.
A second job pointed at the same store is refused with a :class:`StoreError` that names the
holder (host, process id, owner id) and since when it holds the lock.

The file sits beside the store (``out.zarr.lock`` for ``out.zarr``), not inside it, because
``overwrite=True`` deletes the store's directory, and because it must exist before the store
does. It holds::

    {"owner": "<hostname>:<pid>:<uuid4>", "hostname": ..., "pid": ..., "pid_start": ...,
     "host_id": ..., "acquired": <unix time>, "heartbeat": <unix time>, "store": ...}

While the job runs, a daemon thread of the driving process rewrites ``heartbeat`` every
:data:`HEARTBEAT_SECONDS`. A lock is **stale**, and is removed by the next job that wants the
store (with a warning), when

- its heartbeat is older than :data:`STALE_SECONDS` (the driver died, hung, or lost the
  filesystem), or
- its owner ran on this host (same hostname, boot id and process namespace) and that process
  is gone (a killed driver is detected at once, without waiting for the timeout); the
  process start time recorded in the lock guards against a reused process id.

``break_lock=True`` (``--break-lock`` on the command line) removes any lock, live or not:
use it only when you know the other job is gone. Deleting ``out.zarr.lock`` by hand does
the same.

Creating the lock is atomic on a local or network POSIX filesystem (``O_CREAT | O_EXCL``).
On fsspec URLs (object stores) it is a check-then-write, best effort. Two jobs that break the
same stale lock at the same instant can both proceed; the one whose lock was replaced
notices at its next heartbeat (or at the end) and fails without marking the store complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import StoreError
from . import urls

logger = logging.getLogger("dask_influence")

HEARTBEAT_SECONDS = 10.0
"""How often the driver refreshes the heartbeat of the lock it holds."""
STALE_SECONDS = 60.0
"""A lock whose heartbeat is older than this is stale."""
SUFFIX = ".lock"
POLL_SECONDS = 2.0
"""How often a job waiting for a lock (``wait_seconds``) looks at it again."""


def lock_path(store: str | os.PathLike) -> str:
    """The lock file of a store: the store's path with ``.lock`` appended."""
    return urls.with_suffix(store, SUFFIX)


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux ``/proc``), to tell a reused process id apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat; fields[0] is field 3 (the state)
    except (OSError, IndexError):
        return None


def _host_id() -> str:
    """This host's identity for process checks: hostname, boot id and process namespace."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "|".join(parts)


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start``, if known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    except OSError:
        return True  # cannot tell: assume alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False  # a zombie: dead, not yet reaped by its parent
    except (OSError, IndexError):
        pass
    now = _process_start(pid)
    return not (start and now and start != now)


@dataclass
class LockInfo:
    """The content of a lock file."""

    owner: str
    hostname: str
    pid: int
    pid_start: str | None
    host_id: str
    acquired: float
    heartbeat: float
    store: str
    unreadable: bool = False  # the file exists but does not parse (a crash while creating it)

    @classmethod
    def new(cls, store: str) -> LockInfo:
        """The lock of this process for ``store``, acquired and beating now."""
        now = time.time()
        pid = os.getpid()
        host = socket.gethostname()
        return cls(
            owner=f"{host}:{pid}:{uuid.uuid4().hex}",
            hostname=host,
            pid=pid,
            pid_start=_process_start(pid),
            host_id=_host_id(),
            acquired=now,
            heartbeat=now,
            store=store,
        )

    def to_json(self) -> str:
        """The content of the lock file (with readable UTC times added)."""
        d = asdict(self)
        d.pop("unreadable")
        d["acquired_utc"], d["heartbeat_utc"] = _iso(self.acquired), _iso(self.heartbeat)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, mtime: float, store: str) -> LockInfo:
        """Parse a lock file; one that does not parse is ``unreadable``, timed by its ``mtime``."""
        try:
            d = json.loads(text)
            return cls(
                owner=str(d["owner"]),
                hostname=str(d["hostname"]),
                pid=int(d["pid"]),
                pid_start=d.get("pid_start"),
                host_id=str(d.get("host_id", "")),
                acquired=float(d["acquired"]),
                heartbeat=float(d["heartbeat"]),
                store=store,
            )
        except (ValueError, KeyError, TypeError):
            return cls(
                owner="?",
                hostname="?",
                pid=-1,
                pid_start=None,
                host_id="",
                acquired=mtime,
                heartbeat=mtime,
                store=store,
                unreadable=True,
            )

    def stale_reason(self, now: float | None = None, stale_after: float | None = None) -> str | None:
        """Why this lock is stale, or ``None`` while its owner may still be writing."""
        now = time.time() if now is None else now
        stale_after = STALE_SECONDS if stale_after is None else stale_after
        if not self.unreadable and self.host_id == _host_id() and not _pid_alive(self.pid, self.pid_start):
            return f"its process {self.pid} on this host ({self.hostname}) is gone"
        age = now - self.heartbeat
        if age > stale_after:
            return f"its last heartbeat was {age:.0f} s ago (stale after {stale_after:.0f} s)"
        return None

    def describe(self, now: float | None = None) -> str:
        """Who holds the lock and since when, for error messages."""
        now = time.time() if now is None else now
        if self.unreadable:
            return f"an unreadable lock file, last modified {now - self.heartbeat:.0f} s ago"
        return (
            f"host {self.hostname}, pid {self.pid} (owner {self.owner}), since {_iso(self.acquired)}, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago"
        )

    def status(self, now: float | None = None) -> dict:
        """A JSON-ready summary (for ``inspect``)."""
        now = time.time() if now is None else now
        reason = self.stale_reason(now)
        return {
            "owner": self.owner,
            "hostname": self.hostname,
            "pid": self.pid,
            "acquired": _iso(self.acquired),
            "heartbeat": _iso(self.heartbeat),
            "heartbeat_age_s": round(now - self.heartbeat, 1),
            "stale": reason is not None,
            "stale_reason": reason,
            "unreadable": self.unreadable,
        }


# -- file access: the local filesystem (atomic create), or fsspec for URLs (see .urls) ------


class _Files:
    """The lock file at ``path``: read, create exclusively, replace, remove (local or fsspec)."""

    def __init__(self, path: str):
        self.path = path
        self.url = urls.is_url(path)

    def read(self) -> tuple[str, float] | None:
        """The text and modification time of the file, or ``None`` if there is none."""
        found = urls.read_file(self.path)
        return None if found is None else (found[0].decode("utf-8", "replace"), found[1])

    def create(self, text: str) -> bool:
        """Create the file with ``text`` if it does not exist; False if it exists."""
        return urls.create_new(self.path, text.encode("utf-8"))

    def replace(self, text: str) -> None:
        urls.replace_atomically(self.path, text.encode("utf-8"))

    def remove(self) -> None:
        urls.remove(self.path)


def read_lock(store: str | os.PathLike) -> LockInfo | None:
    """The lock of a store, or ``None`` when nobody holds it."""
    store = os.fspath(store)
    found = _Files(lock_path(store)).read()
    return None if found is None else LockInfo.from_json(found[0], found[1], store)


def _refusal(store: str, info: LockInfo, waited: float = 0.0) -> StoreError:
    waited_text = f" (waited {waited:g} s for it)" if waited else ""
    return StoreError(
        f"The store {store!r} is being written by another job{waited_text}: {info.describe()} (lock file "
        f"{lock_path(store)!r}). Wait for that job to finish (wait_for_lock=SECONDS waits for it), or, if it "
        "is gone, pass break_lock=True. "
        f"A lock is stale, and removed by the next job, once its heartbeat is older than "
        f"{STALE_SECONDS:.0f} s or its process is gone on the same host."
    )


def check_lock(store: str | os.PathLike, *, break_lock: bool = False, wait_seconds: float = 0.0) -> None:
    """Raise :class:`StoreError` if a live job holds the store's lock (without taking it); a job
    that will wait for the lock (``wait_seconds > 0``) is not refused here."""
    store = os.fspath(store)
    info = read_lock(store)
    if info is not None and not break_lock and not wait_seconds and info.stale_reason() is None:
        raise _refusal(store, info)


def await_lock(store: str | os.PathLike, *, wait_seconds: float = 0.0, break_lock: bool = False) -> str | None:
    """Before a command writes ``store``: wait up to ``wait_seconds`` (polling every
    :data:`POLL_SECONDS`) until no live job holds its lock, without taking it (a stale lock is
    left for :class:`StoreLock` to remove, with its warning). With ``break_lock`` any lock is
    removed at once.

    For commands whose library call takes the lock without a wait of its own (``dask-influence
    index``, ``query``, ``evaluate``): a driver restarted in a new process namespace gets the
    killed driver's lock once its heartbeat is stale instead of being refused.

    Returns:
        the holder and reason of a lock removed by ``break_lock``, else ``None``.

    Raises:
        StoreError: a live job still holds the lock after the wait.
    """
    store = os.fspath(store)
    if not wait_seconds >= 0:
        raise ValueError(f"wait_seconds must be >= 0; got {wait_seconds!r}.")
    deadline = time.monotonic() + wait_seconds
    while True:
        info = read_lock(store)
        if info is None:
            return None
        if break_lock:
            _Files(lock_path(store)).remove()
            removed = f"{info.describe()}: break_lock=True"
            logger.warning("Removed the lock of %r held by %s.", store, removed)
            return removed
        if info.stale_reason() is not None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _refusal(store, info, waited=wait_seconds)
        logger.info("Waiting for the lock of %r (held by %s).", store, info.describe())
        time.sleep(min(POLL_SECONDS, remaining))


class StoreLock:
    """Hold the lock of ``store`` for a ``with`` block (see the module docstring).

    Attributes:
        info: the lock written by this job.
        broken: what was removed on acquiring (a stale lock, or any with ``break_lock``), or ``None``.
        lost: the lock found in place of ours by a heartbeat, if another job replaced it.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        *,
        break_lock: bool = False,
        heartbeat_seconds: float | None = None,
        wait_seconds: float = 0.0,
    ):
        self.store = os.fspath(store)
        self.break_lock = bool(break_lock)
        self.wait_seconds = float(wait_seconds)
        if not self.wait_seconds >= 0:
            raise ValueError(f"wait_seconds must be >= 0; got {wait_seconds!r}.")
        self.heartbeat_seconds = HEARTBEAT_SECONDS if heartbeat_seconds is None else heartbeat_seconds
        self.files = _Files(lock_path(self.store))
        self.info = LockInfo.new(self.store)
        self.broken: str | None = None
        self.lost: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    def acquire(self) -> StoreLock:
        """Take the lock (removing a stale one, or any with ``break_lock``) and start the heartbeat.

        A lock held by a live job is waited for up to ``wait_seconds`` (polling every few
        seconds): a driver restarted by an orchestrator (a Kubernetes pod in a new process
        namespace, which cannot see whether the old driver's process is gone) takes the lock
        once the old heartbeat goes stale, instead of failing.
        """
        deadline = time.monotonic() + self.wait_seconds
        removals = 0
        while removals < 5:
            try:
                created = self.files.create(self.info.to_json())
            except OSError as err:
                where = os.path.dirname(os.path.abspath(self.store)) if not self.files.url else self.store
                raise StoreError(
                    f"Cannot write the output store {self.store!r}: creating its lock file in {where!r} "
                    f"failed ({err.strerror or err}). Choose a directory you can write to."
                ) from None
            if created:
                self._held = True
                self._start_heartbeat()
                return self
            found = read_lock(self.store)
            if found is None:
                continue  # released meanwhile
            reason = found.stale_reason()
            if reason is None and not self.break_lock:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _refusal(self.store, found, waited=self.wait_seconds)
                logger.info("Waiting for the lock of %r (held by %s).", self.store, found.describe())
                time.sleep(min(POLL_SECONDS, remaining))
                continue
            removals += 1
            why = reason or "break_lock=True"
            self.broken = f"{found.describe()}: {why}"
            logger.warning("Removed the lock of %r held by %s.", self.store, self.broken)
            self.files.remove()
        raise StoreError(f"Could not take the lock of {self.store!r}: other jobs keep taking it.")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"dask-influence-lock-{self.info.pid}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self._still_ours():
                    return
                self.info.heartbeat = time.time()
                self.files.replace(self.info.to_json())
            except Exception as err:  # a transient filesystem error: try again at the next beat
                logger.warning("Could not refresh the lock of %r: %s", self.store, err)

    def _still_ours(self) -> bool:
        found = self.files.read()
        current = None if found is None else LockInfo.from_json(found[0], found[1], self.store)
        if current is None or current.owner != self.info.owner:
            self.lost = current or LockInfo.from_json("", time.time(), self.store)
            return False
        return True

    def ensure_held(self) -> None:
        """Raise :class:`StoreError` if another job took the lock while this one ran."""
        if self.lost is not None or not self._still_ours():
            assert self.lost is not None
            who = "nobody: the lock file was deleted or overwritten" if self.lost.unreadable else self.lost.describe()
            raise StoreError(
                f"The lock of {self.store!r} was taken from this job while it ran (now held by {who}); "
                "the store is not marked complete. Make sure one job at a time writes it, then rerun "
                "with resume=True."
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._held:
            try:
                if self._still_ours():
                    self.files.remove()
            except OSError as err:
                logger.warning("Could not remove the lock file of %r: %s", self.store, err)
            self._held = False

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
