"""``dask-influence top STORE --test I``: the most helpful and most harmful training points.

Read from the stored top-k arrays when the store has them (``[output] top_k``) for the test
point's block and they hold at least ``-k`` entries; otherwise ranked from row ``I`` of the
influence matrix, read one chunk at a time. Ties keep the lower index first, as in the
stored arrays.
"""

from __future__ import annotations

import json
from typing import Any

import click
import numpy as np

from ..errors import StoreError
from .inspect import chunk_ranges, open_store, require_up_mode, store_info


def top_of_row(group: Any, test: int, k: int) -> dict:
    """The ``k`` most helpful and harmful training points of test point ``test``.

    Returns a dict with ``helpful`` and ``harmful`` (lists of ``(index, value)``, most
    extreme first), ``source`` (``"stored top-k"`` or ``"influence row"``) and
    ``missing_train_blocks`` (train blocks of the row not computed yet).
    """
    info = store_info(group)
    n_test, n_train = group["influences"].shape[:2]
    if not 0 <= test < n_test:
        raise StoreError(f"--test must be a test index from 0 to {n_test - 1}; got {test}.")
    rows = chunk_ranges(info["test_block_sizes"])
    block = next(i for i, (r0, r1) in enumerate(rows) if r0 <= test < r1)
    k = min(k, n_train)
    stored_k = info.get("config", {}).get("top_k") or 0
    if stored_k >= k and "topk_done" in group and int(group["topk_done"][block]) == 1:
        out = {"source": f"stored top-k (k={stored_k})", "missing_train_blocks": 0}
        for kind in ("helpful", "harmful"):
            idx = np.asarray(group[f"top_{kind}_indices"][test, :k])
            val = np.asarray(group[f"top_{kind}_values"][test, :k])
            out[kind] = [(int(i), float(v)) for i, v in zip(idx, val) if i >= 0]
        return out
    done = np.asarray(group["influences_done"][block]) == 1
    array = group["influences"]
    values = np.full(n_train, np.nan)
    for j, (c0, c1) in enumerate(chunk_ranges(info["train_block_sizes"])):
        if done[j]:
            values[c0:c1] = np.asarray(array[test, c0:c1])
    valid = np.nonzero(~np.isnan(values))[0]
    if valid.size == 0:
        raise StoreError(f"No influences of test point {test} are computed yet; run the job with --resume.")
    vals = values[valid]
    out = {"source": "influence row", "missing_train_blocks": int((~done).sum())}
    for kind, sign in (("helpful", -1.0), ("harmful", 1.0)):
        order = np.argsort(sign * vals, kind="stable")[:k]
        out[kind] = [(int(valid[o]), float(vals[o])) for o in order]
    return out


@click.command()
@click.argument("store", metavar="STORE")
@click.option("--test", "test", type=int, required=True, metavar="I", help="Index of the test point.")
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True, help="How many of each to list.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def top(store: str, test: int, k: int, as_json: bool) -> None:
    """List the most helpful and most harmful training points for test point I.

    Positive influence means helpful: removing the training point would raise the loss on
    the test point. Values come from the stored top-k arrays when present.
    """
    from .run import one_line

    try:
        group = open_store(store)
        require_up_mode(group, "top")
        result = top_of_row(group, test, k)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    n_test, n_train = group["influences"].shape[:2]
    if as_json:
        click.echo(json.dumps({"store": store, "test": test, "k": k, **{
            key: ([{"index": i, "influence": v} for i, v in value] if key in ("helpful", "harmful") else value)
            for key, value in result.items()}}, indent=2))
        return
    click.echo(f"Test point {test} of {n_test:,}; {n_train:,} training points; from the {result['source']}.")
    if result["missing_train_blocks"]:
        click.echo(f"Warning: {result['missing_train_blocks']} train block(s) of this row are not computed yet; "
                   "ranking the computed ones.", err=True)
    for kind, title in (("helpful", "Most helpful (highest influence)"), ("harmful", "Most harmful (lowest influence)")):
        click.echo(f"\n{title}:")
        click.echo(f"{'rank':>4}  {'index':>10}  {'influence':>14}")
        for rank, (index, value) in enumerate(result[kind], 1):
            click.echo(f"{rank:>4}  {index:>10}  {value:>14.6g}")
