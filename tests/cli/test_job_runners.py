"""The job layer runs a job from Python as the command line does (``dask_influence.job.run_job``):
the example job, given as a dict of its sections, writes the same store as ``dask-influence run``
of the same job file, reports through logging and prints nothing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tomllib
import zarr

from dask_influence.job import RunResult, load_job, run_job
from jobs import EXAMPLE_JOB, invoke, write_job

OPTIONS = {"n_train": 90, "n_test": 14}
BLOCKS = {"test": 5, "train": 32}  # 3 x 3 chunks, ragged last blocks
ARRAYS = ("influences", "self_influences", "top_helpful_indices", "top_helpful_values", "top_harmful_indices")


def example_sections(store) -> dict:
    """examples/batch_job/job.toml as tomllib reads it, smaller, in this process, into ``store``."""
    with open(EXAMPLE_JOB / "job.toml", "rb") as f:
        data = tomllib.load(f)
    data["model"]["options"] = OPTIONS
    data["blocks"] = BLOCKS
    data["output"]["store"] = str(store)
    data["cluster"] = {"sequential": True}
    return data


def test_run_job_from_python_writes_the_store_the_cli_writes(tmp_path, caplog, capsys):
    data = example_sections(tmp_path / "python.zarr")
    with caplog.at_level(logging.INFO, logger="dask_influence.job"):
        result = run_job(data, base_dir=EXAMPLE_JOB, progress=False)
    assert isinstance(result, RunResult) and result.complete
    assert result.store == str(tmp_path / "python.zarr")
    assert result.fit_file == str(tmp_path / "python.zarr") + ".fit.pt"
    assert result.chunks["influences"] == (9, 9)
    assert result.summary.startswith(f"Complete: {tmp_path / 'python.zarr'} (9/9 chunks; 9 computed, 0 already done)")
    # what the command prints on stderr is logged, under dask_influence.job; nothing is printed
    notes = [r.getMessage() for r in caplog.records if r.name == "dask_influence.job.run"]
    assert notes[0] == f"Job (dict): DirectInfluence (direct), store {tmp_path / 'python.zarr'}"
    assert (
        notes[1] == "Fitting DirectInfluence (21 parameters) on 90 training points in blocks of 32 in this process..."
    )
    assert notes[2].startswith("Fitted in ") and notes[2].endswith(f"saved to {result.fit_file}.")
    assert notes[3] == (
        "Computing influences of 90 training points on 14 test points (blocks of 5 x 32) "
        "in this process (sequential)..."
    )
    assert capsys.readouterr() == ("", "")

    # the same job as a file, run by the command line
    cli_job = write_job(
        tmp_path,
        "cli.toml",
        options=OPTIONS,
        solver=data["solver"],
        blocks=BLOCKS,
        output={**data["output"], "store": "cli.zarr"},
        cluster={"sequential": True},
    )
    done = invoke("run", cli_job)
    assert done.exit_code == 0, done.output
    assert f"Complete: {tmp_path / 'cli.zarr'} (9/9 chunks; 9 computed, 0 already done)" in done.output
    python, cli = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("python.zarr", "cli.zarr"))
    for name in ARRAYS:
        assert np.array_equal(python[name][...], cli[name][...], equal_nan=True), name
    assert python["influences"].shape == (14, 90) and not np.isnan(python["influences"][...]).any()
    assert python["top_helpful_indices"].shape == (14, 10)

    # a loaded Job resumes it: nothing left to compute; the saved fit is reused
    again = run_job(load_job(cli_job), resume=True, progress=False)
    assert again.complete and "(9/9 chunks; 0 computed, 9 already done)" in again.summary


def test_run_job_refuses_an_existing_store_in_the_library_s_words(tmp_path):
    data = example_sections(tmp_path / "python.zarr")
    assert run_job(data, base_dir=EXAMPLE_JOB, fit_only=True, progress=False).summary.startswith(
        f"Fitted: {tmp_path / 'python.zarr'}.fit.pt in "
    )
    (tmp_path / "python.zarr").mkdir()
    (tmp_path / "python.zarr" / "zarr.json").write_text("{}")
    from dask_influence.errors import StoreError

    with pytest.raises(StoreError) as refused:
        run_job(data, base_dir=EXAMPLE_JOB, progress=False)
    assert str(refused.value) == (
        f"The output store '{tmp_path / 'python.zarr'}' already exists; pass resume=True to complete it or "
        "overwrite=True to replace it."
    )
