"""``dask-influence rank STORE``: training points ranked by their influence over all test points.

Per training point ``j`` the mean, minimum and maximum of ``influence[:, j]`` over the test
points of the computed chunks, read one chunk at a time (memory: a few vectors of
``n_train``, whatever the number of test points). The headline use: the most harmful
training points on average (lowest mean influence) are the first suspects of mislabeling
or corruption; the most helpful ones (highest mean) are the prototypes.

``--by self`` ranks by the stored self-influence ``grad L(z_j)^T H^-1 grad L(z_j)`` instead
(``[output] self_influences = true`` writes it), highest first: the points the model had to
memorize. On the text example (``examples/transformers``, 10 of 200 labels flipped) it
finds the flipped labels with AUC 0.87 where the mean influence scores 0.14 (they rank among
the most *helpful*): use ``--by self`` to find mislabels.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click
import numpy as np

from ..errors import StoreError
from ..storage.completion import load_state
from ..storage.read import chunk_ranges, done_chunks, open_store, require_up_mode, store_info

__all__ = ["rank", "column_summary", "self_influence"]

ORDERS = ("harmful", "helpful")
STATISTICS = ("mean", "min", "max", "self")


def self_influence(group: Any, command: str = "rank --by self") -> np.ndarray:
    """The stored self-influence of each training point, ``(n_train,)`` float64, NaN where
    its train block is not computed yet.

    Raises:
        StoreError: the store has no self-influences (the job did not ask for them).
    """
    if "self_influences" not in group:
        raise StoreError(
            f"`{command}` needs self-influences and this store has none; set `self_influences = true` "
            "under [output] in the job file and run it again with --overwrite."
        )
    values = np.asarray(group["self_influences"][...], dtype=np.float64)
    state = load_state(group)
    if "self_influences" in state.values:
        done = state.done("self_influences")
        for j, (c0, c1) in enumerate(chunk_ranges(store_info(group)["train_block_sizes"])):
            if not done[j]:
                values[c0:c1] = np.nan
    return values


def column_summary(group: Any) -> dict[str, np.ndarray]:
    """Per training point, over the test points of the computed chunks: ``mean``, ``min``,
    ``max`` (each ``(n_train,)``, NaN where no chunk of the column is done) and ``count``
    (``(n_train,)`` test points seen)."""
    n_train = group["influences"].shape[1]
    total = np.zeros(n_train, dtype=np.float64)
    low = np.full(n_train, np.inf)
    high = np.full(n_train, -np.inf)
    count = np.zeros(n_train, dtype=np.int64)
    array = group["influences"]
    for _, _, (r0, r1), (c0, c1) in done_chunks(group):
        block = np.asarray(array[r0:r1, c0:c1], dtype=np.float64)
        total[c0:c1] += block.sum(axis=0)
        low[c0:c1] = np.minimum(low[c0:c1], block.min(axis=0))
        high[c0:c1] = np.maximum(high[c0:c1], block.max(axis=0))
        count[c0:c1] += r1 - r0
    seen = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(seen, total / np.maximum(count, 1), np.nan)
    return {
        "mean": mean,
        "min": np.where(seen, low, np.nan),
        "max": np.where(seen, high, np.nan),
        "count": count,
    }


def ranked(summary: dict[str, np.ndarray], by: str, order: str, n: int | None) -> np.ndarray:
    """Indices of the training points sorted by ``summary[by]``: lowest first for
    ``"harmful"``, highest first for ``"helpful"`` (``rank --by self`` asks for this); ties
    keep the lower index first; points without any computed chunk are left out. At most ``n``
    (all with ``None``)."""
    values = summary[by]
    seen = np.flatnonzero(~np.isnan(values))
    keys = values[seen] if order == "harmful" else -values[seen]  # "self": highest first
    picked = seen[np.argsort(keys, kind="stable")]
    return picked if n is None else picked[:n]


@click.command()
@click.argument("store", metavar="STORE")
@click.option(
    "--by",
    type=click.Choice(STATISTICS),
    default="mean",
    show_default=True,
    help="The statistic to rank by: mean, min or max influence over the test points, or self: the stored "
    "self-influence, highest first (finds mislabeled points; needs [output] self_influences = true).",
)
@click.option(
    "--order",
    type=click.Choice(ORDERS),
    default=None,
    help="harmful: lowest influence first (the default); helpful: highest first. Not with --by self.",
)
@click.option("-n", "top_n", type=click.IntRange(1), default=20, show_default=True, help="How many to list.")
@click.option("--all", "every", is_flag=True, help="List every training point (overrides -n).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True, help="Output."
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write to this file.")
def rank(store: str, by: str, order: str | None, top_n: int, every: bool, fmt: str, output: str | None) -> None:
    """Rank the training points of STORE by their influence over all test points.

    Positive influence means helpful: removing the training point would raise the test
    loss. By default the 20 most harmful points by mean influence are listed. To find
    mislabeled points use --by self (highest self-influence first): on the text example
    mislabels score AUC 0.87 by self-influence and 0.14 by mean influence.
    """
    from .output import one_line

    if by == "self" and order is not None:
        raise click.UsageError(
            "--by self lists the highest self-influence first (the suspects); drop --order, which ranks by "
            "influence on the test points (--by mean|min|max)."
        )
    order = order or "harmful"
    try:
        group = open_store(store)
        require_up_mode(group, "rank")
        selfs = self_influence(group) if by == "self" else None
        summary = column_summary(group)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    fields = ["rank", "index", "mean", "min", "max", "test_points"]
    if selfs is not None:
        summary["self"] = selfs
        fields.insert(2, "self_influence")
    n_test, n_train = group["influences"].shape[:2]
    picked = ranked(summary, by, "helpful" if by == "self" else order, None if every else top_n)
    rows = [
        {
            "rank": r,
            "index": int(j),
            **({"self_influence": float(summary["self"][j])} if selfs is not None else {}),
            "mean": float(summary["mean"][j]),
            "min": float(summary["min"][j]),
            "max": float(summary["max"][j]),
            "test_points": int(summary["count"][j]),
        }
        for r, j in enumerate(picked, 1)
    ]
    partial = int((summary["count"] < n_test).sum())
    if fmt == "json":
        text = json.dumps(
            {
                "store": store,
                "by": by,
                "order": "highest" if by == "self" else order,
                "n_test": n_test,
                "n_train": n_train,
                "rows": rows,
            },
            indent=2,
        )
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue().rstrip("\n")
    else:
        if by == "self":
            head = f"{len(rows)} highest self-influences (suspects of mislabeling) of {n_train:,} training points"
            head += f" (mean influence over {n_test:,} test points alongside):"
        else:
            title = "harmful (lowest" if order == "harmful" else "helpful (highest"
            head = f"{len(rows)} most {title} {by} influence) of {n_train:,} training points"
            head += f" over {n_test:,} test points:"
        extra = f"  {'self':>12}" if selfs is not None else ""
        lines = [head, f"{'rank':>5}  {'index':>10}{extra}  {'mean':>12}  {'min':>12}  {'max':>12}"]
        lines += [
            f"{row['rank']:>5}  {row['index']:>10}"
            + (f"  {row['self_influence']:>12.6g}" if selfs is not None else "")
            + f"  {row['mean']:>12.6g}  {row['min']:>12.6g}  {row['max']:>12.6g}"
            for row in rows
        ]
        text = "\n".join(lines)
    missing_self = int(np.isnan(selfs).sum()) if selfs is not None else 0
    if missing_self:
        click.echo(
            f"Warning: {missing_self:,} training point(s) have no self-influence computed yet (their train blocks "
            "are not done); rerun the job with --resume.",
            err=True,
        )
    if partial:
        click.echo(
            f"Warning: {partial:,} training point(s) have chunks not computed yet; their statistics cover "
            "the computed test points only.",
            err=True,
        )
    if output is None:
        click.echo(text)
    else:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        click.echo(f"Wrote {len(rows)} rows to {output}.")
