"""`dask-influence run --fit-only`, then runs that reuse the saved fit; a resumed job does not refit
and gives the identical store; a saved fit of other training data is refused."""

import sys

import numpy as np
import pytest
import zarr

import dask_influence as di
from dask_influence.job import parse_job
from dask_influence.mapping import fitting
from dask_influence.mapping.store import ATTR
from jobs import EXAMPLE_JOB as EXAMPLE
from jobs import invoke, write_job

N_TRAIN, N_TEST = 70, 9


def fit_job(tmp_path, *, n_train=N_TRAIN, name="job.toml", store="influences.zarr", **solver):
    return write_job(
        tmp_path,
        name,
        options={"n_train": n_train, "n_test": N_TEST},
        solver={"method": "cg", "regularization": 1e-3, **solver},
        blocks={"test": 5, "train": 32},
        output={"store": store},
    )


@pytest.fixture
def fits(monkeypatch):
    """Counts the fits (restoring a saved fit is not one)."""
    calls = []
    real = fitting._fit

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "_fit", counting)
    path, had = list(sys.path), sys.modules.get("factory")
    yield calls
    sys.path[:] = path
    sys.modules.pop("factory", None) if had is None else sys.modules.__setitem__("factory", had)


def test_fit_once_then_reuse_and_resume(tmp_path, fit_client, fits):
    address = fit_client.scheduler.address
    job = fit_job(tmp_path)
    store, saved = tmp_path / "influences.zarr", tmp_path / "influences.zarr.fit.pt"

    result = invoke("run", job, "--fit-only", "--scheduler", address)
    assert result.exit_code == 0, result.output
    assert saved.is_file() and not store.exists() and fits == [1]
    assert f"Fitted: {saved}" in result.output and "over its blocks on the scheduler" in result.output

    result = invoke("run", job, "--scheduler", address)
    assert result.exit_code == 0, result.output
    assert f"Reusing the saved fit {saved}" in result.output and fits == [1]
    values = zarr.open_group(str(store), mode="r")["influences"][...]
    sys.path.insert(0, str(EXAMPLE))
    import factory

    problem = factory.make_problem(n_train=N_TRAIN, n_test=N_TEST)
    x, y = problem["train"].tensors
    expected = (
        di.DirectInfluence(problem["model"], problem["loss"], regularization=1e-3)
        .fit((x, y))
        .influences(*problem["test"].tensors, x, y)
        .numpy()
    )
    np.testing.assert_allclose(values, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())

    # a job killed halfway: chunks lost, flags unset; the resumed job reuses the fit
    group = zarr.open_group(str(store), mode="r+")
    for i, j in [(0, 1), (1, 0)]:
        group["influences"][i * 5 : (i + 1) * 5, j * 32 : (j + 1) * 32] = np.nan
        group["influences_done"][i, j] = 0
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}
    result = invoke("run", job, "--resume", "--scheduler", address)
    assert result.exit_code == 0, result.output
    assert "Reusing the saved fit" in result.output and "2 computed" in result.output and fits == [1]
    # recomputed chunks may land on the other worker process: equal up to float64 rounding
    # (differences of ~1e-13 relative were seen), not necessarily bit for bit
    np.testing.assert_allclose(
        zarr.open_group(str(store), mode="r")["influences"][...], values, rtol=1e-11, atol=1e-12 * np.abs(values).max()
    )

    assert invoke("run", job, "--fit-only", "--refit", "--scheduler", address).exit_code == 0 and fits == [1, 1]


def test_a_saved_fit_of_other_data_is_refused(tmp_path, fit_client, fits):
    shared = {"fit_file": "shared.fit.pt"}
    assert (
        invoke(
            "run",
            fit_job(tmp_path, **shared),
            "--fit-only",
            "--quiet",
            "--scheduler",
            fit_client.scheduler.address,
        ).exit_code
        == 0
    )
    other = fit_job(tmp_path, n_train=N_TRAIN + 1, name="other.toml", **shared)
    result = invoke("run", other, "--fit-only", "--scheduler", fit_client.scheduler.address)
    assert result.exit_code == 1 and fits == [1]
    assert (
        "Error: The saved fit" in result.output
        and "other training data (differs in: n, block_sizes, sha256)" in result.output
        and "--refit" in result.output
    )
    # in this process, with distributed_fit = false: the same file format and checks
    local = fit_job(tmp_path, name="local.toml", **shared, distributed_fit=False)
    result = invoke("run", local, "--fit-only")
    assert result.exit_code == 0 and "Reusing the saved fit" in result.output and fits == [1]


def test_job_file_keys(tmp_path):
    base = {"model": {"factory": "f:g"}, "output": {"store": "x.zarr"}}
    job = parse_job(
        {**base, "solver": {"method": "cg", "distributed_fit": False, "fit_file": "a/fit.pt"}}, base_dir=tmp_path
    )
    assert job.solver.distributed_fit is False and job.solver.fit_file == str(tmp_path / "a" / "fit.pt")
    assert job.solver.params == {}
    assert parse_job({**base, "solver": {"method": "cg"}}).solver.distributed_fit is None
    with pytest.raises(di.errors.JobFileError) as err:
        parse_job({**base, "solver": {"method": "cg", "distributed_fit": "yes", "distributed_fitt": 1}})
    assert err.value.problems == [
        "[solver] distributed_fit must be true or false; got 'yes'.",
        "[solver] unknown key 'distributed_fitt'; did you mean 'distributed_fit'?",
    ]
