"""Job files for the tests: one writer instead of a TOML template in every test file.

:func:`write_job` writes a job file whose ``[model]`` is the batch-job example's factory
(``examples/batch_job/factory.py``: a trained MLP on scikit-learn's wine data) unless the
sections say otherwise; the ``job_file`` fixture of ``tests/conftest.py`` binds it to the test's
``tmp_path``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

EXAMPLE_JOB = Path(__file__).resolve().parents[1] / "examples" / "batch_job"
"""The example job's directory (its ``factory.py`` makes the wine problem)."""


def toml_value(value: Any) -> str:
    """One TOML value: a string, number, boolean, list or inline table (nested alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def write_job(
    directory: Path,
    name: str = "job.toml",
    *,
    factory: str = "factory:make_problem",
    factory_path: Path | str = EXAMPLE_JOB,
    options: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Path:
    """Write ``directory / name`` and return its path.

    ``[model]`` names ``factory`` in ``factory_path`` with ``options`` (the factory's keywords);
    every other keyword is a section: ``solver={"method": "cg", "regularization": 1e-3}``,
    ``blocks={"test": 5, "train": 32}``, ``output={"store": "influences.zarr"}``,
    ``cluster={"sequential": True}``, ...
    """
    model: dict[str, Any] = {"factory": factory, "path": str(factory_path)}
    if options:
        model["options"] = options
    lines = []
    for section, keys in {"model": model, **sections}.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    path = Path(directory) / name
    path.write_text("\n".join(lines))
    return path


def load_example_factory(directory: Path = EXAMPLE_JOB) -> Any:
    """The example's ``factory.py`` as a module of its own name (not ``factory`` in ``sys.modules``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"batch_job_factory_{abs(hash(str(directory)))}", directory / "factory.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(*args: Any, env: dict[str, str] | None = None) -> Any:
    """``dask-influence ARGS`` in this process (click's runner): the result of a clean exit, an
    ``Error: ...`` exit included; any other exception is raised (not a clean one-line error)."""
    from click.testing import CliRunner

    from dask_influence.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# A factory module (``make(seed=0)``): a 4-6-3 tanh MLP in float64 with cross-entropy on 48 training
# and 12 test points; the index and progress tests write it next to their job files.
CLASSIFIER_FACTORY = textwrap.dedent(
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
