"""Bad inputs not covered elsewhere; docs/reliability.md lists every bad input tried, with the
test behind it (most are in tests/core/test_errors.py, tests/mapping and tests/cli)."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence.mapping.lock import lock_path
from dask_influence.mapping.store import ATTR, is_complete


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    solver = di.DirectInfluence(model, nn.MSELoss(), regularization=0.5, curvature="ggn").fit((x, y))
    return solver, x, y


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_in_a_job_leaves_an_incomplete_store_and_no_lock(setup, tmp_path, bad):
    solver, x, y = setup
    x_bad = x.clone()
    x_bad[13, 2] = bad
    path = tmp_path / "s.zarr"
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    # the index is within the block the task loaded (row 13 is row 3 of the third block of 5)
    with pytest.raises(di.NonFiniteError, match=r"x contains 1 NaN/Inf value\(s\) \(first at index \(3, 2\)\)"):
        calc.influences_to_zarr((x[:4], y[:4]), (x_bad, y), path, train_block_size=5)
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs[ATTR]["complete"] is False and not is_complete(group)
    assert not os.path.exists(lock_path(path))


def test_unwritable_directory_is_named(setup, tmp_path):
    solver, x, y = setup
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        target = locked / "out.zarr"
        if os.access(locked, os.W_OK):  # root ignores permissions: use a read-only system directory
            if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_create("/sys"):
                pytest.skip("no unwritable directory available to this user")
            locked, target = "/sys", "/sys/dask-influence-test.zarr"
        with pytest.raises(
            di.StoreError,
            match=(
                rf"Cannot write the output store '{target}': the directory "
                rf"'{locked}' is not writable \(Permission denied\)"
            ),
        ):
            di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr((x, y), (x, y), target)
        from dask_influence.job.run import check_store_early

        with pytest.raises(di.StoreError, match="is not writable"):
            check_store_early(str(target), resume=True, overwrite=False)
    finally:
        (tmp_path / "read-only").chmod(0o755)


def _can_create(directory: str) -> bool:
    try:
        os.mkdir(os.path.join(directory, ".dask-influence-probe"))
    except OSError:
        return False
    os.rmdir(os.path.join(directory, ".dask-influence-probe"))
    return True


def test_output_path_inside_a_file(setup, tmp_path):
    solver, x, y = setup
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(di.StoreError, match=r"Cannot create the output store .*/a_file' is a file, not a directory"):
        di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
            (x, y), (x, y), tmp_path / "a_file" / "o.zarr"
        )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"top_k": -1}, ValueError, r"top_k must be a positive int or None; got -1"),
        ({"top_k": "3"}, ValueError, r"top_k must be a positive int or None; got '3'"),
        ({"top_k": True}, ValueError, r"top_k must be a positive int or None; got True"),
        ({"train_block_size": 0}, ValueError, r"block_size must be a positive int; got 0"),
        ({"test_block_size": -3}, ValueError, r"block_size must be a positive int; got -3"),
        ({"train_block_size": "10"}, ValueError, r"block_size must be a positive int; got '10'"),
        ({"train_block_size": 2.5}, ValueError, r"block_size must be a positive int; got 2.5"),
        ({"verify": "yes", "resume": True}, ValueError, r"verify must be True, False, 'full' or 'exists'"),
        ({"break_lock": 1}, TypeError, r"break_lock must be True or False"),
        ({"mode": "sideways"}, ValueError, r"mode must be 'up' or 'perturbation'"),
    ],
)
def test_bad_job_parameters(setup, tmp_path, kwargs, error, message):
    solver, x, y = setup
    with pytest.raises(error, match=message):
        di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
            (x, y), (x, y), tmp_path / "o.zarr", **kwargs
        )
    assert not os.path.exists(tmp_path / "o.zarr")  # refused before anything is written


@pytest.mark.parametrize("budget", [-1, 0, "1GB", 1.5, True])
def test_bad_memory_budget(setup, budget):
    with pytest.raises(ValueError, match=r"memory_budget must be a positive number of bytes, 'auto' or None"):
        di.DaskInfluenceCalculator(setup[0], memory_budget=budget)


def test_empty_data_in_a_job(setup, tmp_path):
    solver, x, y = setup
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    with pytest.raises(ValueError, match=r"The train data is empty; pass at least one sample"):
        calc.influences_to_zarr((x, y), (x[:0], y[:0]), tmp_path / "o.zarr")
    with pytest.raises(ValueError, match=r"The test data is empty"):
        calc.influences_to_zarr(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4), (x, y), tmp_path / "o.zarr")


def test_integer_inputs_to_a_float_model(setup):
    solver, x, y = setup
    with pytest.raises(
        ValueError,
        match=r"could not be evaluated on a training batch with inputs \(20, 3\) "
        r"\(torch\.int64\).*same dtype",
    ):
        di.DirectInfluence(solver.model, nn.MSELoss(), regularization=0.5).fit((x.long(), y))
    # after fitting on floats, integer test inputs are refused with what to pass instead
    with pytest.raises(TypeError, match=r"x_test has integer dtype torch\.int64.*fitted on floating-point inputs"):
        solver.influences(x[:2].long(), y[:2], x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_computed_in_float32_with_a_warning(setup, dtype, tmp_path):
    solver64, x, y = setup
    model = copy.deepcopy(solver64.model).to(dtype)
    with pytest.warns(
        UserWarning,
        match=rf"parameters are {str(dtype)[6:]}; influences are computed on a float32 "
        r"copy of the model",
    ) as caught:
        m = di.CgInfluence(model, nn.MSELoss(), regularization=0.5, curvature="ggn")
    assert caught[0].filename == __file__  # the warning points at the user's line
    assert next(model.parameters()).dtype == dtype  # the model passed in is not changed
    assert m.dtype == torch.float32 and next(m.model.parameters()).dtype == torch.float32
    m.fit((x.to(dtype), y.to(dtype)))
    out = m.influences(x[:3], y[:3], x, y)
    assert out.dtype == torch.float32
    # as accurate as the float32 model of the same (half-precision) weights
    reference = (
        di.CgInfluence(copy.deepcopy(model).double(), nn.MSELoss(), regularization=0.5, curvature="ggn")
        .fit((x.to(dtype).double(), y.to(dtype).double()))
        .influences(x[:3], y[:3], x, y)
    )
    assert float((out.double() - reference).abs().max() / reference.abs().max()) < 1e-4
    # in a job: float32 store; save/load of the fitted solver works with the same half model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        group = di.SequentialInfluenceCalculator(m, progress=False).influences_to_zarr(
            (x, y), (x, y), tmp_path / "o.zarr"
        )
        assert group["influences"].dtype == np.float32
        d = di.DirectInfluence(model, nn.MSELoss(), regularization=0.5, curvature="ggn").fit((x, y))
        d.save(tmp_path / "d.pt")
        again = di.DirectInfluence.load(tmp_path / "d.pt", model, nn.MSELoss())
    torch.testing.assert_close(again.influences(x[:3], y[:3], x, y), d.influences(x[:3], y[:3], x, y))


def test_calculator_refuses_what_is_not_a_solver(setup):
    with pytest.raises(
        TypeError, match=r"solver must be a dask_influence solver \(e\.g\. CgInfluence\); got Sequential"
    ):
        di.SequentialInfluenceCalculator(setup[0].model)


def test_integer_inputs_in_a_perturbation_job(tmp_path):
    ids = torch.randint(0, 5, (12, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randn(12, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(6, 1)).double().eval()
    solver = di.DirectInfluence(model, nn.MSELoss(), regularization=1.0).fit((ids, y))
    with pytest.raises(
        TypeError,
        match=r"Perturbation influences need floating-point train inputs; got int64\. "
        r"Use mode='up'",
    ):
        di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
            (ids, y), (ids, y), tmp_path / "o.zarr", mode="perturbation"
        )
    group = di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
        (ids, y), (ids, y), tmp_path / "o.zarr"
    )
    assert group["influences"].dtype == np.float64  # never integer, whatever the inputs


def test_parameters_of_mixed_dtypes():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1).double())
    with pytest.raises(
        ValueError,
        match=r"All trainable parameters must share one dtype and device; got dtypes "
        r"\['torch\.float32', 'torch\.float64'\].*model\.to\(dtype, device\)",
    ):
        di.DirectInfluence(model, nn.MSELoss())
