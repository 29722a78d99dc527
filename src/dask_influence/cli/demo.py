"""``dask-influence demo``: find flipped labels in the wine data by their influence."""

from __future__ import annotations

import time

import click
import numpy as np

SOLVERS = ("direct", "cg", "lissa")


@click.command()
@click.option("--solver", type=click.Choice(SOLVERS), default="direct", show_default=True,
              help="Which solver computes the influences.")
@click.option("--flipped", "n_flipped", type=click.IntRange(0, 50), default=10, show_default=True,
              help="How many training labels to flip.")
@click.option("--top", type=click.IntRange(1, 100), default=10, show_default=True,
              help="How many of the most harmful training points to list.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and training.")
@click.option("--epochs", type=click.IntRange(1), default=300, show_default=True, help="Training epochs.")
def demo(solver: str, n_flipped: int, top: int, seed: int, epochs: int) -> None:
    """Train an MLP on wine with flipped labels and rank training points by influence.

    Each training point's mean influence over the test set says how much it helps
    (positive) or hurts (negative) the test loss; mislabeled points should be the most
    harmful.
    """
    import torch

    import dask_influence as di
    from ..demo import rank_harmful, wine_outlier_problem

    start = time.perf_counter()
    problem = wine_outlier_problem(n_flipped=n_flipped, epochs=epochs, seed=seed, dtype=torch.float64)
    accuracy = float((problem.model(problem.x_test).argmax(1) == problem.y_test).double().mean())
    click.echo(
        f"Trained a 13-16-16-3 MLP on {len(problem.x_train)} wine samples "
        f"({n_flipped} labels flipped); test accuracy {accuracy:.1%}."
    )
    cls = {"direct": di.DirectInfluence, "cg": di.CgInfluence, "lissa": di.LissaInfluence}[solver]
    model = cls(problem.model, problem.loss, regularization=problem.regularization)
    model.fit((problem.x_train, problem.y_train))
    influences = model.influences(problem.x_test, problem.y_test, problem.x_train, problem.y_train)
    mean = influences.mean(dim=0).cpu().numpy()
    ranked = rank_harmful(mean, top)
    flipped = set(problem.flipped.tolist())

    click.echo(f"\nInfluence matrix {tuple(influences.shape)} by {cls.__name__}. "
               f"Most harmful training points (lowest mean influence):")
    click.echo(f"{'rank':>4}  {'index':>5}  {'mean influence':>15}  label")
    for rank, idx in enumerate(ranked, 1):
        note = "flipped" if idx in flipped else ""
        click.echo(f"{rank:>4}  {idx:>5}  {mean[idx]:>15.4f}  {note}")
    found = len(flipped & set(ranked.tolist()))
    click.echo(f"\n{found} of the {len(flipped)} flipped labels are among the {top} most harmful points "
               f"(mean influence of flipped {np.mean(mean[list(flipped)]) if flipped else float('nan'):.3f}, "
               f"of the others {np.mean(np.delete(mean, list(flipped))):.3f}). "
               f"Took {time.perf_counter() - start:.1f} s.")
