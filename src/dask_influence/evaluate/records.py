"""Where the measurements of the retrainings are kept: a zarr group, or memory.

An evaluation named ``name`` (``"lds"``, ``"loo"``) of a store lives in the group
``<store>/evaluation/<name>``:

- ``measurements`` ``(n_runs, n_test)`` float64, one chunk per run (row), NaN until written:
  the measurement of every test point by the model of that retraining;
- ``measurements_done`` ``(n_runs,)`` int8, one chunk per run: set to 1 after the run's row
  is written (a row without its flag counts as not done);
- the evaluation's own arrays (the subsets, the per-test results; see :mod:`.lds`, :mod:`.loo`);
- attributes under ``"dask_influence_evaluation"``: ``kind``, ``config`` (what the runs
  depend on: sizes, seeds, subsets' parameters, the train function's and task's names, a
  checksum of the test data) and, once computed, ``result`` (the summary numbers, with
  ``scores``: the fingerprint of the scores they were computed from,
  :func:`~.scores.scores_fingerprint`) and ``results`` (``{fingerprint: summary}`` of every
  scores evaluated against these runs).

The worker that finishes a retraining writes its row and then its flag (:class:`RunTarget`),
so an interrupted evaluation keeps every finished run; a rerun with the same configuration
retrains only the runs whose flag is unset. A different configuration under the same name is
refused (pass ``overwrite=True``, or another ``name``).

The runs do not depend on the scores, so a rerun with other scores reuses them; its result
arrays (``lds``, ``predictions``, ...) are written to ``results/<fingerprint>/`` and, as the
latest, to the group itself, and the result of the earlier scores stays in its own
``results/<fingerprint>/`` (a group of an earlier version, whose result records no scores,
has it moved to ``results/unrecorded/`` first).

What is read back is verified, as the influence store's chunks are (:mod:`..storage.verify`):
reopening a group reads the done flags and the measurement rows of the runs they mark done
(CRC32C-checked, :func:`~dask_influence.storage.chunkfiles.read_chunks`); a run whose row is
missing or does not decode, or whose flag does not decode, is named in a warning and its flag
cleared, so the rerun retrains exactly those runs; a recorded array of the configuration
(``subsets``, ``points``) that does not decode is rewritten from the configuration.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreError

ATTR = "dask_influence_evaluation"
GROUP = "evaluation"


class MemoryRecords:
    """The measurements of ``n_runs`` runs on ``n_test`` test points, in memory (nothing resumes)."""

    target: RunTarget | None = None
    store: str | None = None

    def __init__(self, n_runs: int, n_test: int):
        self.values = np.full((n_runs, n_test), np.nan)
        self.flags = np.zeros(n_runs, dtype=bool)

    def done(self) -> np.ndarray:
        """``(n_runs,)`` booleans: the runs already measured."""
        return self.flags.copy()

    def write(self, r: int, row: np.ndarray) -> None:
        """Record run ``r``'s measurements ``(n_test,)``."""
        self.values[r] = row
        self.flags[r] = True

    def read(self) -> np.ndarray:
        """``(n_runs, n_test)``: every run's measurements (NaN where not done)."""
        return self.values.copy()

    def save(self, arrays: dict[str, np.ndarray], result: dict, *, scores: str = "") -> None:
        """Nothing to save for an evaluation in memory."""


@dataclass(frozen=True)
class RunTarget:
    """Where a worker writes one run: the store and the evaluation's group inside it."""

    store: str
    path: str

    def write(self, r: int, row: np.ndarray) -> None:
        """Write run ``r``'s row ``(n_test,)``, then its done flag."""
        import zarr

        group: Any = zarr.open_group(self.store, path=self.path, mode="r+")
        group["measurements"][r : r + 1, :] = np.asarray(row, dtype=np.float64)[None, :]
        group["measurements_done"][r : r + 1] = np.ones(1, dtype=np.int8)


class ZarrRecords:
    """The measurements in ``<store>/evaluation/<name>`` (see the module docstring).

    Creates the group, or reopens one written with the same ``config`` (its finished runs
    kept); ``overwrite`` starts afresh.

    Args:
        labels: each run as messages name it (``n_runs``; default ``"run r"``).

    Raises:
        StoreError: the group holds an evaluation of another configuration (or kind).
    """

    repaired: list[int]
    """The runs found recorded but unreadable on reopening, whose flags were cleared."""

    def __init__(
        self,
        store: str,
        name: str,
        *,
        kind: str,
        config: dict,
        n_runs: int,
        n_test: int,
        overwrite: bool = False,
        static: dict[str, np.ndarray] | None = None,
        labels: list[str] | None = None,
    ):
        import zarr

        from ..storage.layout import codecs

        check_name(name)
        self.store = store
        self.path = f"{GROUP}/{name}"
        self.labels = list(labels) if labels is not None else [f"run {r}" for r in range(n_runs)]
        self.repaired = []
        config = json.loads(json.dumps(_json_ready(config), sort_keys=True))
        root: Any = zarr.open_group(store, mode="a")
        parent: Any = root.require_group(GROUP)
        self.group: Any
        if name in parent and not overwrite:
            existing = parent[name]
            recorded = dict(existing.attrs.get(ATTR, {}))
            if recorded.get("kind") != kind or recorded.get("config") != config:
                raise StoreError(
                    f"The store {store!r} holds an evaluation {name!r} of another configuration "
                    f"({_difference(recorded.get('config') or {}, config, recorded.get('kind'), kind)}); pass "
                    f"overwrite=True (--overwrite) to replace it, or another name to keep both."
                )
            self.group = existing
            self._verify(static or {})
            return
        group: Any = parent.create_group(name, overwrite=True)
        compress = codecs()
        group.create_array(
            "measurements",
            shape=(n_runs, n_test),
            chunks=(1, n_test),
            dtype="float64",
            fill_value=np.nan,
            config={"write_empty_chunks": True},
            **compress,
        )
        group.create_array("measurements_done", shape=(n_runs,), chunks=(1,), dtype="int8", fill_value=0, **compress)
        for key, value in (static or {}).items():
            write_array(group, key, value)
        group.attrs[ATTR] = {
            "kind": kind,
            "config": config,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        }
        self.group = group

    @property
    def target(self) -> RunTarget:
        """Where the workers write their runs."""
        return RunTarget(self.store, self.path)

    def done(self) -> np.ndarray:
        """``(n_runs,)`` booleans: the runs whose flag is set (an unreadable flag: not done)."""
        from ..storage.completion import read_flags

        return read_flags(self.group["measurements_done"])[0]

    def write(self, r: int, row: np.ndarray) -> None:
        """Write run ``r``'s measurements ``(n_test,)``, then its flag."""
        self.target.write(r, row)

    def read(self) -> np.ndarray:
        """``(n_runs, n_test)``: the measurements of the runs flagged done (NaN elsewhere), each
        row read once and checked.

        Raises:
            StoreError: a done run's row is missing or does not decode (naming the run).
        """
        from ..storage.chunkfiles import read_chunks

        array = self.group["measurements"]
        values = np.full(tuple(int(v) for v in array.shape), np.nan)
        done = np.nonzero(self.done())[0]
        for (r, _), data in read_chunks(array, [(int(r), 0) for r in done]):
            if not isinstance(data, np.ndarray):
                raise StoreError(
                    f"The measurements of {self.labels[r]} in {self.store!r} ({self.path}) cannot be read "
                    f"({_reason(data)}); run the evaluation again: it verifies the recorded runs and retrains this one."
                )
            values[r] = data.reshape(-1)
        return values

    def _verify(self, static: dict[str, np.ndarray]) -> None:
        """Clear the flags of the done runs whose row is missing or does not decode, and of flags
        that do not decode (so they are retrained), naming them; rewrite a recorded array of the
        configuration that does not decode (see the module docstring)."""
        from ..storage.chunkfiles import read_chunks
        from ..storage.completion import read_flags

        flags, bad_flags = read_flags(self.group["measurements_done"])
        broken: dict[int, str] = {int(c[0]): "its done flag does not decode" for c in bad_flags}
        coords = [(int(r), 0) for r in np.nonzero(flags)[0]]
        for (r, _), data in read_chunks(self.group["measurements"], coords):
            if not isinstance(data, np.ndarray):
                broken[r] = f"its measurements {_reason(data)}"
        for r in sorted(broken):
            self.group["measurements_done"][r : r + 1] = np.zeros(1, dtype=np.int8)
        if broken:
            self.repaired = sorted(broken)
            shown = "; ".join(f"{self.labels[r]}: {broken[r]}" for r in self.repaired[:5])
            more = f" (and {len(broken) - 5} more)" if len(broken) > 5 else ""
            warnings.warn(
                f"The evaluation {self.path!r} of {self.store!r} had {len(broken)} recorded run(s) that "
                f"cannot be read, retrained now: {shown}{more}.",
                RuntimeWarning,
                stacklevel=4,
            )
        for key, value in static.items():
            if key not in self.group or not _intact(self.group[key], np.asarray(value)):
                write_array(self.group, key, value)
                warnings.warn(
                    f"The array {key!r} of the evaluation {self.path!r} of {self.store!r} could not be read; "
                    "rewritten from the configuration.",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def save(self, arrays: dict[str, np.ndarray], result: dict, *, scores: str = "") -> None:
        """Write the evaluation's result arrays and its summary ``result`` (attributes), as the
        result of the scores with fingerprint ``scores`` (see the module docstring): also under
        ``results/<scores>/``, the result of other scores kept in theirs (evaluating several
        methods' scores against one set of runs is the intended use, so nothing warns)."""
        attrs = dict(self.group.attrs[ATTR])
        results = dict(attrs.get("results") or {})
        previous = attrs.get("result")
        if previous is not None and not (previous or {}).get("scores") and "unrecorded" not in results:
            # a result of an earlier version, of scores it did not record: keep it before replacing it
            for key in arrays:
                try:
                    kept = np.asarray(self.group[key][...]) if key in self.group else None
                except Exception:  # an array that no longer decodes: its summary is kept below
                    kept = None
                if kept is not None:
                    write_array(self._results_group("unrecorded"), key, kept)
            results["unrecorded"] = previous
        for key, value in arrays.items():
            write_array(self.group, key, value)
            if scores:
                write_array(self._results_group(_key(scores)), key, value)
        summary = _json_ready({**result, "scores": scores})
        results[scores or "unrecorded"] = summary
        attrs["result"] = summary
        attrs["results"] = results
        attrs["computed"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        self.group.attrs[ATTR] = attrs

    def _results_group(self, key: str) -> Any:
        return self.group.require_group("results").require_group(key)


def open_records(
    where: Any,
    name: str,
    *,
    kind: str,
    config: dict,
    n_runs: int,
    n_test: int,
    overwrite: bool,
    static: dict[str, np.ndarray],
    labels: list[str] | None = None,
) -> MemoryRecords | ZarrRecords:
    """The records of an evaluation: in memory when ``where`` (a store) is ``None``, else the
    resumable ``evaluation/<name>`` group of that store (see :class:`ZarrRecords`)."""
    if where is None:
        return MemoryRecords(n_runs, n_test)
    return ZarrRecords(
        str(where),
        name,
        kind=kind,
        config=config,
        n_runs=n_runs,
        n_test=n_test,
        overwrite=overwrite,
        static=static,
        labels=labels,
    )


def store_lock(where: Any) -> Any:
    """The lock of the store an evaluation writes into (``<store>.lock``, as ``run`` takes it), so
    that an evaluation and a ``run --resume`` (or another evaluation) never write one store at
    once; a no-op for evaluations kept in memory (``where`` is ``None``)."""
    from contextlib import nullcontext

    from ..storage.lock import StoreLock

    return nullcontext() if where is None else StoreLock(str(where))


def write_array(group: Any, key: str, value: np.ndarray) -> None:
    """Write ``value`` as the array ``key`` of ``group`` (replacing one of that name)."""
    from ..storage.layout import codecs

    value = np.asarray(value)
    chunks = (1,) + value.shape[1:] if value.ndim >= 2 else value.shape or (1,)
    array = group.create_array(key, shape=value.shape, chunks=chunks, dtype=value.dtype, overwrite=True, **codecs())
    array[...] = value


def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a plain name for a zarr group."""
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"name must be a plain name such as 'lds' (letters, digits, '_', '-'); got {name!r}.")


def read_evaluations(group: Any) -> dict[str, dict]:
    """The evaluations of a store's group: ``{name: {kind, config, runs_done, runs, result}}``.

    Empty without an ``evaluation`` group. Used by ``inspect``.
    """
    from ..storage.completion import read_flags

    if GROUP not in group:
        return {}
    out = {}
    parent = group[GROUP]
    for name in sorted(parent.group_keys()):
        sub = parent[name]
        attrs = dict(sub.attrs.get(ATTR, {}))
        if not attrs:
            continue
        flags = read_flags(sub["measurements_done"])[0] if "measurements_done" in sub else np.zeros(0, dtype=bool)
        out[name] = {
            "kind": attrs.get("kind"),
            "config": attrs.get("config", {}),
            "runs_done": int(flags.sum()),
            "runs": int(flags.size),
            "result": attrs.get("result"),
            "results": attrs.get("results") or {},
        }
    return out


def _key(fingerprint: str) -> str:
    """A scores fingerprint as a zarr group name (``matrix:ab12`` -> ``matrix-ab12``)."""
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in fingerprint) or "unrecorded"


def _reason(data: Any) -> str:
    """Why a chunk as :func:`~dask_influence.storage.chunkfiles.read_chunks` yields it is unusable."""
    return "file is missing" if data is None else "do not decode: " + " ".join(str(data).split())


def _intact(array: Any, value: np.ndarray) -> bool:
    """Whether ``array``, written from ``value``, still has its chunks: each one decodes
    (CRC32C-checked), and each one without a file is one zarr leaves out (equal to the fill
    value). Whether the decoded values equal ``value`` is the caller's check."""
    import math

    from ..storage.chunkfiles import read_chunks

    if tuple(int(v) for v in array.shape) != value.shape:
        return False
    grid = tuple(math.ceil(s / c) for s, c in zip(array.shape, array.chunks))
    fill = array.fill_value
    for coords, data in read_chunks(array, list(np.ndindex(*grid))):
        if isinstance(data, Exception):
            return False
        if data is None:
            block = value[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, array.chunks))]
            if not np.all(block == fill):
                return False
    return True


def _difference(old: dict, new: dict, old_kind: Any, new_kind: Any) -> str:
    if old_kind != new_kind:
        return f"kind {old_kind!r}, not {new_kind!r}"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:3]]
    return ", ".join(shown) + (" ..." if len(keys) > 3 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_ready(value: Any) -> Any:
    """``value`` as JSON data: numpy scalars and arrays as Python values, NaN and Inf as ``None``."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
