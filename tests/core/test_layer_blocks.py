"""Layer-wise (block-diagonal) curvature for Direct, CG and Arnoldi."""

import pytest
import torch

import dask_influence as di
from cases import layer_blocks_problem, solver_cases
from dask_influence.core.blocks import SummedCurvatureOperator
from dask_influence.core.operators import LinearOperator

# every registered solver with a ``blocks`` hyperparameter; Arnoldi at full rank (p = 55), so exact
LAYER_SOLVERS = [
    pytest.param(case.cls, case.kwargs, id=case.name)
    for case in solver_cases(override={"arnoldi": {"rank": 55, "krylov_dimension": 55}})
    if "blocks" in case.cls.config_class.field_names()
]


def _block_diagonal_reference(model, loss, x, y, lam):
    """Influences from the full dense H with every cross-layer entry zeroed."""
    full = di.DirectInfluence(model, loss, regularization=1.0).fit((x, y)).hessian
    mask = torch.zeros_like(full)
    for _, start, stop in di.DirectInfluence(model, loss)._functions.spec.layer_slices():
        mask[start:stop, start:stop] = 1
    h = full * mask + lam * torch.eye(full.shape[0], dtype=full.dtype)
    solver = di.DirectInfluence(model, loss, regularization=1.0).fit((x, y))
    g_test = solver.per_sample_grads(x[:6], y[:6])
    g = solver.per_sample_grads(x, y)
    return g_test @ torch.linalg.solve(h, g.T), full * mask


def test_layer_slices_group_weight_and_bias():
    model, loss, x, y = layer_blocks_problem()
    spec = di.DirectInfluence(model, loss)._functions.spec
    assert [(m, b - a) for m, a, b in spec.layer_slices()] == [("0", 20), ("2", 20), ("4", 15)]


@pytest.mark.parametrize("cls, kwargs", LAYER_SOLVERS)
def test_layer_blocks_equal_the_masked_dense_solution(cls, kwargs):
    model, loss, x, y = layer_blocks_problem()
    lam = 0.5
    expected, _ = _block_diagonal_reference(model, loss, x, y, lam)
    solver = cls(model, loss, regularization=lam, blocks="layer", **kwargs).fit((x, y))
    result = solver.influences(x[:6], y[:6], x, y)
    assert float((result - expected).abs().max() / expected.abs().max()) < 1e-8


def test_direct_layer_blocks_never_form_the_full_matrix(monkeypatch):
    model, loss, x, y = layer_blocks_problem()
    monkeypatch.setattr(LinearOperator, "dense", lambda *a, **k: pytest.fail("formed the full H"))
    monkeypatch.setattr(SummedCurvatureOperator, "dense", lambda *a, **k: pytest.fail("formed the full H"))
    solver = di.DirectInfluence(model, loss, regularization=0.5, blocks="layer").fit((x, y))
    assert [tuple(v.shape) for v in solver.state_.matrices] == [(20, 20), (20, 20), (15, 15)]


def test_direct_layer_hessian_is_the_block_diagonal():
    model, loss, x, y = layer_blocks_problem()
    _, masked = _block_diagonal_reference(model, loss, x, y, 0.5)
    solver = di.DirectInfluence(model, loss, regularization=0.5, blocks="layer").fit((x, y))
    assert float((solver.hessian - masked).abs().max()) < 1e-12


def test_layer_blocks_differ_from_full_curvature():
    """The mode is not a no-op: dropping cross-layer terms changes the answer here."""
    model, loss, x, y = layer_blocks_problem()
    full = di.DirectInfluence(model, loss, regularization=0.5).fit((x, y)).influences(x[:6], y[:6], x, y)
    layer_solver = di.DirectInfluence(model, loss, regularization=0.5, blocks="layer").fit((x, y))
    layer = layer_solver.influences(x[:6], y[:6], x, y)
    assert float((full - layer).abs().max() / full.abs().max()) > 1e-2


def test_unknown_blocks_value():
    model, loss, _, _ = layer_blocks_problem()
    with pytest.raises(ValueError, match="blocks must be 'full'.*'layer'"):
        di.CgInfluence(model, loss, blocks="module")
