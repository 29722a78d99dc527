"""A solver fitted by a calculator (in process, on a cluster, or restored from its fit file)
refuses integer inputs after a fit on floating-point ones with the same clear TypeError as
``solver.fit`` (issue 12), instead of a RuntimeError from inside vmap."""

import pytest

import dask_influence as di
from fit_cases import make_problem

INTEGER_INPUTS = r"x_test has integer dtype torch.int64, but the solver was fitted on floating-point inputs"


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def _refuses_integer_inputs(solver, test):
    xt, yt = test
    with pytest.raises(TypeError, match=INTEGER_INPUTS):
        solver.influences(xt.long(), yt)
    with pytest.raises(TypeError, match=r"x has integer dtype torch.int64.*floating-point"):
        solver.self_influences(xt.long(), yt)
    assert solver.influences(xt, yt).shape == (xt.shape[0], xt.shape[0])  # float inputs still work


@pytest.mark.parametrize("cls", [di.DirectInfluence, di.CgInfluence, di.EkfacInfluence])
def test_calculator_fit_records_float_inputs(problem, cls):
    model, loss, train, test = problem
    calc = di.SequentialInfluenceCalculator(cls(model, loss, regularization=0.3), progress=False)
    solver = calc.fit(train, train_block_size=10)
    _refuses_integer_inputs(solver, test)


def test_restored_and_loaded_fits_record_float_inputs(problem, tmp_path):
    model, loss, train, test = problem
    path = tmp_path / "fit.pt"
    di.SequentialInfluenceCalculator(di.DirectInfluence(model, loss, regularization=0.3), progress=False).fit(
        train, train_block_size=10, path=path
    )
    again = di.SequentialInfluenceCalculator(di.DirectInfluence(model, loss, regularization=0.3), progress=False)
    again.fit(train, train_block_size=10, path=path)
    assert again.last_fit_["reused"]
    _refuses_integer_inputs(again.solver, test)
    _refuses_integer_inputs(di.DirectInfluence.load(path, model, loss), test)  # the fit file is a saved solver


def test_cluster_fit_records_float_inputs(problem, fit_client):
    model, loss, train, test = problem
    calc = di.DaskInfluenceCalculator(di.DirectInfluence(model, loss, regularization=0.3), fit_client, progress=False)
    solver = calc.fit(train, train_block_size=10)
    _refuses_integer_inputs(solver, test)
