"""``dask-influence inspect STORE``: what a store holds and how far it got.

Shapes, method and parameters, completion (chunks done / total, for complete and incomplete
stores alike) and summary statistics of the computed chunks. ``--json`` prints the same as
one JSON object. The helpers here (opening a store, reading it chunk by chunk) are shared
by ``top`` and ``plot``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import click
import numpy as np

from ..errors import StoreError


# -- shared helpers -------------------------------------------------------------------------

def open_store(path: str) -> Any:
    """Open a dask-influence zarr store read-only, or raise :class:`StoreError` saying why not."""
    import zarr

    from ..mapping.store import ATTR

    if "://" not in path and not os.path.exists(path):
        raise StoreError(f"No store at {path!r}; pass the path of a zarr store written by `dask-influence run`.")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several kinds for "not a group"
        raise StoreError(f"{path!r} is not a zarr group ({' '.join(str(exc).split())}).") from None
    if ATTR not in group.attrs or "influences" not in group:
        raise StoreError(f"{path!r} is a zarr group but not a dask-influence store (no {ATTR!r} attributes).")
    return group


def store_info(group: Any) -> dict:
    """The ``dask_influence`` attributes of a store."""
    from ..mapping.store import ATTR

    return dict(group.attrs[ATTR])


def chunk_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def done_chunks(group: Any) -> Iterator[tuple[int, int, tuple[int, int], tuple[int, int]]]:
    """``(i, j, rows, cols)`` of every chunk of ``influences`` whose done flag is set."""
    info = store_info(group)
    rows = chunk_ranges(info["test_block_sizes"])
    cols = chunk_ranges(info["train_block_sizes"])
    from ..mapping.store import read_flags

    done, _ = read_flags(group["influences_done"])  # an unreadable flag counts as not done
    for i, j in zip(*np.nonzero(done)):
        yield int(i), int(j), rows[i], cols[j]


def require_up_mode(group: Any, command: str) -> None:
    mode = store_info(group).get("config", {}).get("mode", "up")
    if mode != "up":
        raise StoreError(f"`{command}` needs a store in mode 'up'; this one has mode {mode!r} "
                         "(one value per feature).")


def mean_influence(group: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean influence of each training point over the test points of the computed chunks.

    Reads the store one chunk at a time. Returns ``(mean, count)``: ``count[j]`` test points
    went into ``mean[j]`` (NaN where no chunk of column ``j`` is done yet).
    """
    n_test, n_train = group["influences"].shape[:2]
    total = np.zeros(n_train, dtype=np.float64)
    count = np.zeros(n_train, dtype=np.int64)
    array = group["influences"]
    for _, _, (r0, r1), (c0, c1) in done_chunks(group):
        block = np.asarray(array[r0:r1, c0:c1], dtype=np.float64)
        total[c0:c1] += block.reshape(r1 - r0, c1 - c0, -1).sum(axis=(0, 2))
        count[c0:c1] += r1 - r0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean, count


class _Moments:
    """Running count, sum, sum of squares, min, max and non-finite count."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.squares = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.nonfinite = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        self.nonfinite += int(values.size - finite.sum())
        values = values[finite]
        if values.size:
            self.n += values.size
            self.total += float(values.sum())
            self.squares += float(np.square(values).sum())
            self.lo = min(self.lo, float(values.min()))
            self.hi = max(self.hi, float(values.max()))

    def summary(self) -> dict:
        if not self.n:
            return {"count": 0, "non_finite": self.nonfinite}
        mean = self.total / self.n
        var = max(self.squares / self.n - mean * mean, 0.0)
        return {"count": self.n, "min": self.lo, "max": self.hi, "mean": mean, "std": math.sqrt(var),
                "non_finite": self.nonfinite}


def statistics(group: Any) -> dict:
    """Summary statistics of the computed chunks of every array (read chunk by chunk)."""
    out = {}
    moments, positive = _Moments(), 0
    array = group["influences"]
    for _, _, (r0, r1), (c0, c1) in done_chunks(group):
        block = np.asarray(array[r0:r1, c0:c1])
        moments.add(block)
        positive += int((block > 0).sum())
    out["influences"] = moments.summary()
    if moments.n:
        out["influences"]["fraction_positive"] = positive / moments.n
    if "self_influences" in group:
        info = store_info(group)
        s = _Moments()
        from ..mapping.store import read_flags

        flags, _ = read_flags(group["self_influences_done"])
        for j, (c0, c1) in enumerate(chunk_ranges(info["train_block_sizes"])):
            if flags[j]:
                s.add(group["self_influences"][c0:c1])
        out["self_influences"] = s.summary()
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# -- the command ----------------------------------------------------------------------------

def describe(path: str, group: Any, *, stats: bool = True, verify: bool = False) -> dict:
    """Everything ``inspect`` shows, as a JSON-ready dict (``verify``: read every flagged chunk)."""
    from ..mapping.store import completion, is_complete

    info = store_info(group)
    config = info.get("config", {})
    arrays = {}
    for name in sorted(group.array_keys()):
        a = group[name]
        arrays[name] = {"shape": list(a.shape), "chunks": list(a.chunks), "dtype": str(a.dtype)}
    done = {k: {"done": d, "total": t} for k, (d, t) in completion(group).items()}
    out = {
        "store": path,
        "complete": is_complete(group),
        "completion": done,
        "method": config.get("method"),
        "parameters": config.get("parameters", {}),
        "regularization": config.get("regularization"),
        "mode": config.get("mode"),
        "shape": info.get("shape"),
        "dtype": config.get("dtype"),
        "test_block_sizes": info.get("test_block_sizes"),
        "train_block_sizes": info.get("train_block_sizes"),
        "top_k": config.get("top_k"),
        "self_influences": config.get("self_influences"),
        "num_params": config.get("num_params"),
        "n_train_fit": config.get("n_train_fit"),
        "arrays": arrays,
        "sign_convention": info.get("sign_convention"),
        "versions": info.get("versions", {}),
        "created": info.get("created"),
        "completed": info.get("completed"),
        "solver_info": info.get("solver_info"),
        "lock": _lock_status(path),
    }
    if stats:
        out["statistics"] = statistics(group)
    if verify:
        from ..mapping.store import verify_store

        out["verify"] = verify_store(group).as_dict()
    return out


def _lock_status(path: str) -> dict | None:
    """The store's lock (``<store>.lock``): who holds it and whether it is stale; None if free."""
    from ..mapping.lock import read_lock

    try:
        found = read_lock(path)
    except Exception:  # a lock that cannot be read is reported by `run`, not here
        return None
    return None if found is None else found.status()


def _sizes(sizes: list[int] | None) -> str:
    if not sizes:
        return "?"
    first, last = sizes[0], sizes[-1]
    return f"{len(sizes)} of {first:,}" + (f" (last {last:,})" if last != first else "")


def render(d: dict) -> str:
    """The human-readable text of ``inspect``."""
    lines = [f"Store: {d['store']}"]
    inf = d["completion"].get("influences", {"done": 0, "total": 0})
    if d["complete"]:
        lines.append(f"Status: complete ({inf['done']}/{inf['total']} chunks)")
    else:
        lines.append(f"Status: INCOMPLETE ({inf['done']}/{inf['total']} chunks done); run the job again "
                     "with --resume to compute the rest")
    lock = d.get("lock")
    if lock:
        state = f"STALE ({lock['stale_reason']}; the next run removes it)" if lock["stale"] else "held"
        lines.append(f"Lock: {state}: host {lock['hostname']}, pid {lock['pid']}, since {lock['acquired']}, "
                     f"last heartbeat {lock['heartbeat_age_s']:.0f} s ago")
    lines.append(f"Method: {d['method']}, mode {d['mode']!r}, dtype {d['dtype']}, "
                 f"{d['num_params']:,} parameters" if isinstance(d.get("num_params"), int)
                 else f"Method: {d['method']}, mode {d['mode']!r}, dtype {d['dtype']}")
    params = dict(d["parameters"] or {})
    if d.get("regularization") is not None:
        params.setdefault("regularization", d["regularization"])
    if params:
        lines.append("Parameters: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(params.items())))
    shape = d["shape"] or []
    if len(shape) >= 2:
        features = f" x features {tuple(shape[2:])}" if len(shape) > 2 else ""
        lines.append(f"Influences: {shape[0]:,} test x {shape[1]:,} train points{features}")
    lines.append(f"Blocks: test {_sizes(d['test_block_sizes'])}, train {_sizes(d['train_block_sizes'])}")
    lines.append("Completion:")
    labels = {"influences": "chunks", "self_influences": "train blocks", "top_k": "test blocks"}
    for name, c in d["completion"].items():
        extra = f" (k={d['top_k']})" if name == "top_k" else ""
        lines.append(f"  {name + extra:<20} {c['done']:>6}/{c['total']:<6} {labels.get(name, 'blocks')} done")
    lines.append("Arrays:")
    for name, a in d["arrays"].items():
        lines.append(f"  {name:<22} {str(tuple(a['shape'])):<20} {a['dtype']:<8} chunks {tuple(a['chunks'])}")
    solver = d.get("solver_info")
    if solver and solver.get("blocks_recorded"):
        lines.append(f"Solver: {solver['measure']} at most {solver['max_relative_residual']:.3g} "
                     f"(tolerance {solver['tolerance']}), {solver['not_converged']} test point(s) above it, "
                     f"at most {solver['max_iterations']} iterations")
    stats = d.get("statistics")
    if stats:
        lines.append("Statistics (of the computed chunks):")
        for name, s in stats.items():
            if not s.get("count"):
                lines.append(f"  {name:<16} nothing computed yet")
                continue
            text = (f"  {name:<16} min {s['min']:.4g}  max {s['max']:.4g}  mean {s['mean']:.4g}  "
                    f"std {s['std']:.4g}")
            if "fraction_positive" in s:
                text += f"  positive {s['fraction_positive']:.1%}"
            if s["non_finite"]:
                text += f"  non-finite {s['non_finite']:,}"
            lines.append(text)
    check = d.get("verify")
    if check is not None:
        damaged = sum(len(v) for v in check["damaged"].values())
        flags = sum(len(v) for v in check["unreadable_flags"].values())
        if damaged or flags:
            found = "; ".join(f"{k} {v}" for k, v in {**check["damaged"]}.items())
            lines.append(f"Verify: {damaged} damaged chunk(s): {found}" if damaged else "Verify: no damaged chunk")
            if flags:
                lines.append(f"Verify: {flags} unreadable done flag(s): {check['unreadable_flags']}")
            lines.append("  (run the job again with --resume to recompute them)")
        else:
            lines.append(f"Verify: all {check['checked']} flagged chunks read and decoded "
                         f"({check['bytes_read'] / 2**20:.1f} MiB in {check['seconds']:.2f} s)")
    versions = d.get("versions") or {}
    if versions:
        lines.append("Written by: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if d.get("created"):
        lines.append(f"Created {d['created']}" + (f", completed {d['completed']}" if d.get("completed") else ""))
    return "\n".join(lines)


@click.command(name="inspect")
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-stats", is_flag=True, help="Skip the summary statistics (they read every computed chunk).")
@click.option("--verify", is_flag=True,
              help="Read and decode every chunk flagged done (checksums) and list damaged ones.")
def inspect_store(store: str, as_json: bool, no_stats: bool, verify: bool) -> None:
    """Show the shapes, method, completion and statistics of a STORE.

    Works on complete and incomplete stores; the exit code is 0 for both (use --json and
    its "complete" field, or `run --resume`, to act on it).
    """
    from .run import one_line

    try:
        group = open_store(store)
        d = describe(store, group, stats=not no_stats, verify=verify)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        click.echo(render(d))
