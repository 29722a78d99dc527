"""Completion of a store: which chunks are done, read in O(1) requests, and the ``complete`` attribute.

Three records say that a chunk is done, from the cheapest to the truth:

- the **manifest** (:mod:`.manifest`): every chunk's state in one small record, written by
  the driver as chunks finish (batched) and at the end of a run;
- the **listing** of the done-flag files (one listing per flag array): a flag equal to 0
  has no file (zarr does not store chunks equal to the fill value), so a chunk without one
  is not done, whatever the manifest says;
- the **done flags** themselves (one int8 file per chunk, written by the worker after the
  chunk): read only for the chunks that have a flag file but that the manifest does not
  mark done with the current fit; all of them when there is no usable manifest (a store of
  an earlier version, a damaged or foreign manifest).

A chunk is done when its value (the manifest's, else its flag's) is the flag value of the
store's current fit generation (:mod:`.fits`). So a command reads one manifest, lists the
flags once and reads O(missing) flags; a complete store with its manifest costs no flag
reads. A flag file whose own chunk does not decode counts as not done when it is read; a
damaged flag of a chunk the manifest marks done is found by verification (:mod:`.verify`).

The store counts as complete only when its attribute ``complete`` says so AND every chunk is
done with the current fit.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import StoreError
from .chunkfiles import list_chunks, present_mask, read_chunks
from .fits import current_value, fit_record
from .layout import ATTR, FLAG_ARRAYS
from .manifest import Manifest, read_manifest, write_manifest


@dataclass
class CompletionState:
    """The done state of every tracked chunk of a store, as one command reads it.

    Attributes:
        current: the flag value of the store's current fit generation.
        generation: that generation.
        values: per tracked array (``influences``, ``self_influences``, ``top_k``), the flag
            value of each chunk (uint8, shaped like its flag array; 0: not done).
        unreadable: per tracked array, the flags read whose own chunk does not decode.
        manifest: ``"ok"``, ``"absent"``, ``"damaged: ..."`` or ``"not used"``.
        flags_read: done flags read (the manifest spares the others).
        disagreed: chunks on which the manifest and the flags disagreed (the flags won).
        seconds: time to read the state.
    """

    current: int
    generation: int
    values: dict[str, np.ndarray] = field(default_factory=dict)
    unreadable: dict[str, list] = field(default_factory=dict)
    manifest: str = "absent"
    flags_read: int = 0
    disagreed: int = 0
    seconds: float = 0.0

    def done(self, kind: str) -> np.ndarray:
        """Boolean mask of the chunks of ``kind`` done with the current fit."""
        return self.values[kind] == self.current

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{array: (done, total)}`` for every tracked array of the store."""
        return {kind: (int(self.done(kind).sum()), int(v.size)) for kind, v in self.values.items()}

    def all_done(self) -> bool:
        """Every chunk of every tracked array is done with the current fit."""
        return all(d == t for d, t in self.counts().values())

    @property
    def stale(self) -> bool:
        """The manifest is missing, damaged or disagreed with the flags: it should be rewritten."""
        return self.manifest != "ok" or self.disagreed > 0 or any(self.unreadable.values())

    def mark(self, kind: str, coords: Any) -> None:
        """Record chunk ``coords`` of ``kind`` as done with the current fit."""
        self.values[kind][_index(coords)] = self.current

    def clear(self, kind: str, coords: Any) -> None:
        """Record chunk ``coords`` of ``kind`` as not done."""
        self.values[kind][_index(coords)] = 0

    def to_manifest(self, *, final: bool) -> Manifest:
        """The manifest of this state."""
        return Manifest({k: v.copy() for k, v in self.values.items()}, self.generation, final)

    def as_dict(self) -> dict:
        """How the state was read, JSON-ready (``inspect --json``, ``last_run_``)."""
        return {
            "manifest": self.manifest,
            "flags_read": self.flags_read,
            "disagreed": self.disagreed,
            "generation": self.generation,
            "seconds": round(self.seconds, 3),
        }


def _index(coords: Any) -> tuple[int, ...]:
    return tuple(int(c) for c in coords) if isinstance(coords, (tuple, list)) else (int(coords),)


def load_state(group: Any, *, use_manifest: bool = True, threads: int = 8) -> CompletionState:
    """Read the done state of every tracked chunk (see the module docstring for what is read)."""
    start = time.perf_counter()
    attrs = group.attrs[ATTR]
    state = CompletionState(current=current_value(attrs), generation=int(fit_record(attrs)["generation"]))
    manifest, state.manifest = read_manifest(group) if use_manifest else (None, "not used")
    for kind, name in FLAG_ARRAYS:
        if name not in group:
            continue
        flags = group[name]
        shape = tuple(int(s) for s in flags.shape)
        values = np.zeros(shape, dtype=np.uint8)
        known = manifest.values.get(kind) if manifest is not None else None
        if known is not None and known.shape == shape:
            values[...] = known
        elif manifest is not None:
            state.manifest = f"damaged: its {kind} entry has another shape"
        has_file = present_mask(flags, shape)
        if has_file is not None:
            gone = (values != 0) & ~has_file
            state.disagreed += int(gone.sum())
            values[gone] = 0
            to_read = has_file & (values != state.current)
        else:
            to_read = values != state.current
        bad: list = []
        for coords, data in read_chunks(flags, zip(*np.nonzero(to_read)), threads=threads):
            state.flags_read += 1
            if isinstance(data, np.ndarray):
                value = int(data.reshape(-1)[0]) if data.size else 0
                value = value if 0 < value < 256 else 0
                if value == state.current and values[coords] != value and manifest is not None:
                    state.disagreed += 1
                values[coords] = value
            else:
                values[coords] = 0
                if data is not None:
                    bad.append(coords)
        state.values[kind] = values
        state.unreadable[kind] = bad
    state.seconds = time.perf_counter() - start
    return state


class CompletionRecorder:
    """The driver's record of finished chunks: updates a state and writes its manifest, batched.

    :meth:`record` is called as write tasks finish; the manifest is written at most every
    ``every_seconds`` (and by :meth:`flush`, at the start and end of a run), so a job of
    hundreds of tasks per second writes it a few times per second at most.
    """

    def __init__(self, group: Any, state: CompletionState, *, every_seconds: float = 2.0):
        self.group = group
        self.state = state
        self.every_seconds = every_seconds
        self.writes = 0
        self._dirty = False
        self._last = time.monotonic()

    def record(self, entries: list[tuple[str, Any]]) -> None:
        """Mark ``(kind, coords)`` entries done with the current fit; write the manifest if due."""
        for kind, coords in entries:
            self.state.mark(kind, coords)
        self._dirty = self._dirty or bool(entries)
        if self._dirty and time.monotonic() - self._last >= self.every_seconds:
            self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        """Write the manifest now (``final``: every task of the run has finished)."""
        write_manifest(self.group, self.state.to_manifest(final=final))
        self.writes += 1
        self._dirty = False
        self._last = time.monotonic()


def completion(group: Any, state: CompletionState | None = None) -> dict[str, tuple[int, int]]:
    """``{array: (done, total)}`` for every tracked array of the store."""
    return (state or load_state(group)).counts()


def read_flags(array: Any, value: int = 1) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The flags of a flag array equal to ``value`` as booleans, and the positions of unreadable flags.

    Reads every flag (fast for local stores, see :mod:`.chunkfiles`); a flag whose chunk does
    not decode (a damaged file) counts as not set. For the tracked arrays of a store use
    :func:`load_state`, which reads only what the manifest leaves open.
    """
    shape = tuple(int(s) for s in array.shape)
    flags = np.zeros(shape, dtype=bool)
    bad = []
    present = list_chunks(array)
    coords = sorted(present) if present is not None else list(np.ndindex(*shape))
    for c, data in read_chunks(array, coords):
        if isinstance(data, np.ndarray):
            flags[c] = bool(data.size and int(data.reshape(-1)[0]) == value)
        elif data is not None:
            bad.append(c)
    return flags, bad


def is_complete(group: Any, state: CompletionState | None = None) -> bool:
    """True when the store is marked complete AND every chunk is done with the current fit."""
    return bool(group.attrs.get(ATTR, {}).get("complete")) and (state or load_state(group)).all_done()


def mark_complete(group: Any, extra: dict | None = None, state: CompletionState | None = None) -> None:
    """Set ``complete`` after checking that every chunk is done; raises :class:`StoreError` otherwise.

    ``state``: the driver's state after a run (else it is read from the store).
    """
    missing = {k: v for k, v in completion(group, state).items() if v[0] != v[1]}
    if missing:
        raise StoreError(f"Cannot mark the store complete: chunks missing {missing}.")
    attrs = dict(group.attrs[ATTR])
    attrs.update(extra or {})
    attrs["complete"] = True
    attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    group.attrs[ATTR] = attrs
