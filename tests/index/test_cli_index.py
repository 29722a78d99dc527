"""`dask-influence index` and `query` end to end on a job file (in this process: [cluster]
sequential), against the Python API on the same model; refusals in one line."""

from __future__ import annotations

import textwrap

import numpy as np
import zarr
from click.testing import CliRunner

import dask_influence as di
from dask_influence.cli.main import cli

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def make(seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(60, 4, generator=g, dtype=torch.float64)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        return {"model": model, "loss": nn.CrossEntropyLoss(),
                "train": TensorDataset(x[:48], y[:48]), "test": TensorDataset(x[48:], y[48:])}
    """
)

JOB = textwrap.dedent(
    """
    [model]
    factory = "ixfactory:make"

    [index]
    store = "index.zarr"
    projection_dim = 16
    dtype = "float64"
    regularization = 0.5

    [blocks]
    train = 10
    test = 5

    [output]
    store = "scores.zarr"
    top_k = 3
    self_influences = true

    [cluster]
    sequential = true
    """
)


def test_index_then_query_writes_a_store_equal_to_the_api(tmp_path, monkeypatch):
    (tmp_path / "ixfactory.py").write_text(FACTORY)
    (tmp_path / "job.toml").write_text(JOB)
    runner = CliRunner()
    built = runner.invoke(cli, ["index", str(tmp_path / "job.toml")])
    assert built.exit_code == 0, built.output
    assert "5 blocks written, 0 already done" in built.output
    again = runner.invoke(cli, ["index", str(tmp_path / "job.toml")])
    assert again.exit_code == 0 and "0 blocks written, 5 already done" in again.output
    queried = runner.invoke(cli, ["query", str(tmp_path / "job.toml")])
    assert queried.exit_code == 0, queried.output

    monkeypatch.syspath_prepend(str(tmp_path))
    from ixfactory import make

    problem = make()
    x, y = problem["train"].tensors
    xt, yt = problem["test"].tensors
    index = di.GradientIndex.open(tmp_path / "index.zarr", problem["model"], problem["loss"], client="sync")
    expected = index.influences((xt.numpy(), yt.numpy()))
    group = zarr.open_group(str(tmp_path / "scores.zarr"), mode="r")
    np.testing.assert_allclose(group["influences"][:], expected, rtol=1e-12)
    np.testing.assert_allclose(group["self_influences"][:], index.self_influences(), rtol=1e-12)
    assert group.attrs["dask_influence"]["complete"]
    assert group.attrs["dask_influence"]["config"]["method"] == "GradientIndex"

    shown = runner.invoke(cli, ["inspect", str(tmp_path / "index.zarr")])
    assert shown.exit_code == 0, shown.output
    assert "gradient index" in shown.output and "48" in shown.output
    top = runner.invoke(cli, ["top", str(tmp_path / "scores.zarr"), "--test", "0"])
    assert top.exit_code == 0, top.output
    assert str(int(np.argmax(expected[0]))) in top.output

    # another model (the factory's seed 1): refused in one line naming what differs
    (tmp_path / "other.toml").write_text(
        JOB.replace('factory = "ixfactory:make"', 'factory = "ixfactory:make"\noptions = { seed = 1 }')
    )
    refused = runner.invoke(cli, ["query", str(tmp_path / "other.toml"), "--overwrite"])
    assert refused.exit_code == 1
    assert "Error:" in refused.output and "model_checksum" in refused.output and "Traceback" not in refused.output


def test_index_job_without_index_section_is_refused(tmp_path):
    (tmp_path / "ixfactory.py").write_text(FACTORY)
    job = JOB.split("[index]")[0] + "[output]\nstore = 'x.zarr'\n"
    (tmp_path / "job.toml").write_text(job)
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "job.toml")])
    assert result.exit_code != 0
    assert "[solver] section is missing" in result.output  # no [index]: a job needs a solver
    (tmp_path / "job2.toml").write_text(job + "\n[solver]\nmethod = 'cg'\n")
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "job2.toml")])
    assert result.exit_code != 0 and "[index] section is missing" in result.output
