"""Exactness against closed forms: ridge regression and multinomial logistic regression.

For these models the Hessian of the mean training loss and the per-sample gradients are
known in closed form, so the influence matrix ``G_test (H + lambda I)^-1 G^T`` can be
computed without autograd and compared with every solver. Errors are relative to the
largest entry: ``max |actual - exact| / max |exact|``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import dask_influence as di
from cases import (
    classification_data,
    loader,
    pearson,
    reference_hessian,
    reference_influences,
    regression_data,
    rel_err,
    train_lbfgs,
)

N, D, BATCH = 45, 5, 10  # 45 points in batches of 10: the last batch holds 5
REG = 1e-3


# -- ridge regression ------------------------------------------------------------------------
def _ridge(bias: bool):
    """Ridge at its optimum; returns model, data, test data, closed-form influences.

    The weights minimize mean (x^T w - y)^2 + (REG / 2) |w|^2, so H + REG I is the Hessian of
    that objective; the influence formula itself does not need the optimum.
    """
    x, y = regression_data(N + 6, D, seed=11)
    x_train, y_train, x_test, y_test = x[:N], y[:N], x[N:], y[N:]

    # design with a constant column when the layer has a bias; flattening order is
    # weight (1, D) then bias (1,)
    def aug(a):
        return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a

    xa, xa_test = aug(x_train), aug(x_test)
    p = xa.shape[1]
    hess = 2 * xa.T @ xa / N  # Hessian of mean (x^T w - y)^2
    w = torch.linalg.solve(hess + REG * torch.eye(p, dtype=torch.float64), 2 * xa.T @ y_train / N)
    model = nn.Linear(D, 1, bias=bias).double().eval()
    with torch.no_grad():
        model.weight.copy_(w[:D].T)
        if bias:
            model.bias.copy_(w[D:, 0])

    def grads(a, t):  # per-sample gradients 2 x_i (x_i^T w - y_i)
        return 2 * a * (a @ w - t)

    regularized = hess + REG * torch.eye(p, dtype=torch.float64)
    exact = grads(xa_test, y_test) @ torch.linalg.solve(regularized, grads(xa, y_train).T)
    return model, x_train, y_train, x_test, y_test, exact, hess


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_ridge_direct(bias):
    model, x, y, xt, yt, exact, hess = _ridge(bias)
    m = di.DirectInfluence(model, nn.MSELoss(), regularization=REG).fit(loader(x, y, BATCH))
    assert m.num_params == D + int(bias)
    assert rel_err(m.hessian, hess) < 1e-10
    err = rel_err(m.influences(xt, yt, x, y), exact)
    assert err < 1e-6, f"DirectInfluence ridge relative error {err:.2e}"


# rhs_block_size=1 solves each right-hand side on its own (several iterations per solve); the
# default solves the 6 test points as one block, which spans the 5-6 dimensional space at once
@pytest.mark.parametrize("rhs_block_size", [None, 1], ids=["block", "single"])
@pytest.mark.parametrize("preconditioner", [None, "jacobi", "nystroem"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_ridge_cg(bias, preconditioner, rhs_block_size):
    model, x, y, xt, yt, exact, _ = _ridge(bias)
    m = di.CgInfluence(
        model,
        nn.MSELoss(),
        regularization=REG,
        preconditioner=preconditioner,
        preconditioner_rank=3,
        rhs_block_size=rhs_block_size,
    ).fit(loader(x, y, BATCH))
    err = rel_err(m.influences(xt, yt, x, y), exact)
    assert err < 1e-5, f"CgInfluence({preconditioner}) ridge relative error {err:.2e}"
    assert bool(m.info_.converged.all())


def test_ridge_lissa_deterministic():
    # batch_size = n makes every LiSSA "random batch" the whole training set (a permutation
    # of it, and the mean-loss Hessian does not depend on the order), so the recursion is the
    # deterministic Neumann series for (H + lambda I)^-1 and converges geometrically with
    # rate 1 - (lambda_min + lambda) / scale. The Gaussian 45 x 5 design keeps cond(H) small,
    # so ~a few hundred iterations reach rtol=1e-9; the default scale (twice the power-iteration
    # estimate of lambda_max) is safe.
    model, x, y, xt, yt, exact, _ = _ridge(False)
    m = di.LissaInfluence(model, nn.MSELoss(), regularization=REG, batch_size=N, maxiter=3000, rtol=1e-9).fit(
        loader(x, y, BATCH)
    )
    err = rel_err(m.influences(xt, yt, x, y), exact)
    assert m.info_.converged
    assert err < 1e-2, f"LissaInfluence ridge relative error {err:.2e}"


def test_ridge_lissa_stochastic():
    # Mini-batches of 30 out of 45 points: the recursion is now stochastic and its last
    # iterate keeps fluctuating around the solution with an amplitude set by the batch noise
    # (about 10% of the largest entry here, measured over seeds 0-3), so it never meets a
    # tight rtol (a ConvergenceWarning is expected) and is checked loosely: right scale and
    # sign (max error < 20%) and the right ranking (Pearson > 0.99). A biased recursion
    # (wrong scale or dampen handling) fails both.
    model, x, y, xt, yt, exact, _ = _ridge(False)
    # variance_reduction=False: the plain recursion (with the default SVRG-style correction
    # the batch noise vanishes as the solve converges and it meets rtol 1e-12)
    m = di.LissaInfluence(
        model,
        nn.MSELoss(),
        regularization=REG,
        batch_size=30,
        maxiter=600,
        rtol=1e-12,
        seed=0,
        variance_reduction=False,
    ).fit(loader(x, y, BATCH))
    with pytest.warns(di.ConvergenceWarning, match="maxiter"):
        approx = m.influences(xt, yt, x, y)
    err, r = rel_err(approx, exact), pearson(approx, exact)
    assert err < 0.2 and r > 0.99, f"stochastic LiSSA: relative error {err:.2e}, Pearson {r:.4f}"


# -- the mean over samples, not the mean of batch means --------------------------------------
def test_ragged_last_batch_weighting():
    model, x, y, xt, yt, exact, hess = _ridge(True)
    ragged = di.DirectInfluence(model, nn.MSELoss(), regularization=REG).fit(loader(x, y, 10))
    whole = di.DirectInfluence(model, nn.MSELoss(), regularization=REG).fit(loader(x, y, N))
    pair = di.DirectInfluence(model, nn.MSELoss(), regularization=REG).fit((x, y))
    assert rel_err(ragged.hessian, whole.hessian) < 1e-12
    assert rel_err(pair.hessian, whole.hessian) < 1e-12
    a, b = ragged.influences(xt, yt, x, y), whole.influences(xt, yt, x, y)
    assert rel_err(a, b) < 1e-12
    # and both are the mean over all 45 samples (averaging batch means would be ~8% off)
    assert rel_err(ragged.hessian, hess) < 1e-10


def test_ragged_last_batch_weighting_cg():
    model, x, y, xt, yt, exact, _ = _ridge(False)
    a = di.CgInfluence(model, nn.MSELoss(), regularization=REG).fit(loader(x, y, 10)).influences(xt, yt, x, y)
    b = di.CgInfluence(model, nn.MSELoss(), regularization=REG).fit(loader(x, y, N)).influences(xt, yt, x, y)
    assert rel_err(a, b) < 1e-9


# -- multinomial logistic regression ---------------------------------------------------------
C, DL = 3, 4


@functools.cache
def _logistic():
    x, labels = classification_data(N + 6, DL, C, seed=5)
    x_train, y_train, x_test, y_test = x[:N], labels[:N], x[N:], labels[N:]
    torch.manual_seed(0)
    model = nn.Linear(DL, C, bias=False).double().eval()
    ce = nn.CrossEntropyLoss()
    train_lbfgs(model, lambda: ce(model(x_train), y_train) + 0.5 * REG * (model.weight**2).sum())

    w = model.weight.detach()  # (C, DL), flattened row-major: index k * DL + j

    def probs(a):
        return torch.softmax(a @ w.T, dim=1)

    def grads(a, t):  # (p_i - onehot_i) outer x_i, flattened row-major
        r = probs(a) - nn.functional.one_hot(t, C).double()
        return (r[:, :, None] * a[:, None, :]).reshape(a.shape[0], -1)

    p = probs(x_train)
    hess = (
        sum(
            torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(x_train[i], x_train[i]))
            for i in range(N)
        )
        / N
    )
    eye = torch.eye(C * DL, dtype=torch.float64)
    exact = grads(x_test, y_test) @ torch.linalg.solve(hess + REG * eye, grads(x_train, y_train).T)
    return model, x_train, y_train, x_test, y_test, exact, hess


@pytest.fixture
def logistic():
    return _logistic()


def test_logistic_gradient_closed_form(logistic):
    model, x, y, xt, yt, exact, hess = logistic
    m = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=REG).fit(loader(x, y, BATCH))
    w = model.weight.detach()
    r = torch.softmax(x @ w.T, 1) - nn.functional.one_hot(y, C).double()
    expected = (r[:, :, None] * x[:, None, :]).reshape(N, -1)
    assert rel_err(m.per_sample_grads(x, y), expected) < 1e-12


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_logistic_direct(logistic, curvature):
    model, x, y, xt, yt, exact, hess = logistic
    m = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=REG, curvature=curvature)
    m.fit(loader(x, y, BATCH))
    # for a linear model with cross entropy the GGN is the Hessian exactly
    assert rel_err(m.hessian, hess) < 1e-10
    err = rel_err(m.influences(xt, yt, x, y), exact)
    assert err < 1e-6, f"DirectInfluence({curvature}) logistic relative error {err:.2e}"


@pytest.mark.parametrize("rhs_block_size", [None, 1], ids=["block", "single"])
@pytest.mark.parametrize("preconditioner", [None, "jacobi", "nystroem"])
def test_logistic_cg(logistic, preconditioner, rhs_block_size):
    model, x, y, xt, yt, exact, _ = logistic
    m = di.CgInfluence(
        model,
        nn.CrossEntropyLoss(),
        regularization=REG,
        preconditioner=preconditioner,
        preconditioner_rank=5,
        rhs_block_size=rhs_block_size,
    )
    m.fit(loader(x, y, BATCH))
    err = rel_err(m.influences(xt, yt, x, y), exact)
    assert err < 1e-5, f"CgInfluence({preconditioner}) logistic relative error {err:.2e}"


def test_logistic_cg_ggn(logistic):
    model, x, y, xt, yt, exact, _ = logistic
    m = di.CgInfluence(model, nn.CrossEntropyLoss(), regularization=REG, curvature="ggn").fit(loader(x, y, BATCH))
    assert rel_err(m.influences(xt, yt, x, y), exact) < 1e-5


def test_logistic_lissa(logistic):
    # Deterministic recursion (batch_size = n, see test_ridge_lissa_deterministic). The
    # softmax makes H singular along W -> W + 1 v^T, but every per-sample gradient is
    # orthogonal to that null space, so only the smallest NONZERO eigenvalue sets the rate.
    model, x, y, xt, yt, exact, _ = logistic
    m = di.LissaInfluence(model, nn.CrossEntropyLoss(), regularization=REG, batch_size=N, maxiter=5000, rtol=1e-9).fit(
        loader(x, y, BATCH)
    )
    err = rel_err(m.influences(xt, yt, x, y), exact)
    assert err < 1e-2, f"LissaInfluence logistic relative error {err:.2e}"


# -- GGN on a nonlinear model ----------------------------------------------------------------
def _reference_ggn(model, loss, x, y):
    """mean_i J_i^T H_out,i J_i with J_i the Jacobian of the outputs, by plain autograd."""
    params = list(model.parameters())
    names = [k for k, _ in model.named_parameters()]
    sizes = [q.numel() for q in params]
    shapes = [q.shape for q in params]
    theta = torch.cat([q.detach().reshape(-1) for q in params])

    def out(t, xi):
        state = {k: c.view(s) for k, c, s in zip(names, torch.split(t, sizes), shapes)}
        return torch.func.functional_call(model, state, (xi,)).reshape(-1)

    total = 0
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda t, xi=xi: out(t, xi), theta)  # (o, p)
        o = out(theta, xi).detach()
        h_out = torch.autograd.functional.hessian(lambda v, yi=yi: loss(v.view(1, -1), yi), o)
        total = total + jac.T @ h_out @ jac
    return total / x.shape[0]


def test_ggn_on_mlp_is_psd_and_not_the_hessian(mlp_classification):
    model, ce, x, y, _, _ = mlp_classification
    # regularization 1 keeps the (indefinite) Hessian of this untrained MLP invertible
    h = di.DirectInfluence(model, ce, regularization=1.0, curvature="hessian").fit(loader(x, y, 10)).hessian
    g = di.DirectInfluence(model, ce, regularization=REG, curvature="ggn").fit(loader(x, y, 10)).hessian
    assert rel_err(g, _reference_ggn(model, ce, x, y)) < 1e-10
    assert rel_err(g, h) > 1e-2, "GGN of a tanh MLP should differ from its Hessian"
    eig_g = torch.linalg.eigvalsh(g)
    assert float(eig_g.min()) > -1e-12 * float(eig_g.max())
    # an untrained MLP's Hessian is indefinite, which is exactly why GGN exists
    assert float(torch.linalg.eigvalsh(h).min()) < -1e-6


def test_ggn_on_mlp_mse(mlp_regression):
    model, mse, x, y, _, _ = mlp_regression
    g = di.DirectInfluence(model, mse, regularization=REG, curvature="ggn").fit(loader(x, y, 7)).hessian
    assert rel_err(g, _reference_ggn(model, mse, x, y)) < 1e-10


def test_mlp_hessian_matches_autograd(mlp_regression):
    model, mse, x, y, xt, yt = mlp_regression
    # untrained: H is indefinite (smallest eigenvalue about -2), so damp above it
    m = di.DirectInfluence(model, mse, regularization=3.0).fit(loader(x, y, 7))
    assert rel_err(m.hessian, reference_hessian(model, mse, x, y)) < 1e-10
    expected = reference_influences(model, mse, x, y, xt, yt, regularization=3.0)
    assert rel_err(m.influences(xt, yt, x, y), expected) < 1e-8
