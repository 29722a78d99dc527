"""The benchmark problems: data, a trained model, and the lower bound of the influence phase.

Synthetic classification data has 64 standard normal features and 10 classes labelled by a
random teacher network (with 10% of the labels redrawn at random); ``cnn-digits`` uses
scikit-learn's 8x8 digits (1,797 images, so its training set is at most 1,597 points).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .models import N_CLASSES, N_FEATURES, build_model, loss_fn


@dataclass
class Problem:
    name: str
    model: nn.Module
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_accuracy: float
    test_accuracy: float

    @property
    def n_train(self) -> int:
        return len(self.x_train)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    teacher = np.random.default_rng(12345)  # the same labelling function for every seed
    w1 = teacher.standard_normal((N_FEATURES, 32)) / np.sqrt(N_FEATURES)
    w2 = teacher.standard_normal((32, N_CLASSES))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    flip = rng.random(n) < 0.1
    y[flip] = rng.integers(0, N_CLASSES, int(flip.sum()))
    return x, y.astype(np.int64)


def digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def make_problem(model_name: str, n_train: int, n_test: int, *, seed: int = 0, epochs: int | None = None) -> Problem:
    """Data and a model trained on it (AdamW, weight decay), in eval mode, float32."""
    if model_name == "cnn-digits":
        x, y = digits(seed)
        n_train = min(n_train, len(x) - n_test)
        x_train, y_train, x_test, y_test = (
            x[:n_train],
            y[:n_train],
            x[n_train : n_train + n_test],
            y[n_train : n_train + n_test],
        )
    else:
        x_train, y_train = synthetic(n_train, seed)
        x_test, y_test = synthetic(n_test, seed + 1000)
    torch.manual_seed(seed)
    model = build_model(model_name)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    loss = loss_fn()
    # about 30,000 sample-steps per 1,000 parameters would be plenty; cap the work
    epochs = epochs or max(3, min(40, 80_000 // n_train))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), 128):
            idx = perm[s : s + 128]
            opt.zero_grad()
            loss(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        train_acc = float((model(xt).argmax(1) == yt).float().mean())
        test_acc = float((model(torch.from_numpy(x_test)).argmax(1) == torch.from_numpy(y_test)).float().mean())
    return Problem(model_name, model, x_train, y_train, x_test, y_test, train_acc, test_acc)


# -- the lower bound --------------------------------------------------------------------------
def lower_bound(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    chunk: int = 1024,
) -> tuple[dict, Tensor]:
    """The time of the influence phase without any Hessian work.

    Per-sample gradients of every test and train point with ``torch.func`` (vmap of grad,
    ``chunk`` samples per call), flattened into rows, and the product
    ``test_grads @ train_grads.T``. Train gradients are multiplied chunk by chunk into the
    preallocated ``(n_test, n_train)`` result, so memory stays ``O(chunk * p)`` (the single
    product, done in column blocks: the same flops).

    Returns ``({"test_grads_s", "scoring_s", "total_s"}, result)``.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = loss_fn()

    def sample_loss(p: dict, x: Tensor, y: Tensor) -> Tensor:
        return loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def flat_grads(x: Tensor, y: Tensor) -> Tensor:
        g = per_sample(params, x, y)
        return torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], dim=1)

    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    start = time.perf_counter()
    test = torch.cat(
        [
            flat_grads(torch.from_numpy(x_test[s : s + chunk]), torch.from_numpy(y_test[s : s + chunk]))
            for s in range(0, len(x_test), chunk)
        ]
    )
    mid = time.perf_counter()
    out = torch.empty(len(x_test), len(x_train), dtype=test.dtype)
    for s in range(0, len(xs), chunk):
        torch.mm(test, flat_grads(xs[s : s + chunk], ys[s : s + chunk]).T, out=out[:, s : s + chunk])
    end = time.perf_counter()
    return {"test_grads_s": mid - start, "scoring_s": end - mid, "total_s": end - start}, out
