"""Fitted state ships: every solver pickles, saves and loads to identical influences."""

import copy
import pickle

import pytest
import torch

import dask_influence as di
from cases import save_load_problem, solver_cases

# every registered solver (and Direct's layer blocks), on a problem where H + 0.3 I is positive definite
CASES = solver_cases(
    override={"cg": {"preconditioner": "nystroem", "preconditioner_rank": 5}},
    variants={"direct": [{"blocks": "layer"}]},
)
SOLVERS = [pytest.param(case.cls, case.kwargs, id=case.id) for case in CASES]


def _fit(cls, kwargs):
    model, loss, x, y = save_load_problem()
    solver = cls(model, loss, regularization=0.3, **kwargs).fit((x, y))
    return solver, model, loss, x, y


@pytest.mark.parametrize("cls, kwargs", SOLVERS)
def test_save_and_load_give_identical_influences(cls, kwargs, tmp_path, recwarn):
    solver, model, loss, x, y = _fit(cls, kwargs)
    expected = solver.influences(x[:4], y[:4], x, y)
    path = tmp_path / "fit.pt"
    solver.save(path)
    fresh_model = copy.deepcopy(model)  # same weights, a different object
    loaded = cls.load(path, fresh_model, loss, train=(x, y))
    assert loaded.is_fitted and loaded.n_train_ == 30
    assert torch.equal(loaded.influences(x[:4], y[:4], x, y), expected)


@pytest.mark.parametrize("cls, kwargs", SOLVERS)
def test_fitted_solver_pickles(cls, kwargs, recwarn):
    solver, _, _, x, y = _fit(cls, kwargs)
    clone = pickle.loads(pickle.dumps(solver))
    assert torch.equal(clone.influences(x[:3], y[:3], x, y), solver.influences(x[:3], y[:3], x, y))


def test_state_size_is_independent_of_training_set_size(tmp_path):
    """Direct's saved state is O(p^2), not O(n): twice the data, the same file size."""
    model, loss, x, y = save_load_problem()
    small, large = tmp_path / "s.pt", tmp_path / "l.pt"
    di.DirectInfluence(model, loss, regularization=0.3).fit((x[:10], y[:10])).save(small)
    di.DirectInfluence(model, loss, regularization=0.3).fit((x, y)).save(large)
    assert abs(small.stat().st_size - large.stat().st_size) < 64


def test_load_refuses_other_weights(tmp_path):
    solver, model, loss, x, y = _fit(di.DirectInfluence, {})
    solver.save(tmp_path / "fit.pt")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.add_(1e-3)
    with pytest.raises(ValueError, match="trainable parameters differ"):
        di.DirectInfluence.load(tmp_path / "fit.pt", other, loss)


def test_load_refuses_other_class_and_missing_training_data(tmp_path):
    solver, model, loss, x, y = _fit(di.CgInfluence, {})
    solver.save(tmp_path / "cg.pt")
    with pytest.raises(ValueError, match="holds a fitted CgInfluence"):
        di.DirectInfluence.load(tmp_path / "cg.pt", model, loss)
    with pytest.raises(ValueError, match="train=train_loader"):
        di.CgInfluence.load(tmp_path / "cg.pt", model, loss)
    (tmp_path / "junk.pt").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a file written by"):
        di.CgInfluence.load(tmp_path / "junk.pt", model, loss)


def test_save_needs_a_fitted_solver(tmp_path):
    model, loss, _, _ = save_load_problem()
    with pytest.raises(di.NotFittedError):
        di.DirectInfluence(model, loss).save(tmp_path / "x.pt")
