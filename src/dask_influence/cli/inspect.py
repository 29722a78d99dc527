"""``dask-influence inspect STORE``: what a store holds and how far it got.

Shapes, method and parameters, completion (chunks done / total, for complete and incomplete
stores alike) and summary statistics of the computed chunks. ``--json`` prints the same as
one JSON object. Reading the store is :mod:`dask_influence.storage.read` (its names are
re-exported here for compatibility); this module renders the text and defines the command.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ..storage.read import (
    chunk_ranges,
    describe,
    done_chunks,
    mean_influence,
    open_store,
    require_up_mode,
    statistics,
    store_info,
)

__all__ = [
    "chunk_ranges",
    "describe",
    "done_chunks",
    "inspect_store",
    "mean_influence",
    "open_store",
    "render",
    "require_up_mode",
    "statistics",
    "store_info",
]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


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
        lines.append(
            f"Status: INCOMPLETE ({inf['done']}/{inf['total']} chunks done); run the job again "
            "with --resume to compute the rest"
        )
    lock = d.get("lock")
    if lock:
        state = f"STALE ({lock['stale_reason']}; the next run removes it)" if lock["stale"] else "held"
        lines.append(
            f"Lock: {state}: host {lock['hostname']}, pid {lock['pid']}, since {lock['acquired']}, "
            f"last heartbeat {lock['heartbeat_age_s']:.0f} s ago"
        )
    lines.append(
        f"Method: {d['method']}, mode {d['mode']!r}, dtype {d['dtype']}, {d['num_params']:,} parameters"
        if isinstance(d.get("num_params"), int)
        else f"Method: {d['method']}, mode {d['mode']!r}, dtype {d['dtype']}"
    )
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
    fit = d.get("fit") or {}
    if fit.get("generation", 1) > 1:
        lines.append(
            f"Fit: generation {fit['generation']} ({fit.get('reason')}, since {fit.get('since')}); "
            "chunks of earlier fits count as not done"
        )
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
        lines.append(
            f"Solver: {solver['measure']} at most {solver['max_relative_residual']:.3g} "
            f"(tolerance {solver['tolerance']}), {solver['not_converged']} test point(s) above it, "
            f"at most {solver['max_iterations']} iterations"
        )
    stats = d.get("statistics")
    if stats:
        lines.append("Statistics (of the computed chunks):")
        for name, s in stats.items():
            if not s.get("count"):
                lines.append(f"  {name:<16} nothing computed yet")
                continue
            text = f"  {name:<16} min {s['min']:.4g}  max {s['max']:.4g}  mean {s['mean']:.4g}  std {s['std']:.4g}"
            if "fraction_positive" in s:
                text += f"  positive {s['fraction_positive']:.1%}"
            if s["non_finite"]:
                text += f"  non-finite {s['non_finite']:,}"
            lines.append(text)
    check = d.get("verify")
    if check is not None:
        damaged = sum(len(v) for v in check["damaged"].values())
        flags = sum(len(v) for v in check["unreadable_flags"].values())
        wrong = sum(len(v) for v in check.get("wrong_flags", {}).values())
        if damaged or flags or wrong:
            found = "; ".join(f"{k} {v}" for k, v in {**check["damaged"]}.items())
            lines.append(f"Verify: {damaged} damaged chunk(s): {found}" if damaged else "Verify: no damaged chunk")
            if flags:
                lines.append(f"Verify: {flags} unreadable done flag(s): {check['unreadable_flags']}")
            if wrong:
                lines.append(f"Verify: {wrong} chunk(s) marked done by the manifest but not by their flags")
            lines.append("  (run the job again with --resume to recompute them)")
        else:
            lines.append(
                f"Verify: all {check['checked']} flagged chunks read and decoded "
                f"({check['bytes_read'] / 2**20:.1f} MiB in {check['seconds']:.2f} s)"
            )
    lines.extend(render_evaluations(d.get("evaluation") or {}))
    versions = d.get("versions") or {}
    if versions:
        lines.append("Written by: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if d.get("created"):
        lines.append(f"Created {d['created']}" + (f", completed {d['completed']}" if d.get("completed") else ""))
    return "\n".join(lines)


def render_evaluations(evaluations: dict) -> list[str]:
    """The ``Evaluation:`` lines of ``inspect``: each evaluation's runs and results (none: no lines)."""
    if not evaluations:
        return []
    lines = ["Evaluation (dask-influence evaluate; plot --evaluation NAME draws it):"]
    for name, e in evaluations.items():
        result = e.get("result") or {}
        runs = f"{e['runs_done']}/{e['runs']} retrainings" if e.get("runs") else "no retraining"
        if e.get("kind") == "lds" and result:
            low, high = result.get("lds_interval") or (None, None)
            text = (
                f"LDS mean {_fmt(result.get('lds_mean'))} [{_fmt(low)}, {_fmt(high)}] over "
                f"{result.get('n_test')} test points, {result.get('n_subsets')} subsets of "
                f"{_fmt(result.get('fraction'))} x {result.get('seeds')} seed(s), seed {result.get('seed')}"
            )
        elif e.get("kind") == "loo" and result:
            text = (
                f"LOO Pearson {_fmt(result.get('pearson'))} (per test point "
                f"{_fmt(result.get('pearson_per_test_mean'))}) over {result.get('n_points')} left-out points"
            )
        elif e.get("kind") == "mislabel" and result:
            text = "AUC " + ", ".join(f"{k[4:].replace('_', ' ')} {_fmt(v)}" for k, v in result.items())
        else:
            text = "not computed yet; run `dask-influence evaluate` again to finish it"
        lines.append(f"  {name:<10} {runs:<22} {text}")
    return lines


EVALUATION_GROUP = "evaluation"  # dask_influence.evaluate.records.GROUP (importing it imports torch)


def _evaluations(group: Any) -> dict:
    """The store's evaluations (:func:`~dask_influence.evaluate.records.read_evaluations`); the
    evaluation package (which imports torch) is imported only when the store has some."""
    if EVALUATION_GROUP not in group:
        return {}
    from ..evaluate.records import read_evaluations

    return read_evaluations(group)


@click.command(name="inspect")
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-stats", is_flag=True, help="Skip the summary statistics (they stream every computed chunk).")
@click.option(
    "--verify",
    is_flag=True,
    help="Check the done state against the files: read every done flag and chunk (checksums), list damaged ones.",
)
def inspect_store(store: str, as_json: bool, no_stats: bool, verify: bool) -> None:
    """Show the shapes, method, completion and statistics of a STORE.

    Works on complete and incomplete stores; the exit code is 0 for both (use --json and
    its "complete" field, or `run --resume`, to act on it).
    """
    from ..storage.index_info import describe_index, open_index_group, render_index
    from .output import one_line

    index_group = open_index_group(store)
    if index_group is not None:  # a gradient index (dask-influence index), not an influence store
        info = describe_index(store, index_group, verify=verify)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else render_index(info))
        return
    try:
        group = open_store(store)
        d = describe(store, group, stats=not no_stats, verify=verify)
        d["evaluation"] = _evaluations(group)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        click.echo(render(d))
