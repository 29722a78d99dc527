"""One API vocabulary (docs/api.md, "One vocabulary"; issue 30 step 3): the new names work and give
the same numbers as the old spellings, which keep working for one release with a
``di.RenamedWarning`` naming the new spelling; both spellings at once are refused in one line."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import dask_influence as di
from cases import trained_classification_problem
from dask_influence.core.solvers.registry import SOLVERS

LAM = 0.3


@pytest.fixture(scope="module")
def problem():
    """The 4-5-3 tanh MLP (43 parameters) near a minimum, float64: ``model, loss, (x, y), (xt, yt)``
    with 47 training and 6 test points."""
    model, loss, (x, y), (xt, yt) = trained_classification_problem()
    return model.double(), loss, (x.double().numpy(), y.numpy()), (xt.double().numpy(), yt.numpy())


@pytest.fixture(scope="module")
def index(problem, tmp_path_factory):
    model, loss, train, _ = problem
    path = tmp_path_factory.mktemp("vocabulary") / "ix.zarr"
    return di.GradientIndex.build(
        model, loss, train, path, projection_dim=12, dtype="float64", regularization=LAM, train_block_size=10,
        client="sync", progress=False,
    )  # fmt: skip


def _quiet(fn, *args, **kwargs):
    """``fn(...)``, failing on any RenamedWarning (the new spellings warn about nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", di.RenamedWarning)
        return fn(*args, **kwargs)


# -- 1. the objective is the task ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_names_its_objective_task(name):
    params = list(inspect.signature(SOLVERS[name].__init__).parameters)
    assert params[:3] == ["self", "model", "task"], params


def test_solver_task_is_a_task_and_loss_is_what_was_given(problem):
    model, loss, (x, y), (xt, yt) = problem
    by_loss = di.DirectInfluence(model, loss, regularization=LAM).fit((torch.from_numpy(x), torch.from_numpy(y)))
    assert isinstance(by_loss.task, di.Task) and by_loss.task.pairs and by_loss.loss is loss
    task = di.tasks.classification()
    by_task = di.DirectInfluence(model, task, regularization=LAM).fit((torch.from_numpy(x), torch.from_numpy(y)))
    assert by_task.task is task and by_task.loss is task
    np.testing.assert_allclose(
        by_task.influences((xt, yt), (x, y)).numpy(),
        by_loss.influences(xt, yt, x, y).numpy(),
        rtol=1e-10,
    )


def test_solver_load_takes_task_and_warns_for_loss(problem, tmp_path):
    model, loss, (x, y), (xt, yt) = problem
    solver = di.DirectInfluence(model, loss, regularization=LAM).fit((torch.from_numpy(x), torch.from_numpy(y)))
    solver.save(tmp_path / "fit.pt")
    expected = solver.influences(xt, yt, x, y).numpy()
    by_task = _quiet(di.DirectInfluence.load, tmp_path / "fit.pt", model, task=loss)
    np.testing.assert_array_equal(by_task.influences(xt, yt, x, y).numpy(), expected)
    with pytest.warns(di.RenamedWarning, match=r"^DirectInfluence\.load: loss= is now spelled task=; the old spelling"):
        by_loss = di.DirectInfluence.load(tmp_path / "fit.pt", model, loss=loss)
    np.testing.assert_array_equal(by_loss.influences(xt, yt, x, y).numpy(), expected)
    with pytest.raises(TypeError, match=r"DirectInfluence\.load: pass task= only \(loss= is its old spelling\)\."):
        di.DirectInfluence.load(tmp_path / "fit.pt", model, loss, loss=loss)


# -- 2. the index's projected influence factors ------------------------------------------------
def test_index_influence_factors_and_the_old_name(index, problem):
    _, _, (x, _), test = problem
    factors = _quiet(index.influence_factors, test)
    assert factors.shape == (6, 12) and factors.dtype == np.float64
    np.testing.assert_allclose(factors @ index.gradients().T, index.influences(test, progress=False), rtol=1e-10)
    with pytest.warns(
        di.RenamedWarning,
        match=r"^GradientIndex\.factors is now spelled GradientIndex\.influence_factors; the old spelling still "
        r"works in this release and will be removed in the next\.$",
    ):
        old = index.factors(test, regularization=LAM)
    np.testing.assert_array_equal(old, factors)


# -- 3. block sizes: train_block_size and test_block_size --------------------------------------
def test_index_build_takes_train_block_size_and_warns_for_block_size(problem, tmp_path, index):
    model, loss, train, _ = problem
    kw = dict(projection_dim=12, dtype="float64", regularization=LAM, client="sync", progress=False)
    with pytest.warns(di.RenamedWarning, match=r"^GradientIndex\.build: block_size= is now spelled train_block_size="):
        old = di.GradientIndex.build(model, loss, train, tmp_path / "old.zarr", block_size=10, **kw)
    assert old.attributes["block_sizes"] == index.attributes["block_sizes"] == [10, 10, 10, 10, 7]
    np.testing.assert_array_equal(old.gradients(), index.gradients())
    with pytest.raises(TypeError, match=r"GradientIndex\.build: pass train_block_size= only \(block_size= is its"):
        di.GradientIndex.build(model, loss, train, tmp_path / "both.zarr", block_size=10, train_block_size=10, **kw)


@pytest.mark.parametrize("method", ["influences", "top_k", "influence_factors", "scores", "influences_to_zarr"])
def test_index_queries_take_test_block_size_and_warn_for_block_size(index, problem, tmp_path, method):
    _, _, _, test = problem
    args = {"top_k": (test, 3), "influences_to_zarr": (test, tmp_path / "q.zarr")}.get(method, (test,))
    call = getattr(index, method)
    new = _quiet(call, *args, test_block_size=4)
    with pytest.warns(
        di.RenamedWarning, match=rf"^GradientIndex\.{method}: block_size= is now spelled test_block_size="
    ):
        old = call(*((test, tmp_path / "old.zarr") if method == "influences_to_zarr" else args), block_size=4)
    if method == "influences_to_zarr":
        assert new["influences"].chunks == old["influences"].chunks == (4, 10)
        new, old = new["influences"][:], old["influences"][:]
    elif method == "top_k":
        new, old = new.helpful_values, old.helpful_values
    elif method == "scores":
        new, old = new.factors, old.factors
    np.testing.assert_array_equal(old, new)
    with pytest.raises(TypeError, match=rf"GradientIndex\.{method}: pass test_block_size= only"):
        call(*args, block_size=4, test_block_size=4)


def test_calculator_fit_and_self_influences_take_train_block_size(problem):
    model, loss, (x, y), _ = problem
    train = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    calc = di.SequentialInfluenceCalculator(di.DirectInfluence(model, loss, regularization=LAM), progress=False)
    _quiet(calc.fit, train, train_block_size=10)
    new = _quiet(calc.self_influences, train, train_block_size=10)
    assert new.chunks == ((10, 10, 10, 10, 7),)
    with pytest.warns(
        di.RenamedWarning, match=r"^SequentialInfluenceCalculator\.fit: block_size= is now spelled train_block_size="
    ):
        calc.fit(train, block_size=10)
    with pytest.warns(
        di.RenamedWarning,
        match=r"^SequentialInfluenceCalculator\.self_influences: block_size= is now spelled train_block_size=",
    ):
        old = calc.self_influences(train, block_size=10)
    np.testing.assert_array_equal(old.compute(), new.compute())
    with pytest.raises(ValueError, match=r"^Pass train_block_size with a train Dataset \(the number of samples"):
        calc.self_influences(train)
    with pytest.raises(ValueError, match=r"^Pass test_block_size with a test Dataset \(the number of samples"):
        calc.influences(train, train, train_block_size=10)
    with pytest.raises(ValueError, match=r"^train_block_size must be a positive int; got 0\.$"):
        calc.influences((x, y), (x, y), train_block_size=0)
    with pytest.raises(TypeError, match=r"a map-style Dataset with test_block_size, or a pair"):
        calc.influences(object(), (x, y))


# -- 4. the curvature defaults the table documents ----------------------------------------------
def test_curvature_defaults_are_the_documented_ones():
    """Solvers default to the Hessian, the index to the GGN (docs/api.md: the GGN as the one
    default was measured 0.04 of leave-one-out Pearson worse on the digits MLP and kept out)."""
    from dask_influence.core.solvers.config import SolverConfig

    assert SolverConfig().curvature == "hessian"
    assert inspect.signature(di.GradientIndex.build).parameters["curvature"].default == "ggn"
    assert di.EkfacInfluence.config_class().curvature == "ggn"
