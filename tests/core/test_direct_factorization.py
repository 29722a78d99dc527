"""DirectInfluence's factorization: a checked Cholesky of ``H + lambda I`` (float64), the exact
eigenvalues when it is not clearly definite, and files of earlier versions (eigendecompositions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dask_influence as di
from dask_influence.core.solvers.direct import DirectState, _checked_cholesky, _eigen_factor


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))  # untrained: the GGN
    solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.05, curvature="ggn").fit((x, y))
    return solver, model, x, y


def test_solves_equal_a_dense_solve(fitted):
    solver, model, x, y = fitted
    g = solver.per_sample_grads(x[:6], y[:6])
    h = solver.hessian.double()
    expected = torch.linalg.solve(h + 0.05 * torch.eye(h.shape[0], dtype=h.dtype), g.T).T
    assert torch.allclose(solver.influence_factors(x[:6], y[:6]), expected, rtol=1e-10, atol=1e-12)


def test_a_new_regularization_refactorizes(fitted):
    solver, model, x, y = fitted
    other = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.5, curvature="ggn").fit((x, y))
    before = solver.influences(x[:4], y[:4], x, y)
    try:
        solver.regularization = 0.5
        assert torch.allclose(solver.influences(x[:4], y[:4], x, y), other.influences(x[:4], y[:4], x, y), rtol=1e-10)
    finally:
        solver.regularization = 0.05
    assert torch.allclose(solver.influences(x[:4], y[:4], x, y), before, rtol=0, atol=0)


def test_an_eigendecomposition_of_an_earlier_version_loads_and_solves_the_same(fitted, tmp_path):
    """Files saved before the Cholesky factorization hold ``eigenvalues``/``eigenvectors``."""
    solver, model, x, y = fitted
    e, v = torch.linalg.eigh(solver.hessian)
    old = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.05, curvature="ggn").fit((x, y))
    old.state_ = DirectState(old.state_.blocks, eigenvalues=(e,), eigenvectors=(v,))
    old.save(tmp_path / "old.pt")
    loaded = di.DirectInfluence.load(tmp_path / "old.pt", model, nn.CrossEntropyLoss())
    assert loaded.state_.matrices is None
    expected = solver.influences(x[:5], y[:5], x, y)
    assert torch.allclose(loaded.influences(x[:5], y[:5], x, y), expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(loaded.hessian, solver.hessian, rtol=1e-9, atol=1e-12)
    loaded.state_ = DirectState(old.state_.blocks, eigenvalues=(e - 1.0,), eigenvectors=(v,))
    with pytest.raises(di.NotPositiveDefiniteError):  # refused by its eigenvalues, as before
        loaded.influence_factors(x[:2], y[:2])


def test_a_factorization_within_rounding_is_left_to_the_exact_eigenvalues():
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    d = torch.logspace(0, -20, 30, dtype=torch.float64)  # the last ones far below p * eps
    h = (q * d) @ q.T
    assert _checked_cholesky(h, 0.0) is None  # may factor, but is not clearly definite
    factor = _checked_cholesky(h, 1e-3)
    assert factor is not None
    assert torch.allclose(factor @ factor.T, h + 1e-3 * torch.eye(30, dtype=h.dtype), rtol=0, atol=1e-13)
    # the fallback factor of a definite matrix that Cholesky refuses by rounding
    root = _eigen_factor(h, 1e-9)
    assert torch.allclose(root @ root.T, h + 1e-9 * torch.eye(30, dtype=h.dtype), rtol=0, atol=1e-13)
    assert torch.equal(root, torch.tril(root))


def test_a_singular_hessian_is_still_refused_with_its_smallest_eigenvalue():
    torch.manual_seed(2)
    model = nn.Linear(6, 1, bias=False).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    with pytest.raises(di.NotPositiveDefiniteError, match="not positive definite") as info:
        di.DirectInfluence(model, nn.MSELoss()).fit((x, y))  # rank 4 of 6
    assert abs(info.value.smallest_eigenvalue) < 1e-10
