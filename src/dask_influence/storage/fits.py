"""Which fit computed each chunk: the store's fit generations.

Every chunk's completion record (its done flag, and its entry in the manifest) holds the
*flag value* of the fit generation it was computed with, not just "done". The store's
attribute ``fit`` names the current generation::

    {"generation": 2, "fingerprint": "<solver.fingerprint(): method, weights, fitted state>",
     "fit_id": "<uuid of the in-memory fit that started it>", "since": "<UTC time>",
     "reason": "refit"}

A chunk counts as done only when its value is the current generation's, so a refit (or any
change of the fitted state) invalidates every chunk of an earlier fit at once, without
touching them: a resume recomputes exactly the chunks of other fits. Flag values cycle
through 1..127 (the flags are int8); before a value is reused, the flags still holding it
are cleared. The saved test factors (:mod:`.factors`) carry the same flag values. Stores
written before generations existed have no ``fit`` attribute: their flags (all 1) belong to
generation 1, so they resume as before.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_VALUE = 127


@dataclass(frozen=True)
class FitIdentity:
    """The fit a job computes with.

    Attributes:
        fingerprint: ``solver.fingerprint()`` (method, hyperparameters, weights, fitted state).
        fit_id: ``solver.fit_id_``, a uuid naming this in-memory fit (a new fit or a restore
            changes it), so that one refit starts one generation however often it resumes.
        refit: the solver was fitted again on request (``refit=True``, ``run --refit``): chunks
            of every earlier fit are recomputed even if the fitted state came out the same, and
            a store recorded with another fingerprint is accepted (all its chunks recomputed).
    """

    fingerprint: str
    fit_id: str | None = None
    refit: bool = False


def flag_value(generation: int) -> int:
    """The flag value (1..127) of fit generation ``generation`` (1, 2, ...)."""
    return (int(generation) - 1) % MAX_VALUE + 1


def fit_record(attrs: dict) -> dict:
    """The current fit record of a store's attributes (generation 1 for stores written before)."""
    record = attrs.get("fit")
    if isinstance(record, dict) and isinstance(record.get("generation"), int):
        return record
    return {
        "generation": 1,
        "fingerprint": (attrs.get("config") or {}).get("solver_fingerprint"),
        "fit_id": None,
        "since": attrs.get("created"),
        "reason": "first fit",
    }


def current_value(attrs: dict) -> int:
    """The flag value that marks a chunk of the store as done with its current fit."""
    return flag_value(fit_record(attrs)["generation"])


def new_record(identity: FitIdentity, generation: int, reason: str) -> dict:
    """The ``fit`` attribute of a new generation."""
    return {
        "generation": int(generation),
        "fingerprint": identity.fingerprint,
        "fit_id": identity.fit_id,
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "reason": reason,
    }


def change_reason(record: dict, identity: FitIdentity) -> str | None:
    """Why ``identity`` needs a new generation of a store whose current fit is ``record``; None if not."""
    if record.get("fingerprint") != identity.fingerprint:
        return "refit: the fitted state changed"
    if identity.refit and (identity.fit_id is None or record.get("fit_id") != identity.fit_id):
        return "refit"
    return None


def start_generation(group: Any, identity: FitIdentity, reason: str) -> dict:
    """Make the next fit generation current in ``group`` (opened ``r+``); returns its record.

    The store is marked incomplete and its configuration records the new fingerprint. Flags
    that still hold the new generation's value (from 127 generations ago) are cleared first,
    so that they cannot pass for chunks of this fit.
    """
    from .layout import ATTR

    attrs = dict(group.attrs[ATTR])
    record = new_record(identity, fit_record(attrs)["generation"] + 1, reason)
    if record["generation"] > MAX_VALUE:
        _clear_value(group, flag_value(record["generation"]))
    attrs["fit"] = record
    attrs["config"] = {**attrs.get("config", {}), "solver_fingerprint": identity.fingerprint}
    attrs["complete"] = False
    attrs.pop("completed", None)
    group.attrs[ATTR] = attrs
    return record


def _clear_value(group: Any, value: int) -> None:
    """Clear every done flag holding ``value`` (read through the chunk files), the saved factors' included."""
    from .chunkfiles import list_chunks, read_chunks
    from .factors import FACTORS_DONE
    from .layout import FLAG_ARRAYS

    for name in [name for _, name in FLAG_ARRAYS] + [FACTORS_DONE]:
        if name not in group:
            continue
        flags = group[name]
        present = list_chunks(flags)
        coords = sorted(present) if present is not None else list(_all_coords(flags.shape))
        for c, data in read_chunks(flags, coords):
            if isinstance(data, np.ndarray) and int(data.reshape(-1)[0]) == value:
                flags[c] = 0


def _all_coords(shape: tuple[int, ...]) -> Any:
    return np.ndindex(*shape)
