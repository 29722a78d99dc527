"""``dask-influence demo``: find flipped labels in the wine data, on an embedded LocalCluster.

The README's main job: train a small MLP on wine with flipped labels, fit a solver, compute
the influence matrix block by block on Dask (an embedded LocalCluster unless a scheduler is
given), write it to a zarr store, and read the most harmful training points back from it.
"""

from __future__ import annotations

import time

import click
import numpy as np

from ..core.solvers.registry import SOLVERS, solver_class


@click.command()
@click.option(
    "--out",
    "store",
    default="influences.zarr",
    show_default=True,
    help="Path of the zarr store to write (replaced if it exists).",
)
@click.option(
    "--solver",
    type=click.Choice(list(SOLVERS)),
    default="direct",
    show_default=True,
    help="Which solver computes the influences.",
)
@click.option(
    "--flipped",
    "n_flipped",
    type=click.IntRange(0, 50),
    default=10,
    show_default=True,
    help="How many training labels to flip.",
)
@click.option(
    "--top",
    type=click.IntRange(1, 100),
    default=10,
    show_default=True,
    help="How many of the most harmful training points to list.",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=None,
    help="Workers of the embedded LocalCluster (default: one per core).",
)
@click.option(
    "--scheduler",
    default=None,
    envvar="DASK_SCHEDULER_ADDRESS",
    help="Address of a running Dask scheduler (default: an embedded LocalCluster).",
)
@click.option("--sequential", is_flag=True, help="Run in this process without a cluster.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and training.")
@click.option("--epochs", type=click.IntRange(1), default=300, show_default=True, help="Training epochs.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def demo(
    store: str,
    solver: str,
    n_flipped: int,
    top: int,
    workers: int | None,
    scheduler: str | None,
    sequential: bool,
    seed: int,
    epochs: int,
    quiet: bool,
) -> None:
    """Train an MLP on wine with flipped labels and rank training points by influence.

    Each training point's mean influence over the test set says how much it helps
    (positive) or hurts (negative) the test loss; mislabeled points should be the most
    harmful.
    """
    import torch
    import zarr
    from torch.utils.data import DataLoader, TensorDataset

    import dask_influence as di

    from ..demo import rank_harmful, wine_outlier_problem
    from .output import show_log_lines

    start = time.perf_counter()
    show_log_lines(quiet)  # every pass as a line with counts, rate and ETA, as the other commands show it
    problem = wine_outlier_problem(n_flipped=n_flipped, epochs=epochs, seed=seed, dtype=torch.float64)
    accuracy = float((problem.model(problem.x_test).argmax(1) == problem.y_test).double().mean())
    click.echo(
        f"Trained a 13-16-16-3 MLP on {len(problem.x_train)} wine samples "
        f"({n_flipped} labels flipped); test accuracy {accuracy:.1%}."
    )
    cls = solver_class(solver)
    kwargs = {"rank": 30} if "rank" in cls.config_class.field_names() else {}  # low-rank solvers
    model = cls(problem.model, problem.loss, regularization=problem.regularization, **kwargs)
    train = DataLoader(TensorDataset(problem.x_train, problem.y_train), batch_size=32)
    test = DataLoader(TensorDataset(problem.x_test, problem.y_test), batch_size=16)
    model.fit(train)

    calc: di.SequentialInfluenceCalculator | di.DaskInfluenceCalculator
    if sequential:
        calc = di.SequentialInfluenceCalculator(model, progress=not quiet)
        where = "in this process"
    else:
        client = None
        if scheduler:
            from distributed import Client

            client = Client(scheduler)
        calc = di.DaskInfluenceCalculator(model, client, progress=not quiet, n_workers=workers)
        where = f"on the scheduler at {scheduler}" if scheduler else "on an embedded LocalCluster"
    from contextlib import nullcontext

    from ..job.cluster import _quiet_dask_logs

    # an embedded cluster's teardown logs (heartbeats to a closing scheduler) stay out of the output
    with nullcontext() if sequential else _quiet_dask_logs():
        group = calc.influences_to_zarr(test, train, store, overwrite=True, top_k=top)
        if client := getattr(calc, "client", None):
            client.close()

    influences = group["influences"]
    assert isinstance(influences, zarr.Array)
    mean = np.asarray(influences[...]).mean(axis=0)
    ranked = rank_harmful(mean, top)
    flipped = set(problem.flipped.tolist())
    click.echo(
        f"\nWrote {store}: influences {influences.shape} in {influences.chunks} chunks by {cls.__name__} {where}."
    )
    click.echo("Most harmful training points (lowest mean influence), read back from the store:")
    click.echo(f"{'rank':>4}  {'index':>5}  {'mean influence':>15}  label")
    for rank, idx in enumerate(ranked, 1):
        click.echo(f"{rank:>4}  {idx:>5}  {mean[idx]:>15.4f}  {'flipped' if idx in flipped else ''}")
    found = len(flipped & set(ranked.tolist()))
    others = np.delete(mean, list(flipped))
    click.echo(
        f"\n{found} of the {len(flipped)} flipped labels are among the {top} most harmful points "
        f"(mean influence of flipped {np.mean(mean[list(flipped)]) if flipped else float('nan'):.3f}, "
        f"of the others {np.mean(others):.3f}). Took {time.perf_counter() - start:.1f} s."
    )
