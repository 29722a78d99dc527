"""Perturbation influences against central finite differences of up-weighting influences.

For fixed influence factors ``f_i = (H + lambda I)^-1 grad L(z_test_i)`` the up-weighting
influence of a training point is ``f_i . grad_theta L(x_j, y_j)``, a smooth function of the
training input ``x_j``; the perturbation influence is its derivative in ``x_j``. Sample
gradients are independent across samples, so shifting feature ``k`` of EVERY training
input at once and differencing gives column ``[:, :, k]`` for all samples in two calls.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dask_influence as di
from cases import classification_data, loader, regression_data, rel_err, tanh_mlp

EPS = 1e-5


def _finite_difference(m, factors, x, y):
    """``(n_test, n, *x.shape[1:])`` by central differences of mode-"up" influences."""
    n, features = x.shape[0], x.shape[1:]
    columns = []
    for k in range(features.numel()):
        step = torch.zeros(n, features.numel(), dtype=x.dtype)
        step[:, k] = EPS
        step = step.view(x.shape)
        plus = m.influences_from_factors(factors, x + step, y, mode="up")
        minus = m.influences_from_factors(factors, x - step, y, mode="up")
        columns.append((plus - minus) / (2 * EPS))
    return torch.stack(columns, dim=-1).reshape(factors.shape[0], n, *features)


def _check(m, x_test, y_test, x, y, *, tol=1e-6):
    factors = m.influence_factors(x_test, y_test)
    expected = _finite_difference(m, factors, x, y)
    actual = m.influences(x_test, y_test, x, y, mode="perturbation")
    assert actual.shape == (x_test.shape[0], x.shape[0], *x.shape[1:])
    assert actual.dtype == torch.float64
    err = rel_err(actual, expected)
    assert err < tol, f"perturbation vs finite differences: relative error {err:.2e}"
    from_factors = m.influences_from_factors(factors, x, y, mode=di.InfluenceMode.perturbation)
    assert torch.equal(from_factors, actual)
    return err


# 2 test points < 3 input features (reverse mode in x) and 5 > 3 (forward mode in x)
@pytest.mark.parametrize("n_test", [2, 5])
def test_mlp_mse(mlp_regression, n_test):
    model, mse, x, y, _, _ = mlp_regression
    xt, yt = regression_data(n_test, 3, seed=9)
    m = di.DirectInfluence(model, mse, regularization=3.0, chunk_size=7).fit(loader(x, y, 10))
    _check(m, xt, yt, x, y)


@pytest.mark.parametrize("n_test", [2, 5])
def test_mlp_cross_entropy(mlp_classification, n_test):
    model, ce, x, y, xt, yt = mlp_classification
    m = di.DirectInfluence(model, ce, regularization=1.0).fit(loader(x, y, 10))
    _check(m, xt[:n_test], yt[:n_test], x, y)


def test_two_dimensional_features():
    x, y = classification_data(20, 6, 3, seed=12)
    x = x.view(20, 2, 3)
    model = tanh_mlp(6, 4, 3, seed=12, flatten=True)
    m = di.CgInfluence(model, nn.CrossEntropyLoss(), regularization=1.0).fit(loader(x[:16], y[:16], 5))
    _check(m, x[16:], y[16:], x[:16], y[:16])
    # and a train block of one sample keeps its feature dimensions
    one = m.influences(x[16:], y[16:], x[:1], y[:1], mode="perturbation")
    assert one.shape == (4, 1, 2, 3)


def test_linear_regression_closed_form():
    """Ridge: d/dx_j of f . 2 x_j (x_j^T w - y_j) = 2 [(x_j^T w - y_j) f + (f . x_j) w]."""
    x, y = regression_data(30, 4, seed=13)
    model = nn.Linear(4, 1, bias=False).double().eval()
    m = di.DirectInfluence(model, nn.MSELoss(), regularization=0.1).fit((x[:25], y[:25]))
    factors = m.influence_factors(x[25:], y[25:])  # (5, 4)
    w = model.weight.detach()[0]
    resid = x[:25] @ w - y[:25, 0]  # (25,)
    expected = 2 * (resid[None, :, None] * factors[:, None, :] + (factors @ x[:25].T)[:, :, None] * w)
    actual = m.influences_from_factors(factors, x[:25], y[:25], mode="perturbation")
    assert rel_err(actual, expected) < 1e-12
