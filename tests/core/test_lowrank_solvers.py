"""ArnoldiInfluence and NystroemSketchInfluence against dense ground truth.

Ground truth is either DirectInfluence (dense eigendecomposition of H) or a closed form
computed here from the data (linear models with a quadratic loss, whose Hessian is known).
"""

from __future__ import annotations

import copy
import pickle
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import dask_influence as di
from dask_influence.core.blocks import SummedCurvatureOperator
from dask_influence.core.operators import LinearOperator
from dask_influence.core.solvers.arnoldi import TRACE_PROBES, ArnoldiInfluence
from dask_influence.core.solvers.direct import DirectInfluence
from dask_influence.core.solvers.nystroem import NystroemSketchInfluence
from dask_influence.demo import make_mlp
from dask_influence.errors import NotFittedError, NotPositiveDefiniteError

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    """A 4-6-3 tanh MLP (p = 51) trained a little on random regression data, float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen, dtype=F64)
    y = torch.randn(50, 3, generator=gen, dtype=F64)
    model = make_mlp((4, 6, 3), seed=0, dtype=F64)
    loss = nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    model.eval()
    p = sum(t.numel() for t in model.parameters())
    return SimpleNamespace(model=model, loss=loss, x=x[:40], y=y[:40], xt=x[40:], yt=y[40:], p=p)


@pytest.fixture(scope="module")
def mlp_direct(mlp):
    """Direct ground truth: (curvature, regularization) -> fitted DirectInfluence."""
    cache = {}

    def get(curvature: str, regularization: float) -> DirectInfluence:
        key = (curvature, regularization)
        if key not in cache:
            cache[key] = DirectInfluence(mlp.model, mlp.loss, regularization=regularization, curvature=curvature).fit(
                (mlp.x, mlp.y)
            )
        return cache[key]

    return get


def low_rank_ridge(n: int = 30, d: int = 40, r: int = 3, seed: int = 0):
    """Linear regression without bias whose inputs span only ``r`` directions.

    Loss: mean squared error, so ``H = 2/n X^T X`` has rank ``r`` exactly and every
    gradient ``2 (x.w - y) x`` lies in its range.
    """
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(r, d, generator=gen, dtype=F64) * torch.tensor([3.0, 1.0, 0.3], dtype=F64)[:, None]
    x = torch.randn(n, r, generator=gen, dtype=F64) @ mixing
    x_test = torch.randn(8, r, generator=gen, dtype=F64) @ mixing
    w_true = torch.randn(d, generator=gen, dtype=F64)
    y = (x @ w_true + 0.3 * torch.randn(n, generator=gen, dtype=F64))[:, None]
    y_test = (x_test @ w_true)[:, None]
    model = nn.Linear(d, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=F64))
    model.eval()
    return SimpleNamespace(model=model, loss=nn.MSELoss(), x=x, y=y, x_test=x_test, y_test=y_test, r=r, d=d, gen=gen)


def ridge_truth(model: nn.Linear, x, y, x_test, y_test, regularization: float):
    """Closed-form factors and influences of an MSE linear model without bias."""
    w = model.weight.detach()[0]
    n = x.shape[0]
    hessian = 2.0 / n * x.T @ x + regularization * torch.eye(x.shape[1], dtype=F64)
    g_train = 2.0 * (x @ w - y[:, 0])[:, None] * x
    g_test = 2.0 * (x_test @ w - y_test[:, 0])[:, None] * x_test
    factors = torch.linalg.solve(hessian, g_test.T).T
    return factors, factors @ g_train.T


# -- convergence to the direct solver as the rank grows -----------------------------------
RANKS = (6, 12, 24, 36, 51)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda m, r: ArnoldiInfluence(m.model, m.loss, regularization=0.01, curvature="ggn", rank=r), id="arnoldi"
        ),
        pytest.param(
            lambda m, r: ArnoldiInfluence(
                m.model, m.loss, regularization=0.01, curvature="ggn", rank=r, complement="regularization"
            ),
            id="arnoldi-complement",
        ),
        pytest.param(
            lambda m, r: NystroemSketchInfluence(m.model, m.loss, regularization=0.01, curvature="ggn", rank=r),
            id="nystroem",
        ),
    ],
)
def test_converges_to_direct_as_rank_grows(mlp, mlp_direct, make):
    assert mlp.p == RANKS[-1]
    truth = mlp_direct("ggn", 0.01).influences(mlp.xt, mlp.yt, mlp.x, mlp.y)
    errors = []
    for rank in RANKS:
        solver = make(mlp, rank).fit((mlp.x, mlp.y))
        errors.append(rel_err(solver.influences(mlp.xt, mlp.yt, mlp.x, mlp.y), truth))
    # every step up in rank brings the influences closer to the exact ones ...
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # ... and at rank p the approximation is the exact inverse
    tolerance = 1e-6 if isinstance(solver, NystroemSketchInfluence) else 1e-8
    assert errors[-1] < tolerance, errors


def test_arnoldi_full_rank_on_indefinite_hessian_equals_direct(mlp, mlp_direct):
    direct = mlp_direct("hessian", 0.2)
    eigenvalues = torch.linalg.eigvalsh(direct.hessian)
    assert eigenvalues.min() < -0.01  # the Hessian of the MLP is indefinite
    solver = ArnoldiInfluence(mlp.model, mlp.loss, regularization=0.2, rank=mlp.p).fit((mlp.x, mlp.y))
    # negative eigenvalues above -regularization are kept and used as they are
    torch.testing.assert_close(solver.eigenvalues_.sort().values, eigenvalues, rtol=0, atol=1e-10)
    assert rel_err(solver.influence_factors(mlp.xt, mlp.yt), direct.influence_factors(mlp.xt, mlp.yt)) < 1e-8
    torch.testing.assert_close(
        solver.self_influences(mlp.x, mlp.y), direct.self_influences(mlp.x, mlp.y), rtol=1e-8, atol=0
    )


def test_arnoldi_eigenpairs_match_dense_hessian(mlp, mlp_direct):
    hessian = mlp_direct("hessian", 0.2).hessian
    evals, evecs = torch.linalg.eigh(hessian)
    order = evals.abs().argsort(descending=True)
    evals, evecs = evals[order], evecs[:, order]

    solver = ArnoldiInfluence(mlp.model, mlp.loss, regularization=0.2, rank=10).fit((mlp.x, mlp.y))
    assert solver.state_.krylov_dimension == 30  # default max(2*rank, rank+20)
    assert solver.eigenvalues_.shape == (10,) and solver.eigenvectors_.shape == (mlp.p, 10)
    # the dominant eigenvalues are found to high accuracy, in order of magnitude
    torch.testing.assert_close(solver.eigenvalues_[:8], evals[:8], rtol=1e-9, atol=0)
    # the vectors are orthonormal and the leading ones are H's eigenvectors (up to sign)
    v = solver.eigenvectors_
    torch.testing.assert_close(v.T @ v, torch.eye(10, dtype=F64), rtol=0, atol=1e-12)
    alignment = (v[:, :5] * evecs[:, :5]).sum(0).abs()
    torch.testing.assert_close(alignment, torch.ones(5, dtype=F64), rtol=0, atol=1e-8)
    # the reported residuals bound the true ones |H v - d v|
    true_residuals = torch.linalg.vector_norm(hessian @ v - v * solver.eigenvalues_, dim=0)
    assert bool((true_residuals <= solver.state_.residual_norms + 1e-10).all())
    assert float(true_residuals[:5].max()) < 1e-8


# -- low-rank problems where the approximation is exact -----------------------------------
def test_arnoldi_exact_on_low_rank_ridge_and_stops_early(monkeypatch):
    prob = low_rank_ridge()
    reg = 0.01
    factors, influences = ridge_truth(prob.model, prob.x, prob.y, prob.x_test, prob.y_test, reg)
    calls = _count_products(monkeypatch)
    solver = ArnoldiInfluence(prob.model, prob.loss, regularization=reg, rank=prob.r).fit((prob.x, prob.y))
    # the Krylov space is invariant after r + 1 vectors (range of H plus one null direction);
    # one more product shows that H vanishes on the rest, so it stops long before 23 steps
    assert solver.krylov_dimension == 23
    assert len(calls) == prob.r + 2
    truth_evals = torch.linalg.eigvalsh(2.0 / prob.x.shape[0] * prob.x.T @ prob.x).flip(0)[: prob.r]
    torch.testing.assert_close(solver.eigenvalues_, truth_evals, rtol=1e-10, atol=0)
    got = solver.influences(prob.x_test, prob.y_test, prob.x, prob.y)
    assert rel_err(got, influences) < 1e-8
    # test inputs in the span too: the factors themselves are exact
    assert rel_err(solver.influence_factors(prob.x_test, prob.y_test), factors) < 1e-8


def test_complement_choice_on_test_points_outside_the_range():
    prob = low_rank_ridge()
    reg = 0.01
    x_out = torch.randn(5, prob.d, generator=prob.gen, dtype=F64)  # not in the span of the training inputs
    y_out = torch.randn(5, 1, generator=prob.gen, dtype=F64)
    factors, influences = ridge_truth(prob.model, prob.x, prob.y, x_out, y_out, reg)

    ignore = ArnoldiInfluence(prob.model, prob.loss, regularization=reg, rank=prob.r, complement="ignore").fit(
        (prob.x, prob.y)
    )
    # the standard approximation drops the complement: factors are projected onto span(V) ...
    f_ignore = ignore.influence_factors(x_out, y_out)
    assert rel_err(f_ignore, factors) > 0.5
    v = ignore.eigenvectors_
    assert rel_err(f_ignore, (factors @ v) @ v.T) < 1e-8
    # ... but influences on training points (whose gradients lie in the range) stay exact
    assert rel_err(ignore.influences(x_out, y_out, prob.x, prob.y), influences) < 1e-8

    # treating the complement as regularization only is exact here: H vanishes there
    full = ArnoldiInfluence(prob.model, prob.loss, regularization=reg, rank=prob.r, complement="regularization").fit(
        (prob.x, prob.y)
    )
    assert rel_err(full.influence_factors(x_out, y_out), factors) < 1e-8
    nystroem = NystroemSketchInfluence(prob.model, prob.loss, regularization=reg, rank=prob.r).fit((prob.x, prob.y))
    assert rel_err(nystroem.influence_factors(x_out, y_out), factors) < 1e-8


def test_arnoldi_finds_repeated_eigenvalues():
    # a linear layer with 3 outputs under MSE: H = kron(I_3, 2/(3n) X^T X) repeats every
    # eigenvalue three times; a single Krylov sequence sees each only once
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(25, 8, generator=gen, dtype=F64)
    y = torch.randn(25, 3, generator=gen, dtype=F64)
    model = nn.Linear(8, 3, bias=False).to(F64).eval()
    direct = DirectInfluence(model, nn.MSELoss(), regularization=1e-3).fit((x, y))
    solver = ArnoldiInfluence(model, nn.MSELoss(), regularization=1e-3, rank=24).fit((x, y))
    assert solver.state_.krylov_dimension == 24
    torch.testing.assert_close(
        solver.eigenvalues_.sort().values, torch.linalg.eigvalsh(direct.hessian), rtol=1e-9, atol=1e-12
    )
    assert rel_err(solver.influences(x[:5], y[:5], x, y), direct.influences(x[:5], y[:5], x, y)) < 1e-8


# -- cost: curvature-vector products only --------------------------------------------------
def _count_products(monkeypatch) -> list[int]:
    """Record the number of columns of every curvature product of a fit (each one sweep); forbid dense()."""
    calls: list[int] = []
    original = SummedCurvatureOperator.matmat

    def counting(self, v):
        calls.append(int(v.shape[1]))
        return original(self, v)

    def no_dense(self, *args, **kwargs):
        raise AssertionError("the low-rank solvers must not form H")

    monkeypatch.setattr(SummedCurvatureOperator, "matmat", counting)
    monkeypatch.setattr(LinearOperator, "dense", no_dense)
    monkeypatch.setattr(SummedCurvatureOperator, "dense", no_dense)
    monkeypatch.setattr(SummedCurvatureOperator, "dense_blocks", no_dense)
    return calls


def test_never_forms_h_and_counts_sweeps(mlp, monkeypatch):
    calls = _count_products(monkeypatch)
    arnoldi = ArnoldiInfluence(mlp.model, mlp.loss, regularization=0.2, rank=5).fit((mlp.x, mlp.y))
    assert arnoldi.krylov_dimension == 25
    # one sweep with one vector per Lanczos step; the first also carries the trace probes of
    # the complement's weight (complement="auto": 1 / (lambda + sigma_tail)), no extra sweep
    assert calls == [1 + TRACE_PROBES] + [1] * 24
    arnoldi.influences(mlp.xt, mlp.yt, mlp.x, mlp.y)
    arnoldi.self_influences(mlp.x, mlp.y)
    assert len(calls) == 25  # solving needs no further sweeps

    calls.clear()
    nystroem = NystroemSketchInfluence(mlp.model, mlp.loss, regularization=0.2, rank=7).fit((mlp.x, mlp.y))
    assert calls == [7]  # ONE sweep with a block of rank vectors
    nystroem.influences(mlp.xt, mlp.yt, mlp.x, mlp.y)
    assert calls == [7]


# -- negative eigenvalues -------------------------------------------------------------------
def _signed_square(outputs, targets):
    """Mean of ``y_i * f(x_i)^2``: for a linear model ``H = 2/n sum_i y_i x_i x_i^T``."""
    return (targets[:, 0] * outputs[:, 0] ** 2).mean()


def test_negative_eigenvalues_are_kept_and_refused_when_not_regularized_away():
    gen = torch.Generator().manual_seed(2)
    n, d = 20, 6
    x = torch.randn(n, d, generator=gen, dtype=F64)
    x[:4, 0] += 6.0  # four points with negative weight along e1: a large negative eigenvalue
    y = torch.ones(n, 1, dtype=F64)
    y[:4] = -1.0
    model = nn.Linear(d, 1, bias=False).to(F64).eval()
    hessian = 2.0 / n * (x * y).T @ x
    evals = torch.linalg.eigvalsh(hessian)
    lam_min = float(evals[0])
    assert lam_min < -3.0 and abs(lam_min) == float(evals.abs().max())

    with pytest.raises(NotPositiveDefiniteError, match="regularization=") as info:
        ArnoldiInfluence(model, _signed_square, regularization=0.1, rank=2).fit((x, y))
    assert info.value.smallest_eigenvalue == pytest.approx(lam_min + 0.1, rel=1e-8)
    suggested = info.value.suggested_regularization
    assert suggested > -lam_min

    solver = ArnoldiInfluence(model, _signed_square, regularization=suggested, rank=d).fit((x, y))
    # the negative eigenvalue is in the approximation, not projected out
    assert float(solver.eigenvalues_[0]) == pytest.approx(lam_min, rel=1e-10)
    g = 2.0 * (x @ model.weight.detach()[0] * y[:, 0])[:, None] * x
    exact = torch.linalg.solve(hessian + suggested * torch.eye(d, dtype=F64), g.T).T
    assert rel_err(solver.influence_factors(x, y), exact) < 1e-8

    # lowering the regularization after fitting is refused at solve time as well
    solver.regularization = 0.1
    with pytest.raises(NotPositiveDefiniteError, match="ArnoldiInfluence"):
        solver.influence_factors(x, y)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemSketchInfluence])
@pytest.mark.parametrize(
    "rank, error, match",
    [
        (0, ValueError, "rank"),
        (-3, ValueError, "rank"),
        (52, ValueError, "p=51"),
        (2.0, TypeError, "rank"),
        (True, TypeError, "rank"),
    ],
)
def test_bad_rank(mlp, cls, rank, error, match):
    with pytest.raises(error, match=match):
        cls(mlp.model, mlp.loss, regularization=0.1, rank=rank)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 10, "krylov_dimension": 5}, "krylov_dimension"),
        ({"rank": 10, "krylov_dimension": 52}, "krylov_dimension"),
        ({"complement": "zero"}, "complement"),
        ({"complement": "regularization", "regularization": 0.0}, "regularization > 0"),
        ({"tol": -1.0}, "tol"),
    ],
)
def test_arnoldi_bad_arguments(mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArnoldiInfluence(mlp.model, mlp.loss, **kwargs)


@pytest.mark.parametrize("regularization", [0, 0.0])
def test_nystroem_needs_positive_regularization(mlp, regularization):
    with pytest.raises(ValueError, match="regularization > 0"):
        NystroemSketchInfluence(mlp.model, mlp.loss, regularization=regularization)
    solver = NystroemSketchInfluence(mlp.model, mlp.loss, regularization=0.1, rank=3).fit((mlp.x, mlp.y))
    solver.regularization = regularization
    with pytest.raises(ValueError, match="regularization > 0"):
        solver.influence_factors(mlp.xt, mlp.yt)


@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemSketchInfluence])
def test_unfitted(mlp, cls):
    solver = cls(mlp.model, mlp.loss, regularization=0.1, rank=3)
    for call in (
        lambda: solver.influence_factors(mlp.xt, mlp.yt),
        lambda: solver.influences(mlp.xt, mlp.yt, mlp.x, mlp.y),
        lambda: solver.self_influences(mlp.x, mlp.y),
        lambda: solver.eigenvalues_,
        lambda: solver.eigenvectors_,
    ):
        with pytest.raises(NotFittedError, match="fit"):
            call()


# -- dtype and shipping ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemSketchInfluence])
def test_float32_model(mlp, mlp_direct, cls):
    model32 = copy.deepcopy(mlp.model).float()
    solver = cls(model32, mlp.loss, regularization=0.05, curvature="ggn", rank=mlp.p).fit((mlp.x, mlp.y))
    assert solver.state_.eigenvalues.dtype == torch.float32
    got = solver.influence_factors(mlp.xt, mlp.yt)
    assert got.dtype == torch.float32
    truth = DirectInfluence(mlp.model, mlp.loss, regularization=0.05, curvature="ggn").fit((mlp.x, mlp.y))
    assert rel_err(got.double(), truth.influence_factors(mlp.xt, mlp.yt)) < 1e-4


@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemSketchInfluence])
def test_fitted_solver_pickles(mlp, cls):
    solver = cls(mlp.model, mlp.loss, regularization=0.1, rank=4).fit((mlp.x, mlp.y))
    clone = pickle.loads(pickle.dumps(solver))
    torch.testing.assert_close(clone.influence_factors(mlp.xt, mlp.yt), solver.influence_factors(mlp.xt, mlp.yt))


# -- the wine outlier problem ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def wine():
    from dask_influence.demo import wine_outlier_problem

    problem = wine_outlier_problem(dtype=F64)
    direct = DirectInfluence(problem.model, problem.loss, regularization=problem.regularization)
    direct.fit((problem.x_train, problem.y_train))
    truth = direct.influences(problem.x_test, problem.y_test, problem.x_train, problem.y_train).mean(0)
    return problem, truth.numpy()


@pytest.mark.parametrize(
    "cls, rank",
    [(ArnoldiInfluence, 30), (NystroemSketchInfluence, 30)],
)
def test_wine_outliers(wine, cls, rank):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import roc_auc_score

    problem, truth = wine
    assert sum(t.numel() for t in problem.model.parameters()) == 547
    start = time.perf_counter()
    solver = cls(problem.model, problem.loss, regularization=problem.regularization, rank=rank)
    solver.fit((problem.x_train, problem.y_train))
    fitted = time.perf_counter()
    mean = solver.influences(problem.x_test, problem.y_test, problem.x_train, problem.y_train).mean(0).numpy()
    done = time.perf_counter()
    labels = np.isin(np.arange(mean.size), problem.flipped)
    pearson, spearman = pearsonr(mean, truth)[0], spearmanr(mean, truth)[0]
    auc = roc_auc_score(labels, -mean)
    print(
        f"{cls.__name__} rank={rank}: pearson={pearson:.4f} spearman={spearman:.4f} auc={auc:.4f} "
        f"fit={fitted - start:.3f}s influences={done - fitted:.3f}s"
    )
    assert pearson >= 0.99
    assert spearman >= 0.95
    assert auc >= 0.95


def test_arnoldi_gives_a_proven_null_complement_its_exact_weight():
    """Issue 16's regression: rank above the rank of a singular H. Lanczos stops once H is
    proven to vanish outside its basis; that complement must get weight 1/lambda (as Direct
    gives it), not be dropped, or self-influences of new points are wrong."""
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1).double()
    x, y = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    new_x, new_y = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    loss = torch.nn.MSELoss()
    direct = di.DirectInfluence(model, loss, regularization=0.1).fit((x, y))
    arnoldi = di.ArnoldiInfluence(model, loss, regularization=0.1, rank=11).fit((x, y))
    assert arnoldi.state_.null_complement and arnoldi.eigenvalues_.numel() < 11
    expected = direct.self_influences(new_x, new_y)
    assert torch.allclose(arnoldi.self_influences(new_x, new_y), expected, rtol=1e-8)
    assert torch.allclose(
        arnoldi.influence_factors(new_x, new_y), direct.influence_factors(new_x, new_y), rtol=1e-8, atol=1e-10
    )
    # a lower regularization later (solve time) keeps the exact complement
    arnoldi.regularization = direct.regularization = 0.01
    assert torch.allclose(arnoldi.self_influences(new_x, new_y), direct.self_influences(new_x, new_y), rtol=1e-8)
