"""Verification of a store before ``resume``: every flagged chunk exists and decodes.

:func:`verify_store` finds chunks whose done flag is set but whose file is missing or does
not decode (every array carries a CRC32C checksum, see :mod:`.layout`); :func:`repair` clears
their flags so that ``resume`` recomputes them. See ``docs/reliability.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import ATTR


@dataclass
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        checked: flagged chunks checked (top-k rows count once for their four arrays).
        damaged: per tracked array (``influences``, ``self_influences``, ``top_k``), the chunk
            coordinates whose flag is set but whose file is missing or does not decode.
        unreadable_flags: per tracked array, the flags whose own chunk does not decode.
        wrong_flags: per tracked array, chunks the manifest marked done whose flag is missing or
            holds another fit's value (``mode="full"``; the flags win).
        bytes_read: bytes of chunk files read (0 with ``mode="exists"``).
        seconds: wall time of the verification.
    """

    mode: str = "full"
    checked: int = 0
    damaged: dict[str, list] = field(default_factory=dict)
    unreadable_flags: dict[str, list] = field(default_factory=dict)
    wrong_flags: dict[str, list] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def repaired(self) -> int:
        """Chunks found damaged (they are recomputed), not counting unreadable flags."""
        return sum(len(v) for v in self.damaged.values())

    def as_dict(self) -> dict:
        """The report as JSON-ready data (``inspect --verify``, the job's attributes)."""
        return {
            "mode": self.mode,
            "checked": self.checked,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "damaged": {
                k: [list(map(int, c)) if isinstance(c, tuple) else int(c) for c in v]
                for k, v in self.damaged.items()
                if v
            },
            "unreadable_flags": {k: [list(c) for c in v] for k, v in self.unreadable_flags.items() if v},
            "wrong_flags": {k: [list(c) for c in v] for k, v in self.wrong_flags.items() if v},
        }


TOPK_ARRAYS = [f"top_{k}_{what}" for k in ("helpful", "harmful") for what in ("indices", "values")]


def _chunk_coords(kind: str, extra: tuple[int, ...], index: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(array, chunk coordinates)`` holding tracked chunk ``index`` of ``kind`` (``extra``:
    the zeros of the feature axes of ``influences``)."""
    if kind == "influences":
        return [("influences", index + extra)]
    if kind == "self_influences":
        return [("self_influences", index)]
    return [(name, (index[0], 0)) for name in TOPK_ARRAYS]


def _report_key(kind: str, index: tuple[int, ...]) -> Any:
    return index if kind == "influences" else index[0]


def verify_store(group: Any, *, mode: str = "full", threads: int = 8, state: Any = None) -> VerifyReport:
    """Check every chunk done with the current fit: its file exists and (``mode="full"``) decodes.

    ``"full"`` also reads the done flag of each of these chunks (a flag that does not decode,
    or holds another fit's value, makes its chunk not done), then reads each chunk once
    (``threads`` at a time, on this process, directly from the files of a local store, see
    :mod:`.chunkfiles`), so it costs about one read of the store; the CRC32C checksum of each
    chunk makes a truncated or altered file fail to decode. ``"exists"`` only lists the chunk
    files (one listing per array), which finds deleted chunks but not truncated ones; the
    listing of the flags is part of reading the state. ``state``: the store's
    :class:`~.completion.CompletionState` (read if not given). Nothing is modified; see
    :func:`repair`.
    """
    from .chunkfiles import list_chunks, read_chunks
    from .completion import FLAG_ARRAYS, load_state

    if mode not in ("full", "exists"):
        raise ValueError(f"verify must be True, False, 'full' or 'exists'; got {mode!r}.")
    start = time.perf_counter()
    state = state if state is not None else load_state(group)
    report = VerifyReport(mode=mode)
    for kind, bad in state.unreadable.items():
        report.unreadable_flags[kind] = list(bad)
    flag_of = dict(FLAG_ARRAYS)
    extra = (0,) * (group["influences"].ndim - 2)
    todo: dict[str, list[tuple[int, ...]]] = {}
    for kind in state.values:
        done = [tuple(int(k) for k in c) for c in zip(*np.nonzero(state.done(kind)))]
        if mode == "full" and done:
            good = []
            for c, data in read_chunks(group[flag_of[kind]], done, threads=threads):
                if isinstance(data, np.ndarray) and data.size and int(data.reshape(-1)[0]) == state.current:
                    good.append(c)
                elif isinstance(data, Exception):
                    report.unreadable_flags.setdefault(kind, []).append(c)
                else:  # no flag, or another fit's: the manifest was wrong
                    report.wrong_flags.setdefault(kind, []).append(c)
            done = good
        todo[kind] = done

    present: dict[str, set | None] = {}
    broken: dict[str, set[tuple[int, ...]]] = {}
    for kind, done in todo.items():
        for index in done:
            for name, coords in _chunk_coords(kind, extra, index):
                if name not in present:
                    present[name] = list_chunks(group[name])
                files = present[name]
                if files is not None and coords not in files:
                    broken.setdefault(kind, set()).add(index)
    if mode == "full":
        for kind, done in todo.items():
            parts: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
            for index in done:
                if index in broken.get(kind, ()):
                    continue
                for name, coords in _chunk_coords(kind, extra, index):
                    parts.setdefault(name, []).append((index, coords))
            for name, items in parts.items():
                owner = dict((coords, index) for index, coords in items)
                for coords, data in read_chunks(group[name], [c for _, c in items], threads=threads):
                    if isinstance(data, np.ndarray):
                        report.bytes_read += data.nbytes
                    else:
                        broken.setdefault(kind, set()).add(owner[coords])
    for kind, done in todo.items():
        report.checked += len(done)
        bad = sorted(broken.get(kind, ()))
        if bad:
            report.damaged[kind] = [_report_key(kind, c) for c in bad]
    for kind in list(report.unreadable_flags):
        report.unreadable_flags[kind] = sorted(report.unreadable_flags[kind])
    report.seconds = time.perf_counter() - start
    return report


def repair(group: Any, report: VerifyReport, state: Any = None) -> None:
    """Clear the flags of the damaged chunks (and rewrite unreadable flags as 0) so that they
    are recomputed, record them as not done in ``state``, and mark the store incomplete if
    anything was found. The caller rewrites the manifest from ``state``."""
    from .completion import FLAG_ARRAYS

    flag_of = dict(FLAG_ARRAYS)
    found = False
    for source in (report.damaged, report.unreadable_flags, report.wrong_flags):
        for kind, coords in source.items():
            for c in coords:
                index = c if isinstance(c, tuple) else (c,)
                if source is not report.wrong_flags:
                    group[flag_of[kind]][index] = 0
                if state is not None:
                    state.clear(kind, index)
                found = True
    if found and group.attrs[ATTR].get("complete"):
        attrs = dict(group.attrs[ATTR])
        attrs["complete"] = False
        attrs.pop("completed", None)
        group.attrs[ATTR] = attrs
