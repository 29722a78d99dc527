"""Accuracy and time of every solver on the wine outlier problem, side by side in one run.

    python -m benchmarks.wine_solvers [--seed 0] [--repeats 3] [--json out.json]

Each solver's mean influence per training point is compared with DirectInfluence's
(Pearson, Spearman) and used to find the flipped labels (ROC-AUC). Times are the median of
``--repeats`` runs of fit and of the influence phase, alternating solvers within a round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

import dask_influence as di
from dask_influence.demo import wine_outlier_problem


def solvers(problem):
    """name -> factory of a fresh solver with the settings the docs' table uses."""
    m, loss, lam = problem.model, problem.loss, problem.regularization
    return {
        "Direct": lambda: di.DirectInfluence(m, loss, regularization=lam),
        "CG": lambda: di.CgInfluence(m, loss, regularization=lam),
        "CG + Nystroem preconditioner": lambda: di.CgInfluence(m, loss, regularization=lam, preconditioner="nystroem"),
        "LiSSA (full batches)": lambda: di.LissaInfluence(
            m, loss, regularization=lam, maxiter=5000, rtol=1e-7, batch_size=len(problem.x_train)
        ),
        "Arnoldi rank 30": lambda: di.ArnoldiInfluence(m, loss, regularization=lam, rank=30),
        "Nystroem rank 30": lambda: di.NystroemSketchInfluence(m, loss, regularization=lam, rank=30),
        "K-FAC": lambda: di.EkfacInfluence(m, loss, regularization=lam, update_diagonal=False),
        "EK-FAC": lambda: di.EkfacInfluence(m, loss, regularization=lam),
    }


def measure(factory, problem):
    train = (problem.x_train, problem.y_train)
    t0 = time.perf_counter()
    solver = factory().fit(train)
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", di.ConvergenceWarning)
        influences = solver.influences(problem.x_test, problem.y_test, *train)
    t2 = time.perf_counter()
    return influences.mean(dim=0).numpy(), t1 - t0, t2 - t1


def run(seed: int = 0, repeats: int = 3) -> list[dict]:
    problem = wine_outlier_problem(dtype=torch.float64, seed=seed)
    factories = solvers(problem)
    times = {name: ([], []) for name in factories}
    means = {}
    for _ in range(repeats):
        for name, factory in factories.items():
            mean, fit_s, infl_s = measure(factory, problem)
            means[name] = mean
            times[name][0].append(fit_s)
            times[name][1].append(infl_s)
    labels = np.zeros(len(problem.x_train))
    labels[problem.flipped] = 1
    reference = means["Direct"]
    rows = []
    for name, mean in means.items():
        rows.append(
            {
                "solver": name,
                "pearson": float(pearsonr(mean, reference)[0]),
                "spearman": float(spearmanr(mean, reference)[0]),
                "auc": float(roc_auc_score(labels, -mean)),
                "fit_s": statistics.median(times[name][0]),
                "influence_s": statistics.median(times[name][1]),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| solver | Pearson | Spearman | AUC | fit (s) | influences (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['solver']} | {r['pearson']:.4f} | {r['spearman']:.4f} | {r['auc']:.3f} | "
            f"{r['fit_s']:.3f} | {r['influence_s']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.seed, args.repeats)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "torch": torch.__version__, "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
