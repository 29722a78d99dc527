"""Completion of a store: its done flags and its ``complete`` attribute.

A chunk counts as computed only once its done flag is 1 (the flag is written after the
chunk); the store counts as complete only when its attribute says so AND every flag is set.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np

from ..errors import StoreError
from .layout import ATTR


def completion(group: Any) -> dict[str, tuple[int, int]]:
    """``{array: (done, total)}`` for every tracked array of the store."""
    out = {}
    for flag, name in (
        ("influences_done", "influences"),
        ("self_influences_done", "self_influences"),
        ("topk_done", "top_k"),
    ):
        if flag in group:
            done, _ = read_flags(group[flag])
            out[name] = (int(done.sum()), int(done.size))
    return out


def read_flags(array: Any) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The done flags of a flag array as booleans, and the positions of unreadable flags.

    A flag whose chunk does not decode (a damaged file) counts as not done.
    """
    try:
        return np.asarray(array[...]) == 1, []
    except Exception:
        pass
    flags = np.zeros(array.shape, dtype=bool)
    bad = []
    for idx in np.ndindex(*array.shape):  # one chunk per flag
        try:
            flags[idx] = bool(np.asarray(array[idx]) == 1)
        except Exception:
            bad.append(tuple(int(k) for k in idx))
    return flags, bad


def is_complete(group: Any) -> bool:
    """True when the store is marked complete AND every flag is set."""
    return bool(group.attrs.get(ATTR, {}).get("complete")) and all(d == t for d, t in completion(group).values())


def mark_complete(group: Any, extra: dict | None = None) -> None:
    """Set ``complete`` after checking every done flag; raises :class:`StoreError` otherwise."""
    missing = {k: v for k, v in completion(group).items() if v[0] != v[1]}
    if missing:
        raise StoreError(f"Cannot mark the store complete: chunks missing {missing}.")
    attrs = dict(group.attrs[ATTR])
    attrs.update(extra or {})
    attrs["complete"] = True
    attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    group.attrs[ATTR] = attrs
