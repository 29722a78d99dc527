"""``dask-influence rank STORE``: training points ranked by their influence over all test points.

Per training point ``j`` the mean, minimum and maximum of ``influence[:, j]`` over the test
points of the computed chunks, read one chunk at a time (memory: a few vectors of
``n_train``, whatever the number of test points). The headline use: the most harmful
training points on average (lowest mean influence) are the first suspects of mislabeling
or corruption; the most helpful ones (highest mean) are the prototypes.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click
import numpy as np

from ..storage.read import done_chunks, open_store, require_up_mode

__all__ = ["rank", "column_summary"]

ORDERS = ("harmful", "helpful")
STATISTICS = ("mean", "min", "max")


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
    ``"harmful"``, highest first for ``"helpful"``; ties keep the lower index first; points
    without any computed chunk are left out. At most ``n`` (all with ``None``)."""
    values = summary[by]
    seen = np.flatnonzero(~np.isnan(values))
    keys = values[seen] if order == "harmful" else -values[seen]
    picked = seen[np.argsort(keys, kind="stable")]
    return picked if n is None else picked[:n]


@click.command()
@click.argument("store", metavar="STORE")
@click.option(
    "--by", type=click.Choice(STATISTICS), default="mean", show_default=True, help="The statistic to rank by."
)
@click.option(
    "--order",
    type=click.Choice(ORDERS),
    default="harmful",
    show_default=True,
    help="harmful: lowest influence first; helpful: highest first.",
)
@click.option("-n", "top_n", type=click.IntRange(1), default=20, show_default=True, help="How many to list.")
@click.option("--all", "every", is_flag=True, help="List every training point (overrides -n).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True, help="Output."
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write to this file.")
def rank(store: str, by: str, order: str, top_n: int, every: bool, fmt: str, output: str | None) -> None:
    """Rank the training points of STORE by their influence over all test points.

    Positive influence means helpful: removing the training point would raise the test
    loss. By default the 20 most harmful points by mean influence (the first suspects of
    mislabeling) are listed.
    """
    from .run import one_line

    try:
        group = open_store(store)
        require_up_mode(group, "rank")
        summary = column_summary(group)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    n_test, n_train = group["influences"].shape[:2]
    picked = ranked(summary, by, order, None if every else top_n)
    rows = [
        {
            "rank": r,
            "index": int(j),
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
            {"store": store, "by": by, "order": order, "n_test": n_test, "n_train": n_train, "rows": rows}, indent=2
        )
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["rank", "index", "mean", "min", "max", "test_points"])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue().rstrip("\n")
    else:
        title = "harmful (lowest" if order == "harmful" else "helpful (highest"
        lines = [
            f"{len(rows)} most {title} {by} influence) of {n_train:,} training points over {n_test:,} test points:",
            f"{'rank':>5}  {'index':>10}  {'mean':>12}  {'min':>12}  {'max':>12}",
        ]
        lines += [
            f"{row['rank']:>5}  {row['index']:>10}  {row['mean']:>12.6g}  {row['min']:>12.6g}  {row['max']:>12.6g}"
            for row in rows
        ]
        text = "\n".join(lines)
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
