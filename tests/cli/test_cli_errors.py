"""Errors of the user's model, loss or data end `dask-influence run` in one line naming the fix;
`--traceback` shows the full one."""

from __future__ import annotations

import sys
import textwrap

import pytest
from click.testing import CliRunner

from dask_influence.cli.main import cli

FACTORY = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), x


class RandomInEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(F.dropout(x, p=0.5, training=True))  # random even in eval()


def make(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    yt = y[:5] % 3
    model = nn.Linear(4, 3).double().eval()
    if kind == "label":
        y[20] = 3  # not a class of the 3 outputs, past the first block
    elif kind == "negative":
        y[20] = -1
    elif kind == "test_label":
        yt = yt.clone()
        yt[2] = 7
    elif kind == "dropout":
        model = RandomInEval().double().eval()
    elif kind == "tuple":
        model = TupleOut().double().eval()
    return {"model": model, "loss": nn.CrossEntropyLoss(), "train": TensorDataset(x, y),
            "test": TensorDataset(x[:5], yt)}
"""


@pytest.fixture
def job(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "bad_factory", raising=False)
    (tmp_path / "bad_factory.py").write_text(FACTORY)

    def write(kind):
        path = tmp_path / f"{kind}.toml"
        path.write_text(
            textwrap.dedent(f"""\
            [model]
            factory = "bad_factory:make"
            path = "{tmp_path}"
            options = {{ kind = "{kind}" }}

            [solver]
            method = "direct"
            regularization = 0.1

            [blocks]
            test = 5
            train = 10

            [output]
            store = "{kind}.zarr"

            [cluster]
            sequential = true
            """)
        )
        return path

    return write


@pytest.mark.parametrize(
    ("kind", "got", "advice"),
    [
        ("label", "got 3 (1 target(s))", ", or give the model 4 outputs."),  # a training label (vmapped gradients)
        ("negative", "got -1 (1 target(s))", " (e.g. map them to 0..2)."),
        ("test_label", "got 7 (1 target(s))", ", or give the model 8 outputs."),  # a test label
    ],
)
def test_a_label_out_of_range_is_one_line_naming_the_labels(job, kind, got, advice):
    """Issue 31 item 18: torch's `Target 3 is out of bounds` / `index 7 is out of bounds for
    dimension 2 with size 3` named neither the labels nor the number of classes."""
    result = CliRunner().invoke(cli, ["run", str(job(kind)), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    expected = f"Error: Labels out of range for the model's 3 classes: {got}; class labels must be 0 to 2"
    assert lines[0].startswith(expected)
    assert lines[0].endswith(advice)
    assert "out of bounds" not in lines[0]
    full = CliRunner().invoke(cli, ["run", str(job(kind)), "--quiet", "--overwrite", "--traceback"])
    assert isinstance(full.exception, ValueError)


def test_randomness_inside_eval_is_the_hidden_randomness_refusal(job):
    """Issue 31 item 18: F.dropout(x, training=True) in eval() ended in torch's raw vmap
    "randomness error mode" message."""
    result = CliRunner().invoke(cli, ["run", str(job("dropout")), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: The model draws random numbers in its forward even in eval()")
    assert "F.dropout(x, p, training=self.training)" in lines[0]
    assert "randomness error mode" not in lines[0]


def test_a_model_returning_a_tuple_is_one_line(job):
    result = CliRunner().invoke(cli, ["run", str(job("tuple")), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: The model and loss could not be evaluated on a training batch")
    assert "must be Tensor, not tuple" in lines[0]


def test_a_lost_scheduler_is_one_line_saying_the_store_is_resumable():
    from distributed.client import FutureCancelledError

    from dask_influence.cli.output import foreign_error

    text = foreign_error(FutureCancelledError("influences-abc", reason="scheduler-connection-lost"))
    assert text.startswith("lost the Dask scheduler or its workers (FutureCancelledError: ")
    assert "rerun with --resume to compute only the missing chunks" in text and "\n" not in text


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_fit_file_gives_the_refit_advice(job, keep):
    """Issue 31 item 18: a fit file cut short (an interrupted copy) gave `[Errno 22] Invalid
    argument` or miniz's message without saying what to do."""
    path = job("label").with_name("fine.toml")
    path.write_text(
        job("label").read_text().replace('kind = "label"', 'kind = "fine"').replace("label.zarr", "fine.zarr")
    )
    assert CliRunner().invoke(cli, ["run", str(path), "--quiet"]).exit_code == 0
    fit = path.with_name("fine.zarr.fit.pt")
    with open(fit, "r+b") as f:
        f.truncate(int(fit.stat().st_size * keep))
    line = CliRunner().invoke(cli, ["run", str(path), "--quiet", "--overwrite"]).output.strip()
    assert line.startswith(
        f"Error: '{fit}' is not a saved fit (written by calc.fit(..., path=...)): the file is truncated"
    )
    assert line.endswith("; fit again and replace it with refit=True (dask-influence run --refit).")
    assert "\n" not in line


@pytest.mark.parametrize(
    ("command", "runner", "line"),
    [
        (
            "run",
            "dask_influence.job.run.run_job",
            "Interrupted. The store keeps every chunk written so far: rerun with --resume "
            "(dask-influence run {job} --resume) to compute only the missing ones.",
        ),
        (
            "query",
            "dask_influence.job.index.query_job",
            "Interrupted. The store keeps every chunk written so far: rerun with --resume "
            "(dask-influence query {job} --resume) to compute only the missing ones.",
        ),
        (
            "index",
            "dask_influence.job.index.index_job",
            "Interrupted. The index keeps every block written so far: rerun "
            "(dask-influence index {job}; it resumes by default) to compute only the missing ones.",
        ),
        (
            "evaluate",
            "dask_influence.job.evaluate.evaluate_job",
            "Interrupted. Every finished retraining is recorded in the store: rerun "
            "(dask-influence evaluate {job}) to retrain only the missing runs.",
        ),
    ],
)
def test_ctrl_c_in_a_job_ends_each_command_with_its_resume_line(tmp_path, monkeypatch, command, runner, line):
    """The commands call the job layer's runner; Ctrl-C (or SIGTERM, turned into the same
    KeyboardInterrupt) inside it ends the command with exit code 130 and the command's own line."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, interrupted)
    job = tmp_path / "job.toml"
    result = CliRunner().invoke(cli, [command, str(job), "--quiet"])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == line.format(job=job)
