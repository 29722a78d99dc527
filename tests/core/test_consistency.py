"""Internal consistency of the public API, dtypes and input kinds, and the CG machinery.

Where a value is checked it is checked against an independent reference (plain autograd,
see ``cases.reference_influences``) or against another public entry point that must
give the same numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dask_influence as di
from cases import loader, mlp_regression_problem, reference_influences, rel_err, solver_cases, tanh_mlp

REG = 3.0  # above the most negative Hessian eigenvalue (~ -2) of the untrained MLP fixture


# The registered solvers that solve with the exact H, with the tolerance each meets against the
# dense reference below; the others approximate H (low rank, Kronecker factors) and are compared
# elsewhere. A new exact solver is added here with its tolerance.
TOL = {"direct": 1e-10, "cg": 1e-8, "lissa": 1e-6}
LISSA = {"batch_size": 24, "maxiter": 3000, "rtol": 1e-8}  # full batches: a deterministic recursion
CASES = {case.name: case for case in solver_cases(override={"lissa": LISSA}) if case.name in TOL}
SOLVERS = list(CASES)
assert set(TOL) == set(SOLVERS), f"tolerances {sorted(TOL)} != exact solvers {sorted(SOLVERS)}"


def _solvers():
    """One instance factory per exact solver: ``name -> (model, loss, regularization) -> solver``."""
    return {
        name: (lambda model, loss, reg, case=case: case.cls(model, loss, regularization=reg, **case.kwargs))
        for name, case in CASES.items()
    }


@pytest.fixture(params=SOLVERS)
def fitted(request, mlp_regression):
    """A fitted solver on the MLP regression fixture and the reference influence matrix."""
    model, mse, x, y, xt, yt = mlp_regression
    m = _solvers()[request.param](model, mse, REG).fit(loader(x, y, 10))
    return request.param, m, (x, y, xt, yt)


@pytest.fixture(scope="module")
def reference():
    model, _, x, y, xt, yt = mlp_regression_problem()
    return {
        "train_train": reference_influences(model, nn.MSELoss(), x, y, x, y, regularization=REG),
        "test_train": reference_influences(model, nn.MSELoss(), x, y, xt, yt, regularization=REG),
    }


# -- agreement between entry points -----------------------------------------------------------
def test_matches_autograd_reference(fitted, reference):
    name, m, (x, y, xt, yt) = fitted
    assert rel_err(m.influences(xt, yt, x, y), reference["test_train"]) < TOL[name]


def test_self_influences_are_the_diagonal(fitted, reference):
    name, m, (x, y, _, _) = fitted
    s = m.self_influences(x, y)
    assert s.shape == (x.shape[0],)
    assert rel_err(s, torch.diagonal(m.influences(x, y, x, y))) < TOL[name]
    assert rel_err(s, torch.diagonal(reference["train_train"])) < TOL[name]
    assert bool((s > 0).all())  # H + lambda I is positive definite here


def test_influences_equal_factors_route(fitted):
    _, m, (x, y, xt, yt) = fitted
    factors = m.influence_factors(xt, yt)
    assert factors.shape == (xt.shape[0], m.num_params)
    direct = m.influences(xt, yt, x, y)
    assert torch.allclose(direct, m.influences_from_factors(factors, x, y), rtol=1e-12, atol=1e-14)


def test_mode_string_and_enum_agree(fitted):
    _, m, (x, y, xt, yt) = fitted
    factors = m.influence_factors(xt, yt)
    up = m.influences_from_factors(factors, x, y, mode="up")
    assert up.shape == (xt.shape[0], x.shape[0])
    for mode in (di.InfluenceMode.up, "UP", " up "):
        assert torch.equal(m.influences_from_factors(factors, x, y, mode=mode), up)
    # a string built at run time (not interned) must still mean up-weighting
    assert torch.equal(m.influences_from_factors(factors, x, y, mode="".join(["u", "p"])), up)
    pert = m.influences_from_factors(factors, x, y, mode="perturbation")
    assert pert.shape == (xt.shape[0], x.shape[0], 3)
    assert torch.equal(m.influences_from_factors(factors, x, y, mode=di.InfluenceMode.perturbation), pert)


def test_default_training_points_are_the_test_points(fitted):
    _, m, (_, _, xt, yt) = fitted
    square = m.influences(xt, yt)
    assert square.shape == (xt.shape[0], xt.shape[0])
    assert torch.allclose(square, m.influences(xt, yt, xt, yt), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["direct", "cg"])
def test_symmetric_for_exact_solvers(mlp_regression, name):
    model, mse, x, y, _, _ = mlp_regression
    m = _solvers()[name](model, mse, REG).fit(loader(x, y, 10))
    square = m.influences(x, y)
    assert rel_err(square, square.T) < TOL[name]


def test_chunk_size_does_not_change_results(mlp_regression):
    model, mse, x, y, xt, yt = mlp_regression
    a = di.DirectInfluence(model, mse, regularization=REG).fit(loader(x, y, 10))
    b = di.DirectInfluence(model, mse, regularization=REG, chunk_size=5).fit(loader(x, y, 10))
    assert rel_err(b.influences(xt, yt, x, y), a.influences(xt, yt, x, y)) < 1e-12
    assert rel_err(b.self_influences(x, y), a.self_influences(x, y)) < 1e-12
    assert (
        rel_err(b.influences(xt, yt, x, y, mode="perturbation"), a.influences(xt, yt, x, y, mode="perturbation"))
        < 1e-12
    )


def test_training_data_kinds_agree(mlp_regression):
    """A DataLoader, a list of batches, a pair of tensors and a pair of numpy arrays."""
    model, mse, x, y, xt, yt = mlp_regression
    expected = di.DirectInfluence(model, mse, regularization=REG).fit(loader(x, y, 10)).influences(xt, yt, x, y)
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, x.shape[0], 7)]
    for data in (batches, (x, y), (x.numpy(), y.numpy())):
        m = di.DirectInfluence(model, mse, regularization=REG)
        assert m.fit(data) is m
        assert m.n_train_ == x.shape[0]
        assert rel_err(m.influences(xt, yt, x, y), expected) < 1e-12


def test_numpy_inputs(mlp_classification):
    model, ce, x, y, xt, yt = mlp_classification
    m = di.DirectInfluence(model, ce, regularization=1.0).fit((x.numpy(), y.numpy()))
    expected = m.influences(xt, yt, x, y)
    actual = m.influences(xt.numpy(), yt.numpy(), x.numpy(), y.numpy())
    assert isinstance(actual, torch.Tensor) and actual.dtype == torch.float64
    assert torch.equal(actual, expected)
    assert torch.equal(m.self_influences(x.numpy(), y.numpy()), m.self_influences(x, y))
    # float32 numpy inputs are cast to the model's float64
    assert rel_err(m.influences(xt.numpy().astype(np.float32), yt.numpy(), x, y), expected) < 1e-5


# -- dtypes ---------------------------------------------------------------------------------
def test_float32_model_gives_float32(mlp_regression):
    model64, mse, x, y, xt, yt = mlp_regression
    model32 = tanh_mlp(3, 6, 1, seed=3).float()
    m32 = di.DirectInfluence(model32, mse, regularization=REG).fit(loader(x.float(), y.float(), 10))
    m64 = di.DirectInfluence(model64, mse, regularization=REG).fit(loader(x, y, 10))
    i32 = m32.influences(xt, yt, x, y)  # float64 inputs, float32 model
    assert i32.dtype == torch.float32
    assert m32.influence_factors(xt, yt).dtype == torch.float32
    assert m32.self_influences(x, y).dtype == torch.float32
    assert m32.influences(xt, yt, x, y, mode="perturbation").dtype == torch.float32
    i64 = m64.influences(xt.float(), yt.float(), x.float(), y.float())  # float32 inputs, float64 model
    assert i64.dtype == torch.float64
    assert rel_err(i32, i64) < 1e-4


def test_float32_cg_default_tolerance(mlp_regression):
    model, mse, x, y, xt, yt = mlp_regression
    model32 = tanh_mlp(3, 6, 1, seed=3).float()
    cg32 = di.CgInfluence(model32, mse, regularization=REG).fit(loader(x.float(), y.float(), 10))
    out = cg32.influences(xt, yt, x, y)
    expected = di.DirectInfluence(model, mse, regularization=REG).fit(loader(x, y, 10)).influences(xt, yt, x, y)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-4


class _TokenModel(nn.Module):
    """Embedding of 4 token ids, flattened, then a linear read-out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Embedding(10, 3)
        self.head = nn.Linear(12, 1)

    def forward(self, ids):
        return self.head(self.embed(ids).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_integer_token_inputs(dtype):
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 10, (20, 4), generator=g)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = _TokenModel().to(dtype).eval()
    # the loss is bilinear in (embedding, head), so H is indefinite (smallest eigenvalue ~ -0.5)
    m = di.DirectInfluence(model, nn.MSELoss(), regularization=1.0).fit(loader(ids, y.to(dtype), 8))
    out = m.influences(ids[:3], y[:3], ids, y, mode="up")
    assert out.dtype == dtype, "the output dtype follows the model, never the (integer) inputs"
    assert m.self_influences(ids, y).dtype == dtype
    expected = reference_influences(model.double(), nn.MSELoss(), ids, y, ids[:3], y[:3], regularization=1.0)
    assert rel_err(out, expected) < (1e-10 if dtype == torch.float64 else 1e-4)
    # influences are not integers: a truncating implementation would give all-integer values
    assert not bool((out == out.round()).all())


# -- trainable parameters ------------------------------------------------------------------------
def test_frozen_layer_is_excluded(mlp_regression):
    model, mse, x, y, xt, yt = mlp_regression
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    try:
        m = di.DirectInfluence(model, mse, regularization=0.1).fit(loader(x, y, 10))
        assert m.num_params == 7  # the 6 + 1 parameters of the last layer
        assert m.influence_factors(xt, yt).shape == (5, 7)
        expected = reference_influences(model, mse, x, y, xt, yt, regularization=0.1)
        assert rel_err(m.influences(xt, yt, x, y), expected) < 1e-10
    finally:
        model[0].weight.requires_grad_(True)
        model[0].bias.requires_grad_(True)


# -- solver-specific behaviour -------------------------------------------------------------------
def test_direct_regularization_can_change_after_fit(mlp_regression):
    model, mse, x, y, xt, yt = mlp_regression
    m = di.DirectInfluence(model, mse, regularization=REG).fit(loader(x, y, 10))
    m.regularization = 5.0
    expected = reference_influences(model, mse, x, y, xt, yt, regularization=5.0)
    assert rel_err(m.influences(xt, yt, x, y), expected) < 1e-10


def test_lissa_dampen_adds_to_regularization(mlp_regression):
    """The documented fixed point: (H + (lambda + dampen * scale) I) x = b."""
    model, mse, x, y, xt, yt = mlp_regression
    m = di.LissaInfluence(model, mse, regularization=REG, dampen=0.05, batch_size=24, maxiter=3000, rtol=1e-11).fit(
        loader(x, y, 10)
    )
    out = m.influences(xt, yt, x, y)
    effective = REG + 0.05 * m.scale_
    expected = reference_influences(model, mse, x, y, xt, yt, regularization=effective)
    assert rel_err(out, expected) < 1e-6


def test_lissa_explicit_scale_and_h0(mlp_regression):
    model, mse, x, y, xt, yt = mlp_regression
    exact = di.DirectInfluence(model, mse, regularization=REG).fit(loader(x, y, 10))
    start = exact.influence_factors(xt[:1], yt[:1])[0]
    m = di.LissaInfluence(
        model, mse, regularization=REG, scale=20.0, h0=start, batch_size=24, maxiter=3000, rtol=1e-10
    ).fit(loader(x, y, 10))
    out = m.influence_factors(xt[:1], yt[:1])
    assert m.info_.iterations <= 3  # started at the solution
    assert rel_err(out[0], start) < 1e-8


def _ill_conditioned_ridge(n=60, p=40, seed=0):
    """Linear regression whose mean-MSE Hessian has eigenvalues 8 x [10, 1e3] and 32 x [1e-3, 1e-2]."""
    g = torch.Generator().manual_seed(seed)
    eig = torch.cat([torch.logspace(1, 3, 8, dtype=torch.float64), torch.logspace(-3, -2, p - 8, dtype=torch.float64)])
    u = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64)).Q
    x = (n / 2) ** 0.5 * u @ torch.diag(eig.sqrt()) @ v.T  # 2 x^T x / n = v diag(eig) v^T
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(p, 1, bias=False).double().eval()
    return model, x, y, v @ torch.diag(eig) @ v.T


@pytest.mark.parametrize("rhs_block_size", [None, 1], ids=["block", "single"])
def test_nystroem_preconditioner_cuts_iterations(rhs_block_size):
    model, x, y, _ = _ill_conditioned_ridge()
    xt, yt = x[:3], y[:3] + 1
    kwargs = dict(regularization=1e-3, maxiter=1000, rhs_block_size=rhs_block_size)
    exact = di.DirectInfluence(model, nn.MSELoss(), regularization=1e-3).fit(loader(x, y, 16)).influences(xt, yt, x, y)
    plain = di.CgInfluence(model, nn.MSELoss(), **kwargs).fit(loader(x, y, 16))
    nys = di.CgInfluence(model, nn.MSELoss(), preconditioner="nystroem", preconditioner_rank=10, **kwargs)
    nys.fit(loader(x, y, 16))
    assert rel_err(plain.influences(xt, yt, x, y), exact) < 1e-6
    assert rel_err(nys.influences(xt, yt, x, y), exact) < 1e-6
    # measured: 24 vs 14 (block of 3), 79 vs 22 (one right-hand side at a time)
    assert nys.info_.iterations < 0.75 * plain.info_.iterations, (nys.info_.iterations, plain.info_.iterations)
    assert nys.preconditioner.num_applications > 0


@pytest.mark.parametrize("preconditioner", ["jacobi", "nystroem", "instance"])
def test_configured_preconditioner_is_used(mlp_regression, preconditioner):
    model, mse, x, y, xt, yt = mlp_regression
    if preconditioner == "instance":
        preconditioner = di.NystroemPreconditioner(rank=5)
    m = di.CgInfluence(model, mse, regularization=REG, preconditioner=preconditioner).fit(loader(x, y, 10))
    assert isinstance(m.preconditioner, di.Preconditioner)
    assert m.preconditioner.num_applications == 0
    m.influence_factors(xt, yt)
    used = m.preconditioner.num_applications
    assert used >= m.info_.iterations >= 1
    m.self_influences(x, y)
    assert m.preconditioner.num_applications > used


def test_cg_tolerance_is_per_right_hand_side():
    """Right-hand sides of very different norms in one block each meet their OWN tolerance.

    A tolerance taken from the whole block (e.g. rtol times the largest norm) stops the small
    right-hand sides early, with a relative error far above rtol on their rows.
    """
    model, x, y, _ = _ill_conditioned_ridge()
    with torch.no_grad():
        fit_values = model(x[:3])
    # residuals of 1, 1e-4 and 1e-8: gradient norms spread over eight orders of magnitude
    yt = fit_values + torch.tensor([[1.0], [1e-4], [1e-8]], dtype=torch.float64)
    direct = di.DirectInfluence(model, nn.MSELoss(), regularization=1e-3).fit(loader(x, y, 16))
    cg = di.CgInfluence(model, nn.MSELoss(), regularization=1e-3, maxiter=1000).fit(loader(x, y, 16))
    expected = direct.influence_factors(x[:3], yt)
    actual = cg.influence_factors(x[:3], yt)
    norms = expected.norm(dim=1)
    assert float(norms[0] / norms[2]) > 1e7
    row_errors = (actual - expected).norm(dim=1) / norms
    assert float(row_errors.max()) < 1e-6, f"per-row relative errors {row_errors.tolist()}"
    assert bool((cg.info_.relative_residuals <= cg.rtol).all())


def test_cg_non_convergence_warns_with_residuals():
    model, x, y, _ = _ill_conditioned_ridge()
    m = di.CgInfluence(model, nn.MSELoss(), regularization=1e-3, maxiter=1).fit(loader(x, y, 16))
    with pytest.warns(di.ConvergenceWarning, match=r"maxiter=1") as record:
        m.influence_factors(x[:3], y[:3] + 1)
    message = str(record[0].message)
    assert "residual" in message and "e-" in message, message
    assert m.info_.iterations == 1 and not bool(m.info_.converged.any())
    assert bool((m.info_.relative_residuals > 1e-3).all())


def test_cg_converged_solve_does_not_warn(mlp_regression):
    model, mse, x, y, xt, yt = mlp_regression
    m = di.CgInfluence(model, mse, regularization=REG).fit(loader(x, y, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", di.ConvergenceWarning)
        m.influences(xt, yt, x, y)
    assert bool(m.info_.converged.all())
    assert float(m.info_.relative_residuals.max()) <= 1e-10


def test_cg_zero_right_hand_side(mlp_regression):
    """A test point with zero gradient gives a zero factor row, not NaN."""
    model, mse, x, y, _, _ = mlp_regression
    m = di.CgInfluence(model, mse, regularization=REG).fit(loader(x, y, 10))
    with torch.no_grad():
        y0 = model(x[:2])  # perfect predictions: zero loss gradient
    factors = m.influence_factors(x[:2], y0)
    assert torch.equal(factors, torch.zeros_like(factors))


# -- modules with state ------------------------------------------------------------------------
def test_eval_mode_batch_norm_uses_running_statistics(mlp_regression):
    _, mse, x, y, xt, yt = mlp_regression
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model.train()(2 * x + 1)  # move the running statistics away from (0, 1)
    model.eval()
    m = di.DirectInfluence(model, mse, regularization=7.0).fit(loader(x, y, 10))  # H's min ~ -3.1
    expected = reference_influences(model, mse, x, y, xt, yt, regularization=7.0)
    assert rel_err(m.influences(xt, yt, x, y), expected) < 1e-10


@pytest.mark.parametrize("name", SOLVERS)
def test_fitted_solver_pickles(mlp_regression, name):
    import pickle

    model, mse, x, y, xt, yt = mlp_regression
    m = _solvers()[name](model, mse, REG).fit(loader(x, y, 10))
    clone = pickle.loads(pickle.dumps(m))
    assert clone.is_fitted and clone.n_train_ == x.shape[0]
    assert torch.equal(clone.influences(xt, yt, x, y), m.influences(xt, yt, x, y))


def test_cg_refuses_an_indefinite_hessian():
    """An untrained tanh MLP with cross-entropy has an indefinite Hessian: CG must not
    return garbage with a warning but say that H + lambda I is not positive definite."""
    import torch
    from torch import nn

    import dask_influence as di

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (200,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    hessian = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=1.0).fit((x, y)).hessian
    lam_min = float(torch.linalg.eigvalsh(hessian).min())
    assert lam_min < -1e-3  # the premise: H is indefinite here
    solver = di.CgInfluence(model, nn.CrossEntropyLoss(), regularization=abs(lam_min) / 10).fit((x, y))
    with pytest.raises(di.NotPositiveDefiniteError, match="regularization=") as info:
        solver.influences(x[:5], y[:5], x, y)
    # the reported bound is a true upper bound on H's smallest eigenvalue...
    assert info.value.smallest_eigenvalue - solver.regularization >= lam_min - 1e-9
    # ...and the suggested regularization makes CG agree with the direct solver
    lam = info.value.suggested_regularization
    assert lam > abs(lam_min)
    cg = di.CgInfluence(model, nn.CrossEntropyLoss(), regularization=lam).fit((x, y)).influences(x[:5], y[:5], x, y)
    direct_solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=lam).fit((x, y))
    direct = direct_solver.influences(x[:5], y[:5], x, y)
    assert float((cg - direct).abs().max() / direct.abs().max()) < 1e-8


@pytest.mark.parametrize("blocks_kind", ["full", "layer"])
def test_ggn_from_per_sample_jacobians_equals_the_ggn_from_products(blocks_kind, monkeypatch):
    """Direct forms the GGN as sum_i J_i^T H_i J_i from per-sample output Jacobians (issue 16);
    it must equal the matrix formed column by column from GGN-vector products."""
    from dask_influence.core import blocks

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)
    ).double()
    x, y = torch.randn(37, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (37,))
    loss = torch.nn.CrossEntropyLoss()
    fast = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn", blocks=blocks_kind, chunk_size=16)
    fast.fit((x, y))
    monkeypatch.setattr(blocks, "JACOBIAN_MAX_OUTPUTS", 0)  # the column-by-column route
    slow = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn", blocks=blocks_kind, chunk_size=16)
    slow.fit((x, y))
    assert float((fast.hessian - slow.hessian).abs().max() / slow.hessian.abs().max()) < 1e-12
