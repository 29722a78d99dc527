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


def _arrays_of(kind: str, extra: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays holding the tracked chunks of ``kind`` and the chunk coordinates of their
    trailing axes: chunk ``index`` of ``kind`` is chunk ``index + tail`` of each array (``extra``:
    the zeros of the feature axes of ``influences``)."""
    if kind == "influences":
        return [("influences", extra)]
    if kind == "self_influences":
        return [("self_influences", ())]
    return [(name, (0,)) for name in TOPK_ARRAYS]


def _report_key(kind: str, index: tuple[int, ...]) -> Any:
    return index if kind == "influences" else index[0]


def verify_mode(verify: Any) -> str | None:
    """A ``verify=`` argument (of ``influences_to_zarr`` and ``GradientIndex.build``) as the mode of
    :func:`verify_store`: ``True``/``"full"`` -> ``"full"``, ``"exists"``, ``False``/``None`` -> ``None``.

    Raises:
        ValueError: anything else, naming the accepted values.
    """
    if verify is True or verify == "full":
        return "full"
    if verify is False or verify is None:
        return None
    if verify == "exists":
        return "exists"
    raise ValueError(f"verify must be True, False, 'full' or 'exists'; got {verify!r}.")


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
    from .chunkfiles import present_mask, read_chunks
    from .completion import load_state
    from .layout import FLAG_ARRAYS

    if mode not in ("full", "exists"):
        raise ValueError(f"verify must be True, False, 'full' or 'exists'; got {mode!r}.")
    start = time.perf_counter()
    state = state if state is not None else load_state(group)
    report = VerifyReport(mode=mode)
    for kind, bad in state.unreadable.items():
        report.unreadable_flags[kind] = list(bad)
    flag_of = dict(FLAG_ARRAYS)
    extra = (0,) * (group["influences"].ndim - 2)
    todo: dict[str, np.ndarray] = {}  # per kind, the mask of the done chunks to check
    for kind in state.values:
        done = state.done(kind).copy()
        if mode == "full" and done.any():
            coords = [tuple(int(k) for k in c) for c in zip(*np.nonzero(done))]
            for c, data in read_chunks(group[flag_of[kind]], coords, threads=threads):
                if isinstance(data, np.ndarray) and data.size and int(data.reshape(-1)[0]) == state.current:
                    continue
                done[c] = False
                if isinstance(data, Exception):
                    report.unreadable_flags.setdefault(kind, []).append(c)
                else:  # no flag, or another fit's: the manifest was wrong
                    report.wrong_flags.setdefault(kind, []).append(c)
        todo[kind] = done

    # existence: one listing per array, compared as masks (no per-chunk Python work)
    broken: dict[str, np.ndarray] = {}
    for kind, done in todo.items():
        missing = np.zeros(done.shape, dtype=bool)
        for name, tail in _arrays_of(kind, extra):
            present = present_mask(group[name], done.shape, tail)
            if present is not None:
                missing |= done & ~present
        broken[kind] = missing
    if mode == "full":
        for kind, done in todo.items():
            check = done & ~broken[kind]
            for name, tail in _arrays_of(kind, extra):
                coords = [tuple(int(k) for k in c) + tail for c in zip(*np.nonzero(check))]
                for c, data in read_chunks(group[name], coords, threads=threads):
                    if isinstance(data, np.ndarray):
                        report.bytes_read += data.nbytes
                    else:
                        broken[kind][c[: done.ndim]] = True
    for kind, done in todo.items():
        report.checked += int(done.sum())
        bad = [tuple(int(k) for k in c) for c in zip(*np.nonzero(broken[kind]))]
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
    from .layout import FLAG_ARRAYS

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
