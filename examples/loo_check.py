"""Check influences against retraining: predicted vs actual leave-one-out changes.

Trains a 2-8-1 tanh MLP on 60 two-dimensional points (binary cross-entropy plus an L2
penalty, L-BFGS to a tight optimum), then retrains it once without each training point
(warm-started from the full-data optimum). For every test point and every removed training
point, the change of the test loss predicted by the influence, ``influence[i, j] / n``, is
plotted against the change measured after retraining, with the line y = x.

    python examples/loo_check.py --out loo_check.png
    python examples/loo_check.py --small          # fewer retrainings, for the test suite

The training objective is ``mean BCE + (lambda / 2) |theta|^2``. Removing point ``j`` keeps
the other points' weights ``1 / n`` and the penalty, i.e. it up-weights ``j`` by ``-1/n``; the
solver gets ``regularization=lambda`` so that its ``H + lambda I`` is the Hessian of exactly
that objective.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import dask_influence as di  # noqa: E402
from dask_influence.demo import make_mlp  # noqa: E402

L2 = 0.02  # lambda: the penalty (lambda / 2) |theta|^2 of the training objective


def make_data(n_train: int, n_test: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Two overlapping Gaussian blobs in 2-D; targets are ``(n, 1)`` floats in {0, 1}."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, 2, size=n)
    centers = np.array([[-1.0, -0.5], [1.0, 0.5]])
    x = centers[y] + rng.normal(scale=0.9, size=(n, 2))
    x_t = torch.tensor(x, dtype=torch.float64)
    y_t = torch.tensor(y, dtype=torch.float64).unsqueeze(1)
    return x_t[:n_train], y_t[:n_train], x_t[n_train:], y_t[n_train:]


def objective(
    model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_j w_j L(z_j) + (L2 / 2) |theta|^2``: ``w_j = 1/n`` for the full fit, 0 for a removed point."""
    per_sample = loss(model(x), y).squeeze(1)  # loss built with reduction="none"
    penalty = sum((p**2).sum() for p in model.parameters())
    return (weights * per_sample).sum() + 0.5 * L2 * penalty


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
    """Minimize the objective with L-BFGS (strong Wolfe line search) to a tight tolerance."""
    loss = nn.BCEWithLogitsLoss(reduction="none")
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        history_size=50,
        tolerance_grad=1e-11,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective(model, loss, x, y, weights)
        value.backward()
        return value

    for _ in range(20):  # L-BFGS stops at max_iter; restart until the gradient is tiny
        opt.step(closure)
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        if grad.abs().max() < 1e-10:
            break


def test_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").squeeze(1).numpy()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="loo_check.png", help="where to write the PNG")
    parser.add_argument("--n-train", type=int, default=60, help="training points")
    parser.add_argument("--n-test", type=int, default=5, help="test points")
    parser.add_argument(
        "--retrain", type=int, default=None, help="retrain without only the first N training points (default: all)"
    )
    parser.add_argument(
        "--small",
        action="store_true",
        default=os.environ.get("DASK_INFLUENCE_EXAMPLE_SMALL") == "1",
        help="small settings for a quick check (also DASK_INFLUENCE_EXAMPLE_SMALL=1)",
    )
    args = parser.parse_args(argv)
    if args.small:
        args.n_test = min(args.n_test, 3)
        args.retrain = args.retrain or 20
    torch.set_num_threads(1)

    x, y, x_test, y_test = make_data(args.n_train, args.n_test)
    n = len(x)
    model = make_mlp((2, 8, 1), seed=0, dtype=torch.float64)
    full = torch.full((n,), 1.0 / n, dtype=torch.float64)
    train(model, x, y, full)
    theta = [p.detach().clone() for p in model.parameters()]
    base = test_losses(model, x_test, y_test)

    solver = di.DirectInfluence(model, nn.BCEWithLogitsLoss(), regularization=L2).fit((x, y))
    predicted = (solver.influences(x_test, y_test, x, y) / n).numpy()  # (n_test, n)

    removed = range(min(args.retrain or n, n))
    actual = np.empty((len(x_test), len(removed)))
    for j in removed:
        with torch.no_grad():  # warm start from the full-data optimum
            for p, t in zip(model.parameters(), theta):
                p.copy_(t)
        weights = full.clone()
        weights[j] = 0.0
        train(model, x, y, weights)
        actual[:, j] = test_losses(model, x_test, y_test) - base
    predicted = predicted[:, : len(removed)]
    pearson = float(np.corrcoef(predicted.ravel(), actual.ravel())[0, 1])
    print(
        f"Pearson correlation of predicted and retrained leave-one-out changes: {pearson:.4f} "
        f"({len(x_test)} test points x {len(removed)} removed training points)"
    )

    fig, ax = plt.subplots(figsize=(5, 5))
    for i in range(len(x_test)):
        ax.scatter(actual[i], predicted[i], s=14, alpha=0.8, label=f"test point {i}")
    lo = min(actual.min(), predicted.min())
    hi = max(actual.max(), predicted.max())
    pad = 0.05 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=1, label="y = x")
    ax.set_xlabel("actual change of test loss (retrained without the point)")
    ax.set_ylabel("predicted change, influence / n")
    ax.set_title(f"Leave-one-out check, Pearson {pearson:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return pearson


if __name__ == "__main__":
    main()
