"""Fitting over train blocks on a 2-worker cluster (and block by block in this process) gives the
state and the influences of an ordinary in-process fit, for every solver, with uneven blocks."""

import dask.array as da
import pytest
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from fit_cases import SOLVERS, UNEVEN, make_problem, rel_diff, solver_id, state_diff

TOL = 1e-12  # float64; only the order of the sums differs


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def blocks_of(cls, x, y):
    """Uneven dask-array blocks; LiSSA (whose solve draws random batches from a dataset) gets a loader."""
    if cls is di.LissaInfluence:
        return DataLoader(TensorDataset(x, y), batch_size=10)  # 10, 10, 10, 10, 7
    return da.from_array(x.numpy(), chunks=(UNEVEN, -1)), da.from_array(y.numpy(), chunks=(UNEVEN,))


@pytest.mark.parametrize("case", SOLVERS, ids=solver_id)
def test_cluster_fit_equals_in_process_fit(case, problem, fit_client, recwarn):
    cls, kwargs, passes = case
    model, loss, (x, y), (xt, yt) = problem
    reference = cls(model, loss, regularization=0.3, **kwargs).fit(DataLoader(TensorDataset(x, y), batch_size=10))
    expected = reference.influences(xt, yt, x, y)

    calc = di.DaskInfluenceCalculator(cls(model, loss, regularization=0.3, **kwargs), fit_client, progress=False)
    fitted = calc.fit(blocks_of(cls, x, y))
    assert fitted is calc.solver and fitted.is_fitted and fitted.n_train_ == len(x)
    assert state_diff(fitted, reference) < TOL
    assert rel_diff(fitted.influences(xt, yt, x, y), expected) < TOL
    if passes is not None:  # one sweep serves all vectors of a product (Direct: all of H at once)
        assert calc.last_fit_["sweeps"] == passes
    assert calc.last_fit_["blocks"] == (5 if cls is di.LissaInfluence else len(UNEVEN))

    local = di.SequentialInfluenceCalculator(cls(model, loss, regularization=0.3, **kwargs), progress=False)
    local.fit(blocks_of(cls, x, y))
    assert state_diff(local.solver, reference) < TOL
    assert rel_diff(local.solver.influences(xt, yt, x, y), expected) < TOL


def test_fitted_solver_scores_on_the_cluster(problem, fit_client, tmp_path):
    """After calc.fit, CG's test factors are solved on the client with distributed sweeps
    (factors='auto'), and the store equals the in-process result, as with factors='workers'."""
    model, loss, (x, y), (xt, yt) = problem
    kwargs = {"regularization": 0.3, "preconditioner": "jacobi"}
    expected = di.CgInfluence(model, loss, **kwargs).fit((x, y)).influences(xt, yt, x, y).numpy()
    train, test = DataLoader(TensorDataset(x, y), batch_size=10), DataLoader(TensorDataset(xt, yt), batch_size=4)
    for factors, on_client in (("auto", 2), ("workers", None)):
        calc = di.DaskInfluenceCalculator(
            di.CgInfluence(model, loss, **kwargs), fit_client, progress=False, factors=factors
        )
        calc.fit(train)
        group = calc.influences_to_zarr(test, train, tmp_path / f"{factors}.zarr")
        assert calc.last_run_.get("factor_blocks_on_client") == on_client
        assert rel_diff(group["influences"][...], expected) < 1e-9  # CG's rtol is 1e-10


def test_fit_errors(problem, fit_client, tmp_path):
    model, loss, (x, y), _ = problem
    calc = di.DaskInfluenceCalculator(di.DirectInfluence(model, loss, regularization=0.3), fit_client, progress=False)
    with pytest.raises(di.NotFittedError, match=r"calc\.fit\(train\)"):
        calc.influences((x, y), (x, y))
    bad = x.clone()
    bad[30, 2] = float("nan")
    with pytest.raises(di.NonFiniteError, match="training block starting at sample 30"):
        calc.fit((bad, y), train_block_size=10)
    with pytest.raises(ValueError, match="factors must be"):
        di.DaskInfluenceCalculator(calc.solver, fit_client, factors="driver")
    with pytest.raises(ValueError, match=r"calc\.fit\(train\) first"):
        cg = di.CgInfluence(model, loss, regularization=0.3).fit((x, y))
        di.DaskInfluenceCalculator(cg, fit_client, factors="client", progress=False).influences_to_zarr(
            (x, y), (x, y), tmp_path / "unused.zarr"
        )
    assert not (tmp_path / "unused.zarr").exists()
