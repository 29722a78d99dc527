"""``dask-influence top STORE --test I``: the most helpful and most harmful training points.

Read from the stored top-k arrays when the store has them (``[output] top_k``) for the test
point's block and they hold at least ``-k`` entries; otherwise ranked from row ``I`` of the
influence matrix, read one chunk at a time. Ties keep the lower index first, as in the
stored arrays. The reading is :func:`dask_influence.storage.read.top_of_row` (re-exported here).
"""

from __future__ import annotations

import json

import click

from ..storage.read import open_store, require_up_mode, top_of_row

__all__ = ["top", "top_of_row"]


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
    from .output import one_line

    try:
        group = open_store(store)
        require_up_mode(group, "top")
        result = top_of_row(group, test, k)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    n_test, n_train = group["influences"].shape[:2]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "store": store,
                    "test": test,
                    "k": k,
                    **{
                        key: (
                            [{"index": i, "influence": v} for i, v in value] if key in ("helpful", "harmful") else value
                        )
                        for key, value in result.items()
                    },
                },
                indent=2,
            )
        )
        return
    click.echo(f"Test point {test} of {n_test:,}; {n_train:,} training points; from the {result['source']}.")
    if result["missing_train_blocks"]:
        click.echo(
            f"Warning: {result['missing_train_blocks']} train block(s) of this row are not computed yet; "
            "ranking the computed ones.",
            err=True,
        )
    for kind, title in (
        ("helpful", "Most helpful (highest influence)"),
        ("harmful", "Most harmful (lowest influence)"),
    ):
        click.echo(f"\n{title}:")
        click.echo(f"{'rank':>4}  {'index':>10}  {'influence':>14}")
        for rank, (index, value) in enumerate(result[kind], 1):
            click.echo(f"{rank:>4}  {index:>10}  {value:>14.6g}")
