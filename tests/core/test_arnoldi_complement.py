"""ArnoldiInfluence's complement weight at a small regularization (issue 31, item 15).

The part of a right-hand side outside the kept eigenvectors ``V`` is weighted
``1 / (lambda + sigma_tail)``, ``sigma_tail`` the mean eigenvalue of ``H`` outside ``span(V)``
estimated at fit time (the Ritz values not kept plus a Hutchinson estimate outside the Krylov
basis). With ``1 / lambda`` and ``lambda = 1e-6 / n`` (captum's setting), that part swamped the
influences by seven orders of magnitude.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dask_influence.core.solvers.arnoldi import ArnoldiInfluence
from dask_influence.core.solvers.direct import DirectInfluence
from dask_influence.demo import make_mlp

F64 = torch.float64
RANK = 5


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture(scope="module")
def net():
    """A 5-4-3 tanh net (p = 39) trained on 60 points of a 3-class problem; GGN curvature,
    regularization 1e-6 / n; the exact rank-5 and full influences from the dense GGN."""
    g = torch.Generator().manual_seed(0)
    n = 60
    x = torch.randn(n + 10, 5, generator=g, dtype=F64)
    w = torch.randn(5, 3, generator=g, dtype=F64)
    y = (x @ w + 0.5 * torch.randn(n + 10, 3, generator=g, dtype=F64)).argmax(1)
    model = make_mlp((5, 4, 3), seed=0, dtype=F64)
    loss = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        loss(model(x[:n]), y[:n]).backward()
        opt.step()
    model.eval()
    xt, yt, x, y = x[n:], y[n:], x[:n], y[:n]
    reg = 1e-6 / n
    direct = DirectInfluence(model, loss, regularization=reg, curvature="ggn").fit((x, y))
    evals, evecs = torch.linalg.eigh(direct.hessian)
    order = evals.abs().argsort(descending=True)
    v, d = evecs[:, order[:RANK]], evals[order[:RANK]]
    g_test, g_train = direct.per_sample_grads(xt, yt), direct.per_sample_grads(x, y)
    rank_r = ((g_test @ v) / (d + reg)) @ (v.T @ g_train.T)
    outside = (g_test - (g_test @ v) @ v.T) @ (g_train - (g_train @ v) @ v.T).T
    p = evals.numel()
    return SimpleNamespace(
        model=model,
        loss=loss,
        x=x,
        y=y,
        xt=xt,
        yt=yt,
        reg=reg,
        p=p,
        rank_r=rank_r,
        outside=outside,
        full=direct.influences(xt, yt, x, y),
        tail=float((evals.sum() - d.sum()) / (p - RANK)),
    )


def _arnoldi(net, **kwargs) -> ArnoldiInfluence:
    solver = ArnoldiInfluence(net.model, net.loss, regularization=net.reg, rank=RANK, curvature="ggn", **kwargs)
    return solver.fit((net.x, net.y))


def test_default_complement_weighs_the_tail_not_one_over_lambda(net):
    assert net.p == 39 and net.reg == pytest.approx(1.6667e-8, rel=1e-4)
    assert float(net.rank_r.abs().max()) == pytest.approx(24.35, abs=0.01)  # the exact rank-5 influences
    solver = _arnoldi(net)  # complement="auto"
    # the mean uncaptured eigenvalue: measured 0.0012338 (Hutchinson, 8 probes) against 0.0012354 exact
    assert net.tail == pytest.approx(1.2354e-3, rel=1e-3)
    assert solver.state_.tail_eigenvalue == pytest.approx(net.tail, rel=0.01)
    assert solver.complement_weight() == pytest.approx(1 / (net.reg + solver.state_.tail_eigenvalue), rel=1e-12)
    got = solver.influences(net.xt, net.yt, net.x, net.y)
    # exactly the rank-5 influences plus the complement weighted 1 / (lambda + sigma_tail)
    expected = net.rank_r + net.outside / (net.reg + solver.state_.tail_eigenvalue)
    assert rel_fro(got, expected) < 1e-8
    # at the scale of the influences: measured 131.5 off the exact rank-5 ones (largest 24.3) and a
    # relative (Frobenius) error of 1.36 against the full solve (the rank-5 influences: 1.01)
    assert float((got - net.rank_r).abs().max()) < 10 * float(net.rank_r.abs().max())
    assert rel_fro(got, net.full) < 1.5
    assert rel_fro(net.rank_r, net.full) == pytest.approx(1.01, abs=0.01)


def test_one_over_lambda_is_what_blew_up_and_ignore_is_the_exact_rank_r(net):
    weighted = _arnoldi(net, complement="regularization").influences(net.xt, net.yt, net.x, net.y)
    # the weight before the fix (and still the explicit choice "regularization"): 9.7e6 off, 8e4 relative
    assert float((weighted - net.rank_r).abs().max()) > 1e6
    assert rel_fro(weighted, net.full) > 1e4
    ignored = _arnoldi(net, complement="ignore")
    assert ignored.state_.tail_eigenvalue is None and ignored.complement_weight() is None
    assert rel_fro(ignored.influences(net.xt, net.yt, net.x, net.y), net.rank_r) < 1e-10


def test_tail_is_exact_when_the_krylov_basis_spans_everything(net):
    solver = _arnoldi(net, complement="tail", krylov_dimension=net.p)
    # no direction outside the basis: the uncaptured Ritz values give the trace exactly
    assert solver.state_.tail_eigenvalue == pytest.approx(net.tail, rel=1e-8)


def test_tail_weight_survives_save_and_load(net, tmp_path):
    solver = _arnoldi(net)
    solver.save(tmp_path / "arnoldi.pt")
    loaded = ArnoldiInfluence.load(tmp_path / "arnoldi.pt", net.model, net.loss)
    assert loaded.state_.tail_eigenvalue == solver.state_.tail_eigenvalue
    torch.testing.assert_close(
        loaded.influences(net.xt, net.yt, net.x, net.y), solver.influences(net.xt, net.yt, net.x, net.y)
    )


def test_tail_without_any_weight_is_refused(net):
    solver = _arnoldi(net, complement="tail", krylov_dimension=net.p)
    solver.regularization = 0.0
    solver.state_ = type(solver.state_)(**{**solver.state_.__dict__, "tail_eigenvalue": 0.0})
    with pytest.raises(ValueError, match=r"regularization \+ sigma_tail = 0; pass a positive regularization"):
        solver.influence_factors(net.xt, net.yt)
