"""Find mislabeled training points in the wine data by their influence.

Trains a small MLP on scikit-learn's wine data with 10 flipped labels, computes the
influence of every training point on every test point, and writes a histogram of the mean
influence per training point with the flipped ones marked.

    python examples/wine_outliers.py --out wine_outliers.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dask_influence as di  # noqa: E402
from dask_influence.demo import rank_harmful, wine_outlier_problem  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="wine_outliers.png", help="where to write the PNG")
    parser.add_argument("--epochs", type=int, default=300, help="training epochs (fewer: faster, cruder)")
    args = parser.parse_args(argv)

    problem = wine_outlier_problem(epochs=args.epochs, dtype=torch.float64)
    solver = di.CgInfluence(problem.model, problem.loss, regularization=problem.regularization)
    solver.fit((problem.x_train, problem.y_train))
    influences = solver.influences(problem.x_test, problem.y_test, problem.x_train, problem.y_train)
    mean = influences.mean(dim=0).numpy()

    is_flipped = np.zeros(len(mean), dtype=bool)
    is_flipped[problem.flipped] = True
    found = int(is_flipped[rank_harmful(mean, len(problem.flipped))].sum())
    print(f"{found} of {is_flipped.sum()} flipped labels among the {len(problem.flipped)} most harmful points")

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(mean.min(), mean.max(), 40)
    ax.hist(mean[~is_flipped], bins=bins, label="clean labels", color="tab:blue", alpha=0.8)
    ax.hist(mean[is_flipped], bins=bins, label="flipped labels", color="tab:red", alpha=0.8)
    ax.set_xlabel("mean influence on the test set (negative = harmful)")
    ax.set_ylabel("training points")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return found / len(problem.flipped)


if __name__ == "__main__":
    main()
