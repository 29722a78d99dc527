"""Faithfulness: predicted versus retrained change of the test loss (seed document 001).

Setting: a 2-8-1 tanh MLP, ``BCEWithLogitsLoss``, trained by L-BFGS on 60 points of a noisy
ring with the objective

    J(theta) = (1/n) sum_i l_i(theta) + alpha |theta|^2,        alpha = 0.02.

The influence model uses the plain BCE as its loss and ``regularization = 2 alpha`` (the
Hessian of ``alpha |theta|^2``), so ``H + regularization I`` is the Hessian of ``J``.

Scaling. Retraining with sample ``j`` given weight ``1 - delta`` and the objective
``sum_i w_i l_i / sum_i w_i + alpha |theta|^2`` (``delta = 1``: the mean over the n - 1
remaining points, i.e. leave-one-out) has, at the old optimum (where
``sum_i grad l_i = -2 alpha n theta``), the gradient ``-delta (g_j + 2 alpha theta) / (n - delta)``.
One Newton step gives ``d theta = delta / (n - delta) (H + 2 alpha I)^-1 (g_j + 2 alpha theta)`` and

    d L_test  ~  delta / (n - delta) * (influence[test, j] + c_test),
    c_test = factor_test . (2 alpha theta)   (the same for every j),

with ``factor_test = influence_factors(x_test, y_test)``. The constant ``c_test`` comes
from the regularizer's weight growing relative to the data term when a point is dropped;
it shifts all predictions for a test point equally (Pearson does not see it, the
slope check of the small-``delta`` test does). With the design's convention
``influence / n`` the Pearson values are identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dask_influence as di
from cases import pearson

N = 60
ALPHA = 0.02


def _objective(model, x, y, weights):
    per = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").squeeze(1)
    return (weights * per).sum() / weights.sum() + ALPHA * sum((p**2).sum() for p in model.parameters())


def _train(model, x, y, weights, *, lr, max_iter, tolerance_grad):
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=lr,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = _objective(model, x, y, weights)
        value.backward()
        return value

    opt.step(closure)
    return _newton_polish(model, x, y, weights, steps=2)


def _newton_polish(model, x, y, weights, steps=2):
    """A few exact Newton steps on the 33 parameters; returns the final max |gradient|.

    L-BFGS stalls near 1e-9 because its loss-change test cannot resolve changes below the
    float64 resolution of the objective; Newton's method converges quadratically from
    there to ~1e-15 (the objective is strongly convex near the optimum).
    """
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def objective(theta):
        state = {k: c.view(s) for k, c, s in zip(names, torch.split(theta, sizes), shapes)}
        per = nn.functional.binary_cross_entropy_with_logits(
            torch.func.functional_call(model, state, (x,)), y, reduction="none"
        ).squeeze(1)
        return (weights * per).sum() / weights.sum() + ALPHA * (theta**2).sum()

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for _ in range(steps):
        g = torch.func.grad(objective)(theta)
        theta = theta - torch.linalg.solve(torch.func.hessian(objective)(theta), g)
    with torch.no_grad():
        for p, c in zip(model.parameters(), torch.split(theta, sizes)):
            p.copy_(c.view(p.shape))
    return float(torch.func.grad(objective)(theta).abs().max())


@pytest.fixture(scope="module")
def ring():
    """The seed document's data, model and training, in float64 and trained tightly."""
    torch.manual_seed(0)
    x = torch.randn(N, 2)
    y = ((x[:, 0] ** 2 + x[:, 1] ** 2) > 1.5).float().unsqueeze(1)
    x_test = torch.randn(20, 2)
    y_test = ((x_test[:, 0] ** 2 + x_test[:, 1] ** 2) > 1.5).float().unsqueeze(1)
    x, y, x_test, y_test = x.double(), y.double(), x_test.double(), y_test.double()
    torch.manual_seed(42)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    ones = torch.ones(N, dtype=torch.float64)
    _train(model, x, y, ones, lr=0.1, max_iter=2000, tolerance_grad=1e-9)  # as in the document
    grad_max = _newton_polish(model, x, y, ones)
    assert grad_max < 1e-12, f"base training did not reach the optimum (max |grad| {grad_max:.1e})"
    model.eval()
    return model, x, y, x_test, y_test


def _retrain_changes(ring, delta):
    """Actual change of every test loss when sample j gets weight 1 - delta: ``(20, N)``."""
    model, x, y, x_test, y_test = ring

    def test_losses(m):
        return nn.functional.binary_cross_entropy_with_logits(m(x_test), y_test, reduction="none").squeeze(1)

    with torch.no_grad():
        base = test_losses(model)
    actual = torch.empty(x_test.shape[0], N, dtype=torch.float64)
    worst = 0.0
    for j in range(N):
        weights = torch.ones(N, dtype=torch.float64)
        weights[j] = 1 - delta
        retrained = copy.deepcopy(model)  # warm start from the optimum
        worst = max(worst, _train(retrained, x, y, weights, lr=1.0, max_iter=2000, tolerance_grad=1e-10))
        with torch.no_grad():
            actual[:, j] = test_losses(retrained) - base
    assert worst < 1e-12, f"retraining did not converge (max |grad| {worst:.1e})"
    return actual


def _predicted_changes(ring, delta, solver=di.DirectInfluence):
    model, x, y, x_test, y_test = ring
    m = solver(model, nn.BCEWithLogitsLoss(), regularization=2 * ALPHA).fit((x, y))
    influences = m.influences(x_test, y_test, x, y)  # (20, N)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shift = m.influence_factors(x_test, y_test) @ (2 * ALPHA * theta)  # (20,)
    return influences, delta * (influences + shift[:, None]) / (N - delta)


def test_leave_one_out_pearson(ring):
    influences, predicted = _predicted_changes(ring, 1.0)
    actual = _retrain_changes(ring, 1.0)
    r = [pearson(predicted[i], actual[i]) for i in range(actual.shape[0])]
    r_design = [pearson(influences[i] / N, actual[i]) for i in range(actual.shape[0])]
    summary = ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(r))
    print(f"leave-one-out Pearson per test point: {summary}")  # shown with -rP
    # Measured (torch 2.13, float64): 16 of the 20 test points reach >= 0.99, test point 0
    # (the document's, which reports 0.998) gives 0.9979, the lowest is 0.974; the misses are
    # genuine second-order effects of dropping a point (H + 2 alpha I has smallest eigenvalue
    # 0.004), as the small-delta test below shows.
    assert max(abs(a - b) for a, b in zip(r, r_design)) < 1e-12  # influence / n: same ranking
    assert r[0] >= 0.99, f"Pearson per test point: {summary}"
    assert sum(v >= 0.99 for v in r) >= 15, f"Pearson per test point: {summary}"
    assert min(r) >= 0.95, f"Pearson per test point: {summary}"
    # positive influence means helpful: removing the point raises the test loss
    slope = float((actual * predicted).sum() / (predicted * predicted).sum())
    assert 0.9 < slope < 1.5, f"slope of actual on predicted {slope:.3f}; Pearson: {summary}"


def test_small_downweighting_is_exact_to_first_order(ring):
    """With weight 0.95 instead of removal the first-order prediction must be near exact.

    The error of the linearization is O(delta) relative, so this checks the scaling, the
    sign and the regularization handling of the influence values, not only their ranking.
    """
    delta = 0.05
    _, predicted = _predicted_changes(ring, delta)
    actual = _retrain_changes(ring, delta)
    r = [pearson(predicted[i], actual[i]) for i in range(actual.shape[0])]
    errors = [float((predicted[i] - actual[i]).norm() / actual[i].norm()) for i in range(actual.shape[0])]
    print(f"down-weighting by {delta}: min Pearson {min(r):.6f}, max relative error {max(errors):.2e}")
    assert min(r) >= 0.9999, f"Pearson per test point: {[round(v, 6) for v in r]}"
    assert max(errors) < 0.03, f"relative errors per test point: {[f'{e:.2e}' for e in errors]}"


def test_leave_one_out_cg_agrees_with_direct(ring):
    """The design's bar for the default CG tolerance: Pearson >= 0.999 with the direct solver."""
    model, x, y, x_test, y_test = ring
    direct = di.DirectInfluence(model, nn.BCEWithLogitsLoss(), regularization=2 * ALPHA).fit((x, y))
    cg = di.CgInfluence(model, nn.BCEWithLogitsLoss(), regularization=2 * ALPHA).fit((x, y))
    a, b = direct.influences(x_test, y_test, x, y), cg.influences(x_test, y_test, x, y)
    assert pearson(a, b) >= 0.999999
    assert float((a - b).abs().max() / a.abs().max()) < 1e-6
