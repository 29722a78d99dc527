"""Verification of a store before ``resume``: every flagged chunk exists and decodes.

:func:`verify_store` finds chunks whose done flag is set but whose file is missing or does
not decode (every array carries a CRC32C checksum, see :mod:`.layout`); :func:`repair` clears
their flags so that ``resume`` recomputes them. See ``docs/reliability.md``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .completion import read_flags
from .layout import ATTR


@dataclass
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        checked: flagged chunks checked (top-k rows count once for their four arrays).
        damaged: per tracked array (``influences``, ``self_influences``, ``top_k``), the chunk
            coordinates whose flag is set but whose file is missing or does not decode.
        unreadable_flags: per tracked array, the flags whose own chunk does not decode.
        bytes_read: bytes of chunk files read (0 with ``mode="exists"``).
        seconds: wall time of the verification.
    """

    mode: str = "full"
    checked: int = 0
    damaged: dict[str, list] = field(default_factory=dict)
    unreadable_flags: dict[str, list] = field(default_factory=dict)
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
        }


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    bounds = np.cumsum([0] + list(sizes))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _chunk_keys(array: Any) -> set[str] | None:
    """The keys of the chunk files an array has in its store (one listing), or None if unknown."""
    try:
        from zarr.core.sync import sync

        store, prefix = array.store_path.store, array.store_path.path

        async def collect() -> set[str]:
            return {key async for key in store.list_prefix(f"{prefix}/c/" if prefix else "c/")}

        return sync(collect())
    except Exception:
        return None


def _chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    prefix = array.store_path.path
    key = array.metadata.encode_chunk_key(coords)
    return f"{prefix}/{key}" if prefix else key


def verify_store(group: Any, *, mode: str = "full", threads: int = 8) -> VerifyReport:
    """Check every chunk whose done flag is set: its file exists and (``mode="full"``) decodes.

    ``"full"`` reads each flagged chunk once (``threads`` at a time, on this process), so it
    costs about one read of the store; the CRC32C checksum of each chunk makes a truncated
    or altered file fail to decode. ``"exists"`` only lists the chunk files (one listing per
    array), which finds deleted chunks but not truncated ones. Nothing is modified; see
    :func:`repair`.
    """
    if mode not in ("full", "exists"):
        raise ValueError(f"verify must be True, False, 'full' or 'exists'; got {mode!r}.")
    start = time.perf_counter()
    attrs = group.attrs[ATTR]
    rows, cols = _ranges(attrs["test_block_sizes"]), _ranges(attrs["train_block_sizes"])
    report = VerifyReport(mode=mode)
    checks: list[tuple[str, Any, list[tuple[str, tuple, tuple]]]] = []

    flags, bad = read_flags(group["influences_done"])
    report.unreadable_flags["influences"] = bad
    extra = (0,) * (group["influences"].ndim - 2)
    for i, j in zip(*np.nonzero(flags)):
        i, j = int(i), int(j)
        sel = (slice(*rows[i]), slice(*cols[j]))
        checks.append(("influences", (i, j), [("influences", sel, (i, j) + extra)]))
    if "self_influences_done" in group:
        flags, bad = read_flags(group["self_influences_done"])
        report.unreadable_flags["self_influences"] = bad
        for (j,) in zip(*np.nonzero(flags)):
            checks.append(("self_influences", int(j), [("self_influences", (slice(*cols[int(j)]),), (int(j),))]))
    if "topk_done" in group:
        flags, bad = read_flags(group["topk_done"])
        report.unreadable_flags["top_k"] = bad
        names = [f"top_{kind}_{what}" for kind in ("helpful", "harmful") for what in ("indices", "values")]
        for (i,) in zip(*np.nonzero(flags)):
            i = int(i)
            checks.append(("top_k", i, [(name, (slice(*rows[i]), slice(None)), (i, 0)) for name in names]))

    arrays = {name: group[name] for _, _, parts in checks for name, _, _ in parts}
    keys = {name: _chunk_keys(a) for name, a in arrays.items()}

    def ok(parts: list[tuple[str, tuple, tuple]]) -> tuple[bool, int]:
        nbytes = 0
        for name, sel, coords in parts:
            present = keys[name]
            if present is not None and _chunk_key(arrays[name], coords) not in present:
                return False, nbytes
            if mode == "full":
                try:
                    nbytes += np.asarray(arrays[name][sel]).nbytes
                except Exception:
                    return False, nbytes
        return True, nbytes

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda c: ok(c[2]), checks))
    for (kind, coords, _), (good, nbytes) in zip(checks, results):
        report.bytes_read += nbytes
        if not good:
            report.damaged.setdefault(kind, []).append(coords)
    report.checked = len(checks)
    report.seconds = time.perf_counter() - start
    return report


def repair(group: Any, report: VerifyReport) -> None:
    """Clear the flags of the damaged chunks (and rewrite unreadable flags as 0) so that they
    are recomputed, and mark the store incomplete if anything was found."""
    flag_of = {"influences": "influences_done", "self_influences": "self_influences_done", "top_k": "topk_done"}
    found = False
    for kind, coords in list(report.damaged.items()) + list(report.unreadable_flags.items()):
        for c in coords:
            group[flag_of[kind]][c if isinstance(c, tuple) else (c,)] = 0
            found = True
    if found and group.attrs[ATTR].get("complete"):
        attrs = dict(group.attrs[ATTR])
        attrs["complete"] = False
        attrs.pop("completed", None)
        group.attrs[ATTR] = attrs
