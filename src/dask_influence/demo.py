"""The wine outlier problem: the README's main job and a shared accuracy benchmark.

scikit-learn's bundled wine data (178 samples, 13 features, 3 classes) is split 60/30/10
into train/test/validation, features are scaled to [0, 1] on the training split, and the
labels of the first ``n_flipped`` training points are shifted to the next class. A
13-16-16-3 tanh MLP is trained with Adam (lr 0.005, weight decay 0.01, 300 epochs, cosine
schedule, batches of 32). The mislabeled points should then have the lowest mean influence
on the test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class WineProblem:
    """A trained model with its data; tensors are in the model's dtype (targets int64).

    Attributes:
        model: the trained MLP, in eval mode.
        loss: ``nn.CrossEntropyLoss()`` (mean reduction).
        x_train, y_train: ``(n_train, 13)`` and ``(n_train,)``; the first ``len(flipped)``
            labels are flipped.
        x_test, y_test: ``(n_test, 13)`` and ``(n_test,)``.
        flipped: indices of the flipped training points.
        regularization: the regularization this setting is meant for (0.1).
    """

    model: nn.Module
    loss: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    flipped: np.ndarray
    regularization: float = 0.1


def make_mlp(
    sizes: tuple[int, ...] = (13, 16, 16, 3), *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Sequential:
    """A tanh MLP with the given layer sizes."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def wine_outlier_problem(
    *,
    n_flipped: int = 10,
    epochs: int = 300,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> WineProblem:
    """Build and train the wine outlier problem (a few seconds on a CPU)."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    x, y = load_wine(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, train_size=0.6, random_state=seed, stratify=y)
    x_test, _, y_test, _ = train_test_split(x_rest, y_rest, train_size=0.75, random_state=seed, stratify=y_rest)
    lo, hi = x_train.min(axis=0), x_train.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    x_train = (x_train - lo) / span
    x_test = (x_test - lo) / span
    y_train = y_train.copy()
    y_train[:n_flipped] = (y_train[:n_flipped] + 1) % 3

    xt = torch.tensor(x_train, dtype=dtype)
    yt = torch.tensor(y_train, dtype=torch.long)
    model = make_mlp(seed=seed, dtype=dtype)
    loss = nn.CrossEntropyLoss()
    _train(model, loss, xt, yt, epochs=epochs, seed=seed)
    model.eval()
    return WineProblem(
        model=model,
        loss=loss,
        x_train=xt,
        y_train=yt,
        x_test=torch.tensor(x_test, dtype=dtype),
        y_test=torch.tensor(y_test, dtype=torch.long),
        flipped=np.arange(n_flipped),
    )


def _train(model: nn.Module, loss: nn.Module, x: Tensor, y: Tensor, *, epochs: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.005, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], 32):
            idx = order[start : start + 32]
            opt.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()


def rank_harmful(mean_influence: np.ndarray, k: int = 10) -> np.ndarray:
    """Indices of the ``k`` training points with the lowest (most harmful) mean influence."""
    return np.argsort(mean_influence, kind="stable")[:k]
