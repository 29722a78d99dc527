"""Tiny seeded data and model makers and independent reference computations for the tests.

A plain module (not a conftest, so ``from influence_reference import ...`` is unambiguous
even with several ``conftest.py`` files in the tree); ``tests/`` is on ``sys.path`` because
pytest inserts the directory of ``tests/conftest.py``. Everything is deliberately small (a few
dozen samples, a few dozen parameters, float64) so that the core suite runs fast on two CPU
cores.

The reference functions below do NOT use the library: they build the dense Hessian with
``torch.autograd.functional.hessian`` and per-sample gradients with plain
``torch.autograd.grad`` in a Python loop, so they are an independent ground truth for
models that have no closed form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


# -- comparisons -------------------------------------------------------------------------
def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (both as float64)."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return float((actual - expected).abs().max() / expected.abs().max())


def pearson(a: Tensor, b: Tensor) -> float:
    a = torch.as_tensor(a).double().flatten()
    b = torch.as_tensor(b).double().flatten()
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# -- data and models ---------------------------------------------------------------------
def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    """A non-shuffling DataLoader over ``(x, y)``."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def regression_data(n: int, d: int, *, seed: int = 0, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """Well-conditioned float64 regression data: ``x (n, d)``, ``y (n, 1)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = x @ w + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def classification_data(n: int, d: int, c: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """float64 inputs ``(n, d)`` and long labels ``(n,)`` from a noisy linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    logits = x @ w + 1.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return x, logits.argmax(dim=1)


def tanh_mlp(d_in: int, hidden: int, d_out: int, *, seed: int = 0, flatten: bool = False) -> nn.Module:
    """A tiny float64 tanh MLP in eval mode (optionally flattening a multi-dim input first)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers).double().eval()


def train_lbfgs(
    model: nn.Module,
    objective: Callable[[], Tensor],
    *,
    max_iter: int = 500,
    tolerance_grad: float = 1e-12,
) -> None:
    """Minimize ``objective()`` over the trainable parameters of ``model`` with L-BFGS."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)


# -- independent references --------------------------------------------------------------
def _trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
    return [k for k, _ in named], [v for _, v in named]


def reference_grads(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients ``(n, p)`` by a plain loop of ``torch.autograd.grad``."""
    _, params = _trainable(model)
    rows = []
    for i in range(x.shape[0]):
        value = loss(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(value, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach()


def reference_hessian(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> Tensor:
    """Dense Hessian ``(p, p)`` of the MEAN per-sample loss over all of ``(x, y)``."""
    names, params = _trainable(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    others = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    buffers = dict(model.named_buffers())

    def mean_loss(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, sizes)
        state = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        state.update(others)
        state.update(buffers)
        n = x.shape[0]
        total = 0
        for i in range(n):
            out = torch.func.functional_call(model, state, (x[i : i + 1],))
            total = total + loss(out, y[i : i + 1])
        return total / n

    hess = torch.autograd.functional.hessian(mean_loss, theta0)
    return 0.5 * (hess + hess.T)


def reference_influences(
    model: nn.Module,
    loss: Callable,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    x: Tensor | None = None,
    y: Tensor | None = None,
    *,
    regularization: float,
) -> Tensor:
    """``grad L(test)^T (H + reg I)^-1 grad L(x, y)`` ``(n_test, n)`` with ``H`` from the training set."""
    if x is None:
        x, y = x_train, y_train
    hess = reference_hessian(model, loss, x_train, y_train).double()
    hess = hess + regularization * torch.eye(hess.shape[0], dtype=torch.float64)
    g_test = reference_grads(model, loss, x_test, y_test).double()
    g = reference_grads(model, loss, x, y).double()
    return g_test @ torch.linalg.solve(hess, g.T)
