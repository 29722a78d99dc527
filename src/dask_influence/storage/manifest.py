"""The completion manifest: the done state of every chunk in ONE small record, read in one request.

A store of 100,000 chunks has 100,000 one-file done flags; reading them costs 100,000
requests. The driver of a job also keeps their state in memory (it knows which write tasks
finished) and writes it, batched, as the attributes of the subgroup ``completion`` of the
store: a single ``completion/zarr.json``, replaced atomically (a temporary file renamed over
it on a local disk; one object put on object stores).

Format (``completion`` attributes, key ``"manifest"``)::

    {"format": 1,
     "store_created": "<the store's 'created' attribute>",
     "generation": 3,              # the store's fit generation when written
     "final": true,                # written after every task of a run had finished
     "updated": "2026-...+00:00",
     "arrays": {"influences": {"shape": [n_test_blocks, n_train_blocks], "done": 99990,
                               "values": "<base64 of zlib of uint8 values, C order>"},
                "self_influences": {...}, "top_k": {...}},
     "sha256": "<sha256 of the canonical JSON of every other entry>"}

A value is 0 for a chunk not known to be done, else the flag value (the fit generation, see
:mod:`.fits`) it was computed with. The manifest is a cache: the per-chunk flags stay the
truth (:mod:`.completion` checks it against one listing of the flag files and reads the flags
of the chunks it does not mark done). A manifest that does not parse, fails its checksum or
belongs to another store counts as absent.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import ATTR

GROUP = "completion"
KEY = "manifest"
FORMAT = 1


@dataclass
class Manifest:
    """Per tracked array (``influences``, ``self_influences``, ``top_k``), the uint8 flag value of
    every chunk (0: not known done), the fit generation and whether a run finished writing it."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    generation: int = 1
    final: bool = False
    updated: str | None = None


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode(manifest: Manifest, *, store_created: str | None) -> dict:
    """The JSON record of ``manifest`` (see the module docstring)."""
    arrays = {}
    for kind, values in manifest.values.items():
        v = np.ascontiguousarray(values, dtype=np.uint8)
        arrays[kind] = {
            "shape": [int(s) for s in v.shape],
            "done": int(np.count_nonzero(v)),
            "values": base64.b64encode(zlib.compress(v.tobytes(), 6)).decode("ascii"),
        }
    record = {
        "format": FORMAT,
        "store_created": store_created,
        "generation": int(manifest.generation),
        "final": bool(manifest.final),
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "arrays": arrays,
    }
    record["sha256"] = _digest(record)
    return record


def decode(record: Any, *, store_created: str | None) -> Manifest:
    """The manifest of a JSON record; ``ValueError`` saying why it cannot be used."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError("not a manifest of format 1")
    if record.get("sha256") != _digest(record):
        raise ValueError("its checksum does not match its contents")
    if record.get("store_created") != store_created:
        raise ValueError("it belongs to another store (its creation time differs)")
    values = {}
    for kind, entry in record["arrays"].items():
        shape = tuple(int(s) for s in entry["shape"])
        raw = zlib.decompress(base64.b64decode(entry["values"]))
        values[kind] = np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()
    return Manifest(values, int(record["generation"]), bool(record["final"]), record.get("updated"))


def read_manifest(group: Any) -> tuple[Manifest | None, str]:
    """The store's manifest and ``"ok"``, or ``None`` and why not (``"absent"``, ``"damaged: ..."``)."""
    created = group.attrs[ATTR].get("created")
    try:
        if GROUP not in group:
            return None, "absent"
        record = group[GROUP].attrs.get(KEY)
    except Exception as err:  # a completion/zarr.json that does not parse
        return None, f"damaged: {' '.join(str(err).split())[:200]}"
    if record is None:
        return None, "absent"
    try:
        return decode(record, store_created=created), "ok"
    except Exception as err:
        return None, f"damaged: {err}"


def write_manifest(group: Any, manifest: Manifest) -> None:
    """Replace the store's manifest (one atomic write of ``completion/zarr.json``)."""
    record = encode(manifest, store_created=group.attrs[ATTR].get("created"))
    try:
        sub = group[GROUP]
    except KeyError:
        sub = group.create_group(GROUP)
    except Exception:  # damaged metadata: replace the subgroup
        sub = group.create_group(GROUP, overwrite=True)
    sub.attrs[KEY] = record
