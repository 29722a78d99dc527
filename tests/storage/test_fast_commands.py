"""Commands on large stores start fast: `inspect` imports neither torch nor distributed, and a
resume reuses its saved fit without a pass over the training data (checks kept: model
weights, solver, the data's size and blocks; `--verify` adds the contents)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.mapping import fitting
from jobs import write_job

PROBE = """
import json, sys
from dask_influence.cli.main import cli
cli.main(sys.argv[1:], standalone_mode=False)
heavy = [m for m in ("torch", "distributed", "dask", "dask.array") if m in sys.modules]
print("MODULES " + json.dumps(heavy))
"""


def write_fast_job(directory: Path) -> Path:
    return write_job(
        directory,
        options={"n_train": 40, "n_test": 9},
        solver={"method": "direct", "regularization": 1e-3},
        blocks={"test": 3, "train": 10},
        output={"store": str(directory / "influences.zarr"), "top_k": 2},
        cluster={"sequential": True},
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    where = tmp_path_factory.mktemp("job")
    job = write_fast_job(where)
    done = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
    assert done.exit_code == 0, done.output
    return job


@pytest.mark.parametrize("args", [["--no-stats"], [], ["--json"]])
def test_inspect_imports_neither_torch_nor_distributed(job, args):
    store = job.parent / "influences.zarr"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "inspect", str(store), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout.rsplit("MODULES ", 1)[1])
    assert modules == []
    assert "complete" in done.stdout


def test_the_evaluation_group_name_inspect_checks_is_the_records_one():
    from dask_influence.cli.inspect import EVALUATION_GROUP
    from dask_influence.evaluate.records import GROUP

    assert EVALUATION_GROUP == GROUP


def test_the_lazy_package_and_command_list():
    assert {"demo", "evaluate", "inspect", "plot", "rank", "run", "top"} <= set(cli.commands)
    assert cli.commands.get("inspect").name == "inspect" and "nothing" not in cli.commands
    assert di.DirectInfluence.__name__ == "DirectInfluence" and callable(di.evaluate.lds)
    assert set(di.__all__) <= set(dir(di))
    with pytest.raises(AttributeError):
        di.NoSuchName  # noqa: B018


def test_run_resume_reuses_the_fit_without_reading_the_data_and_verify_reads_it(job):
    runner = CliRunner()
    resumed = runner.invoke(cli, ["run", str(job), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "model weights and size and blocks of the training data; --verify" in resumed.output
    assert "(12/12 chunks; 0 computed, 12 already done)" in resumed.output
    verified = runner.invoke(cli, ["run", str(job), "--resume", "--verify"])
    assert verified.exit_code == 0, verified.output
    assert "(same solver, model weights and training data)" in verified.output


def problem(seed=0, n=30):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double().eval()
    return model, torch.nn.MSELoss(), (x, y)


def test_restore_without_a_pass_checks_weights_solver_and_data_shape(tmp_path, monkeypatch):
    model, loss, (x, y) = problem()
    fit_file = tmp_path / "fit.pt"
    first = di.SequentialInfluenceCalculator(
        di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn"), progress=False
    )
    first.fit(DataLoader(TensorDataset(x, y), batch_size=5), path=fit_file)

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass over the training data")

    monkeypatch.setattr(fitting, "fit_with_blocks", no_pass)
    monkeypatch.setattr(fitting, "inspect_block", no_pass)
    again = di.SequentialInfluenceCalculator(
        di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn"), progress=False
    )
    again.fit(DataLoader(TensorDataset(x, y), batch_size=5), path=fit_file, verify_data=False)
    assert again.last_fit_["reused"] and again.last_fit_["sweeps"] == 0 and not again.last_fit_["data_checked"]
    assert again.solver.fingerprint() == first.solver.fingerprint()

    def restore(model=model, data=(x, y), block=5):
        calc = di.SequentialInfluenceCalculator(
            di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn"), progress=False
        )
        calc.fit(DataLoader(TensorDataset(*data), batch_size=block), path=fit_file, verify_data=False)

    other = problem()[0]
    with torch.no_grad():
        other[0].weight.add_(0.01)
    with pytest.raises(ValueError, match="other model weights"):
        restore(model=other)
    with pytest.raises(ValueError, match=r"other training data \(differs in: n, block_sizes\)"):
        restore(data=(x[:20], y[:20]))
    with pytest.raises(ValueError, match=r"other training data \(differs in: block_sizes\)"):
        restore(block=6)
    # the contents are not read: the same size and blocks pass (the full check finds them)
    restore(data=(x + 1, y))
    monkeypatch.undo()
    calc = di.SequentialInfluenceCalculator(
        di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn"), progress=False
    )
    with pytest.raises(ValueError, match=r"other training data \(differs in: sha256\)"):
        calc.fit(DataLoader(TensorDataset(x + 1, y), batch_size=5), path=fit_file)
