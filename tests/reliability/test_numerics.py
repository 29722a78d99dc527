"""Numerics a user must not miss: non-convergence (warning and attributes), a curvature that
is not positive definite (with its smallest eigenvalue), float32 against float64."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.mapping.store import ATTR, is_complete

# float32 results agree with float64 to this, relative to the largest |influence| (docs/reliability.md)
FLOAT32_TOLERANCE = 1e-4


def problem(seed=0, n=40, d=4, hidden=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double().eval()
    return model, nn.CrossEntropyLoss(), x, y


def loaders(x, y, n_test=12):
    return (
        DataLoader(TensorDataset(x[:n_test], y[:n_test]), batch_size=4),
        DataLoader(TensorDataset(x, y), batch_size=10),
    )


def test_cg_non_convergence_is_warned_and_stored(tmp_path):
    model, loss, x, y = problem()
    solver = di.CgInfluence(model, loss, regularization=1e-3, curvature="ggn", maxiter=2).fit((x, y))
    test, train = loaders(x, y)
    with pytest.warns(di.ConvergenceWarning) as caught:
        group = di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
            test, train, tmp_path / "s.zarr"
        )
    messages = [str(w.message) for w in caught]
    job_warning = [m for m in messages if m.startswith("CgInfluence missed its tolerance")]
    assert len(job_warning) == 1 and "for 12 test point(s): largest relative residual" in job_warning[0]
    assert "after at most 2 iterations" in job_warning[0] and "'solver_info'" in job_warning[0]
    info = group.attrs[ATTR]["solver_info"]
    assert info["converged"] is False and info["not_converged"] == 12 and info["max_iterations"] == 2
    assert info["max_relative_residual"] > solver.rtol and info["tolerance"] == solver.rtol
    assert info["blocks_recorded"] == info["blocks"] == 3 and len(info["per_block_max_relative_residual"]) == 3
    assert is_complete(group)  # the job completes; the residuals say how far to trust it
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s.zarr"), "--no-stats"]).output
    assert "Solver: relative residual |g - (H + lambda I) f| / |g| per test point at most" in text
    assert "12 test point(s) above it" in text


def test_residuals_recorded_on_a_cluster_equal_those_recorded_in_process(tmp_path):
    """Factor tasks on a worker return their solver's record alongside the factors (on a copy
    of the solver, so that tasks sharing a worker cannot mix up records)."""
    from distributed import Client, LocalCluster

    model, loss, x, y = problem()
    solver = di.CgInfluence(model, loss, regularization=1e-3, curvature="ggn", maxiter=3).fit((x, y))
    test, train = loaders(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", di.ConvergenceWarning)
        seq = di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
            test, train, tmp_path / "a.zarr"
        )
        # one in-process worker of one thread: several threads sharing a solver is a known bug
        # (tests/reliability/test_properties.py::test_threads_of_one_worker_sharing_the_solver)
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            dist = di.DaskInfluenceCalculator(solver, client, progress=False).influences_to_zarr(
                test, train, tmp_path / "b.zarr"
            )
    a, b = seq.attrs[ATTR]["solver_info"], dist.attrs[ATTR]["solver_info"]
    np.testing.assert_allclose(b["per_block_max_relative_residual"], a["per_block_max_relative_residual"], rtol=1e-9)
    assert a["not_converged"] == b["not_converged"] == 12
    assert solver.info_ is None or solver.info_.iterations == 3  # the caller's solver is left alone


def test_converged_cg_records_residuals_below_tolerance_and_resume_fills_missing_records(tmp_path):
    model, loss, x, y = problem()
    solver = di.CgInfluence(model, loss, regularization=1e-2, curvature="ggn").fit((x, y))
    test, train = loaders(x, y)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", di.ConvergenceWarning)
        group = calc.influences_to_zarr(test, train, tmp_path / "s.zarr")
    info = group.attrs[ATTR]["solver_info"]
    assert info["converged"] is True and info["not_converged"] == 0
    assert info["max_relative_residual"] <= solver.rtol
    # a record lost (e.g. the job was killed between a block's factors and its record) is
    # recomputed on resume, even though every chunk is done
    (tmp_path / "s.zarr" / "solver_info" / "c" / "1" / "0").unlink()
    group = calc.influences_to_zarr(test, train, tmp_path / "s.zarr", resume=True)
    assert calc.last_run_["chunks_computed"] == 0
    assert group.attrs[ATTR]["solver_info"]["blocks_recorded"] == 3


def test_lissa_non_convergence_is_warned_and_stored(tmp_path):
    model, loss, x, y = problem()
    solver = di.LissaInfluence(model, loss, regularization=0.1, curvature="ggn", maxiter=3).fit((x, y))
    test, train = loaders(x, y)
    with pytest.warns(
        di.ConvergenceWarning,
        match=r"LissaInfluence missed its tolerance.*relative residual",
    ):
        group = di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
            test, train, tmp_path / "s.zarr"
        )
    info = group.attrs[ATTR]["solver_info"]
    assert info["converged"] is False and info["max_iterations"] == 3 and info["max_relative_residual"] > 1e-4


def test_not_positive_definite_curvature_reports_its_smallest_eigenvalue(tmp_path):
    """CG meets the negative curvature of an untrained network's Hessian inside a job; the
    direct solver's case is in tests/core/test_errors.py."""
    model, loss, x, y = problem()
    solver = di.CgInfluence(model, loss, regularization=0.0).fit((x, y))  # fit does not solve
    test, train = loaders(x, y)
    with pytest.raises(di.NotPositiveDefiniteError, match=r"H has an eigenvalue of at most -\d") as info:
        di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(test, train, tmp_path / "s.zarr")
    assert info.value.smallest_eigenvalue < 0 < info.value.suggested_regularization
    assert f"Pass regularization={info.value.suggested_regularization:g}" in str(info.value)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert not is_complete(group) and group.attrs[ATTR]["complete"] is False


@pytest.mark.parametrize(
    "solver, kw", [(di.DirectInfluence, {}), (di.CgInfluence, {}), (di.ArnoldiInfluence, {"rank": 20})]
)
def test_float32_agrees_with_float64(solver, kw, tmp_path):
    worst = 0.0
    for seed in range(3):
        model, loss, x, y = problem(seed, n=60, d=5, hidden=8)
        m64 = solver(model, loss, regularization=1e-2, curvature="ggn", **kw).fit((x, y))
        m32 = solver(copy.deepcopy(model).float(), loss, regularization=1e-2, curvature="ggn", **kw).fit((x.float(), y))
        a = m64.influences(x[:10], y[:10], x, y).numpy()
        b = m32.influences(x[:10].float(), y[:10], x.float(), y).numpy()
        assert b.dtype == np.float32
        worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    assert worst <= FLOAT32_TOLERANCE, worst
    # the same through a store: float32 chunks, within the same tolerance
    test, train = loaders(x, y)
    s64 = di.SequentialInfluenceCalculator(m64, progress=False).influences_to_zarr(test, train, tmp_path / "a.zarr")
    s32 = di.SequentialInfluenceCalculator(m32, progress=False).influences_to_zarr(test, train, tmp_path / "b.zarr")
    assert s32["influences"].dtype == np.float32 and s64["influences"].dtype == np.float64
    a, b = s64["influences"][...], s32["influences"][...]
    assert np.abs(a - b).max() <= FLOAT32_TOLERANCE * np.abs(a).max()
    print(f"\nMEASURED float32 vs float64 ({solver.__name__}): worst relative error {worst:.1e}")
