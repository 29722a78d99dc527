"""The messages a new user meets first through a job file (issue 31, items 12 and 13): dict
items without a [task] name the task to add; a factory module whose own import fails names the
missing dependency instead of telling the user to fix [model] path."""

from __future__ import annotations

import sys
import textwrap

import pytest
from click.testing import CliRunner

from dask_influence.cli.main import cli

DICT_FACTORY = """
import torch
from torch import nn


def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    items = [{"features": x[i], "labels": y[i]} for i in range(12)]  # Hugging Face style items
    return {"model": nn.Linear(4, 3), "loss": nn.CrossEntropyLoss(), "train": items, "test": items[:4]}
"""

MISSING_DEPENDENCY = """
import torch
import not_installed_dependency_31  # the module is found; what it imports is not


def make():
    raise AssertionError("never called")
"""

BROKEN_MODULE = """
SETTINGS = {}
SIZE = SETTINGS["size"]  # the module's own code fails while it is imported


def make():
    raise AssertionError("never called")
"""


@pytest.fixture
def write(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))

    def job(module: str, source: str | None, factory: str = "make", task: str = "") -> str:
        monkeypatch.delitem(sys.modules, module, raising=False)
        if source is not None:
            (tmp_path / f"{module}.py").write_text(source)
        path = tmp_path / f"{module}.toml"
        path.write_text(
            textwrap.dedent(f"""\
            [model]
            factory = "{module}:{factory}"
            path = "{tmp_path}"
            {task}
            [solver]
            method = "direct"
            regularization = 0.1

            [blocks]
            test = 4
            train = 4

            [output]
            store = "{tmp_path / "out.zarr"}"

            [cluster]
            sequential = true
            """)
        )
        return str(path)

    return job


def _one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_dict_items_without_a_task_name_the_task_to_add(write):
    """Was `Pass the points as training inputs, training targets (inputs and targets); got 1
    argument(s)`, which names neither the task nor the section."""
    line = _one_line(CliRunner().invoke(cli, ["run", write("dictfactory31", DICT_FACTORY), "--quiet"]))
    assert "returned train items that are dicts (keys features, labels)" in line
    assert 'add one to score them, e.g. [task] name = "classification"' in line
    assert "Pass the points as" not in line


def test_dict_items_with_a_task_are_not_refused_by_that_check(write):
    task = '[task]\nname = "classification"\n'
    job = write("dictfactory31b", DICT_FACTORY.replace('"features"', '"input"'), task=task)
    result = CliRunner().invoke(cli, ["run", job, "--quiet"])
    # the task calls model(**inputs): nn.Linear takes `input`, so the job runs to the end
    assert result.exit_code == 0, result.output


def test_a_missing_dependency_of_the_factory_module_is_named(write):
    """Was `cannot import module ... Set [model] path to the directory that holds it` although
    the module was found."""
    line = _one_line(CliRunner().invoke(cli, ["run", write("depfactory31", MISSING_DEPENDENCY), "--quiet"]))
    assert "factory 'depfactory31:make': importing module 'depfactory31' (" in line
    assert "depfactory31.py) failed: ModuleNotFoundError: No module named 'not_installed_dependency_31'" in line
    assert line.endswith("install 'not_installed_dependency_31' in this environment (and on the workers).")
    assert "Set [model] path" not in line


def test_a_module_failing_while_imported_is_named(write):
    line = _one_line(CliRunner().invoke(cli, ["run", write("brokenfactory31", BROKEN_MODULE), "--quiet"]))
    assert "importing module 'brokenfactory31' (" in line and "raised KeyError: 'size'; fix the module" in line
    assert "Set [model] path" not in line


def test_a_module_that_is_not_there_still_points_to_the_path(write):
    line = _one_line(CliRunner().invoke(cli, ["run", write("nosuchfactory31", None), "--quiet"]))
    assert "cannot import module 'nosuchfactory31' (No module named 'nosuchfactory31')" in line
    assert "Set [model] path to the directory that holds it." in line
