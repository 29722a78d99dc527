"""Which pixels of a training image push a test prediction: perturbation influence on digits.

Trains a small MLP on scikit-learn's 8x8 handwritten digits, ranks the training images by
their (up-weighting) influence on one test image, and computes the perturbation influence
``grad L(z_test)^T H^-1 d/dx grad L(z)`` of every training image: one value per pixel, of
shape ``(n_test, n_train, 8, 8)``. The figure shows the test image, its most helpful and
most harmful training images, and under each one its pixel influence map.

    python examples/feature_influence.py --out feature_influence.png
    python examples/feature_influence.py --small      # fewer images, for the test suite

Reading a map: a positive (red) pixel is one where making that training image brighter
would lower the test loss further (make the training image more helpful); a negative
(blue) pixel is one where brightening it would raise the test loss.
"""

from __future__ import annotations

import argparse
import os
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import dask_influence as di  # noqa: E402

REGULARIZATION = 0.01


class Result(NamedTuple):
    """What the example found, for a caller (or a test) to check."""

    shape: tuple[int, ...]
    """Shape of the perturbation influences: ``(n_test, n_train, 8, 8)``."""
    helpful_same_label: float
    """Fraction of the shown most helpful training images that have the test image's label."""
    accuracy: float
    """Test accuracy of the trained MLP."""


def load_digits(n_train: int, n_test: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Images ``(n, 8, 8)`` scaled to [0, 1] (float64) and labels ``(n,)``."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    images, labels = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images / 16.0, labels, train_size=n_train, test_size=n_test, random_state=seed, stratify=labels
    )
    as_x = lambda a: torch.tensor(a, dtype=torch.float64).reshape(-1, 8, 8)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def train_mlp(x: torch.Tensor, y: torch.Tensor, *, hidden: int, epochs: int, seed: int = 0) -> nn.Module:
    """A Flatten-64-hidden-10 tanh MLP, trained with Adam and weight decay (full batches)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=REGULARIZATION / 2)
    loss = nn.CrossEntropyLoss()
    for _ in range(epochs):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="feature_influence.png", help="where to write the PNG")
    parser.add_argument("--n-train", type=int, default=1000, help="training images")
    parser.add_argument("--n-test", type=int, default=50, help="test images")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units of the MLP")
    parser.add_argument("--epochs", type=int, default=300, help="training epochs")
    parser.add_argument("--test-index", type=int, default=0, help="which test image to explain")
    parser.add_argument("--show", type=int, default=4, help="helpful and harmful training images to show")
    parser.add_argument(
        "--small",
        action="store_true",
        default=os.environ.get("DASK_INFLUENCE_EXAMPLE_SMALL") == "1",
        help="small settings for a quick check (also DASK_INFLUENCE_EXAMPLE_SMALL=1)",
    )
    args = parser.parse_args(argv)
    if args.small:
        args.n_train, args.n_test, args.hidden, args.epochs = 300, 20, 8, 200
    torch.set_num_threads(1)

    x, y, x_test, y_test = load_digits(args.n_train, args.n_test)
    model = train_mlp(x, y, hidden=args.hidden, epochs=args.epochs)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    print(f"Trained a 64-{args.hidden}-10 MLP on {len(x)} digits; test accuracy {accuracy:.1%}.")

    solver = di.CgInfluence(model, nn.CrossEntropyLoss(), regularization=REGULARIZATION).fit((x, y))
    i = args.test_index
    xt, yt = x_test[i : i + 1], y_test[i : i + 1]
    factors = solver.influence_factors(xt, yt)  # (1, p), reused for both modes
    up = solver.influences_from_factors(factors, x, y, mode="up")[0].numpy()  # (n_train,)
    pixels = solver.influences_from_factors(factors, x, y, mode=di.InfluenceMode.perturbation)
    print(f"Perturbation influences: {tuple(pixels.shape)} (test images, training images, 8, 8)")

    order = np.argsort(up, kind="stable")
    helpful, harmful = order[::-1][: args.show].copy(), order[: args.show].copy()
    labels = y.numpy()
    same = float(np.mean(labels[helpful] == int(yt[0])))
    print(
        f"Test image {i} (label {int(yt[0])}): most helpful training images {helpful.tolist()} "
        f"(labels {labels[helpful].tolist()}), most harmful {harmful.tolist()} (labels {labels[harmful].tolist()})"
    )

    _plot(args.out, xt[0].numpy(), int(yt[0]), x.numpy(), labels, up, pixels[0].numpy(), helpful, harmful)
    print(f"wrote {args.out}")
    return Result(tuple(pixels.shape), same, accuracy)


def _plot(
    out: str,
    test_image: np.ndarray,
    test_label: int,
    images: np.ndarray,
    labels: np.ndarray,
    up: np.ndarray,
    maps: np.ndarray,
    helpful: np.ndarray,
    harmful: np.ndarray,
) -> None:
    """Rows: helpful images, their pixel maps, harmful images, their pixel maps; test image left."""
    k = len(helpful)
    fig, axes = plt.subplots(4, k + 1, figsize=(1.8 * (k + 1), 7.6))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[1:, 0]:
        ax.axis("off")
    axes[0, 0].imshow(test_image, cmap="gray_r", vmin=0, vmax=1)
    axes[0, 0].set_title(f"test image\nlabel {test_label}", fontsize=9)
    scale = float(np.abs(maps[np.concatenate([helpful, harmful])]).max()) or 1.0
    for row, (kind, chosen) in enumerate((("helpful", helpful), ("harmful", harmful))):
        for col, j in enumerate(chosen, start=1):
            image_ax, map_ax = axes[2 * row, col], axes[2 * row + 1, col]
            image_ax.imshow(images[j], cmap="gray_r", vmin=0, vmax=1)
            image_ax.set_title(f"{kind} #{j}\nlabel {labels[j]}, {up[j]:+.2f}", fontsize=8)
            shown = map_ax.imshow(maps[j], cmap="RdBu_r", vmin=-scale, vmax=scale)
            map_ax.set_title("pixel influence", fontsize=8)
    fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), shrink=0.5, label="perturbation influence")
    fig.suptitle("Training images that help or hurt one test prediction, and which of their pixels matter")
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
