"""`dask-influence index` and `query` end to end on a job file (in this process: [cluster]
sequential), against the Python API on the same model; refusals in one line."""

from __future__ import annotations

import textwrap

import numpy as np
import zarr
from click.testing import CliRunner

import dask_influence as di
from dask_influence.cli.main import cli
from jobs import CLASSIFIER_FACTORY

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
    (tmp_path / "ixfactory.py").write_text(CLASSIFIER_FACTORY)
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
    # test blocks of 5 here and of 12 in the API: the factor solves round differently in the last bits
    np.testing.assert_allclose(group["influences"][:], expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
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
    (tmp_path / "ixfactory.py").write_text(CLASSIFIER_FACTORY)
    job = JOB.split("[index]")[0] + "[output]\nstore = 'x.zarr'\n"
    (tmp_path / "job.toml").write_text(job)
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "job.toml")])
    assert result.exit_code != 0
    assert "[solver] section is missing" in result.output  # no [index]: a job needs a solver
    (tmp_path / "job2.toml").write_text(job + "\n[solver]\nmethod = 'cg'\n")
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "job2.toml")])
    assert result.exit_code != 0 and "[index] section is missing" in result.output
    assert "see docs/gradient-index.md" in result.output  # issue 31 item 7: was docs/index.md, the home page


def test_damaged_index_is_named_in_one_line_and_index_verify_repairs_it(tmp_path):
    """Issue 31 items 1-2 from the command line: ``query`` on an index with a deleted chunk or a
    flipped byte prints one ``Error:`` line naming the index, the array, the chunk and the repair;
    ``inspect`` says DAMAGED; ``index`` (listing) recomputes the deleted block, ``index --verify``
    the damaged one; the query then gives the clean scores."""
    (tmp_path / "ixfactory.py").write_text(CLASSIFIER_FACTORY)
    (tmp_path / "job.toml").write_text(JOB)
    runner = CliRunner()
    job = str(tmp_path / "job.toml")
    assert runner.invoke(cli, ["index", job]).exit_code == 0
    assert runner.invoke(cli, ["query", job]).exit_code == 0
    clean = zarr.open_group(str(tmp_path / "scores.zarr"), mode="r")["influences"][:]
    chunks = tmp_path / "index.zarr" / "gradients" / "c"

    (chunks / "1" / "0").unlink()
    shown = runner.invoke(cli, ["inspect", str(tmp_path / "index.zarr")])
    assert "gradient index, DAMAGED: block(s) 1 of its array 'gradients' are missing" in shown.output
    refused = runner.invoke(cli, ["query", job, "--overwrite"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "Error: The gradient index" in refused.output and "block(s) 1 of its array 'gradients'" in refused.output
    repaired = runner.invoke(cli, ["index", job])
    assert repaired.exit_code == 0, repaired.output
    assert "1 blocks written, 1 of them repaired, 4 already done" in repaired.output

    raw = bytearray((chunks / "3" / "0").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (chunks / "3" / "0").write_bytes(bytes(raw))
    refused = runner.invoke(cli, ["query", job, "--overwrite"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    line = [text for text in refused.output.splitlines() if text.startswith("Error:")][0]
    assert "chunk 3 of its array 'gradients' (block 3, training points 30 to 39) does not decode" in line
    assert "dask-influence index JOB.toml --verify" in line
    listed = runner.invoke(cli, ["index", job])  # without --verify only the files are listed
    assert listed.exit_code == 0 and "0 blocks written" in listed.output
    verified = runner.invoke(cli, ["index", job, "--verify"])
    assert verified.exit_code == 0, verified.output
    assert "1 blocks written, 1 of them repaired, 4 already done" in verified.output
    assert runner.invoke(cli, ["query", job, "--overwrite"]).exit_code == 0
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "scores.zarr"), mode="r")["influences"][:], clean)
