"""A solver defined here, by its module-level class, config and registry entry only, fits in one
process, block by block and on the 2-worker cluster with identical state, and runs from a job file.

This is the solver contract of the core: nothing in ``mapping/`` knows this solver.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import cloudpickle
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import Tensor

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.core.blocks import BlockSums
from dask_influence.core.operators import LinearOperator
from dask_influence.core.serialization import serializable
from dask_influence.core.solvers.base import InfluenceModel
from dask_influence.core.solvers.config import SolverConfig, hyperparameter
from dask_influence.core.solvers.registry import SOLVERS, register
from fit_cases import UNEVEN, make_problem

# the cluster's workers cannot import this test module: send its classes and functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def diagonal_block(solver, batch, start: int, weight: float, payload, out=None) -> Tensor:
    """``(n_b / n) * diag(H_b)`` of one block, exactly (one product with the identity): ``(p,)``."""
    p = solver.num_params
    eye = torch.eye(p, dtype=solver.dtype, device=solver.device)
    result = weight * torch.diagonal(solver.block_curvature().batch_matmat(batch, eye)).clone()
    if out is None:
        return result
    out += result
    return out


@dataclass(frozen=True)
class DiagonalConfig(SolverConfig):
    """Hyperparameters of :class:`DiagonalInfluence`."""

    floor: float = hyperparameter(1e-6, "Diagonal entries below floor * max are raised to it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.floor >= 0:
            raise ValueError(f"floor must be >= 0; got {self.floor}.")


@serializable
@dataclass(frozen=True)
class DiagonalState:
    """The exact diagonal of ``H``: ``(p,)``."""

    diagonal: Tensor


class DiagonalInfluence(InfluenceModel):
    """Influences with ``H`` replaced by its diagonal (a toy for the solver contract)."""

    config_class = DiagonalConfig
    state_: DiagonalState | None = None

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        diagonal = blocks.sum(diagonal_block, None).to(device=self.device, dtype=self.dtype)
        self.state_ = DiagonalState(torch.clamp(diagonal, min=self.config.floor * float(diagonal.abs().max())))

    def _solve(self, rhs: Tensor) -> Tensor:
        assert self.state_ is not None
        return rhs / (self.state_.diagonal + self.regularization)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The registry entry, for this module's tests only (other tests list the registered solvers)."""
    register("toy-diagonal")(DiagonalInfluence)
    yield
    del SOLVERS["toy-diagonal"]


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def test_registered_and_configured():
    assert SOLVERS["toy-diagonal"] is DiagonalInfluence
    model, loss, _, _ = make_problem(n=10)
    solver = DiagonalInfluence(model, loss, regularization=0.1, floor=1e-3)
    assert solver.config == DiagonalConfig(regularization=0.1, floor=1e-3) and solver.method == "toy-diagonal"
    with pytest.raises(TypeError, match="unknown hyperparameter.*'rank'.*regularization, curvature, chunk_size, floor"):
        DiagonalInfluence(model, loss, rank=3)
    with pytest.raises(ValueError, match="floor must be >= 0"):
        DiagonalInfluence(model, loss, floor=-1.0)


def test_fits_identically_in_process_block_by_block_and_on_the_cluster(problem, fit_client):
    model, loss, train, test = problem
    in_process = DiagonalInfluence(model, loss, regularization=0.1).fit(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=10)
    )
    # the reference: the exact diagonal of the dense Hessian of the mean loss
    dense = di.DirectInfluence(model, loss, regularization=0.1).fit(train).hessian
    assert rel(in_process.state_.diagonal, torch.diagonal(dense)) < 1e-12

    x, y = train
    block_arrays = [(x[a:b].numpy(), y[a:b].numpy()) for a, b in zip(np.cumsum((0,) + UNEVEN[:-1]), np.cumsum(UNEVEN))]
    import dask.array as da

    dx = da.concatenate([da.from_array(bx, chunks=bx.shape) for bx, _ in block_arrays])
    dy = da.concatenate([da.from_array(by, chunks=by.shape) for _, by in block_arrays])
    sequential = DiagonalInfluence(model, loss, regularization=0.1)
    di.SequentialInfluenceCalculator(sequential, progress=False).fit((dx, dy))
    cluster = DiagonalInfluence(model, loss, regularization=0.1)
    calc = di.DaskInfluenceCalculator(cluster, fit_client, progress=False)
    calc.fit((dx, dy))
    assert calc.last_fit_["blocks"] == len(UNEVEN) and calc.last_fit_["sweeps"] == 2  # validation + the sum
    for other in (sequential, cluster):
        assert rel(other.state_.diagonal, in_process.state_.diagonal) < 1e-12
        assert rel(other.influences(*test, *train), in_process.influences(*test, *train)) < 1e-12
    # the same influences by the job's graph on the cluster
    lazy = calc.influences((test[0].numpy(), test[1].numpy()), (dx, dy))
    assert rel(lazy.compute(), in_process.influences(*test, *train)) < 1e-12


def test_runs_from_a_job_file(problem, fit_client, tmp_path, monkeypatch):
    (tmp_path / "toy_factory.py").write_text(
        textwrap.dedent("""\
        from fit_cases import make_problem
        from torch.utils.data import TensorDataset


        def make(n_train=30):
            model, loss, (x, y), (xt, yt) = make_problem(n=n_train)
            return {"model": model, "loss": loss, "train": TensorDataset(x, y), "test": TensorDataset(xt, yt)}
        """)
    )
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "toy_factory:make"
        path = "{tmp_path}"

        [solver]
        method = "toy-diagonal"
        regularization = 0.1
        floor = 1e-4

        [blocks]
        test = 3
        train = 8

        [output]
        store = "out.zarr"
        """)
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = CliRunner().invoke(cli, ["run", str(job), "--scheduler", fit_client.scheduler.address, "--quiet"])
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    model, loss, (x, y), (xt, yt) = make_problem(n=30)
    expected = DiagonalInfluence(model, loss, regularization=0.1, floor=1e-4).fit((x, y)).influences(xt, yt, x, y)
    assert rel(store["influences"][:], expected) < 1e-10
    assert store.attrs["dask_influence"]["config"]["method"] == "DiagonalInfluence"


def test_a_solver_of_another_installed_package_is_found_by_its_entry_point(tmp_path, monkeypatch):
    """``[project.entry-points."dask_influence.solvers"]`` of an installed package: a job file names it."""
    from dask_influence.core.solvers import registry
    from dask_influence.job import make_solver, parse_job

    (tmp_path / "plugin_solver.py").write_text(
        "from dask_influence import DirectInfluence\n\n\nclass PluginInfluence(DirectInfluence):\n"
        '    """Direct, under another name."""\n'
    )
    dist = tmp_path / "plugin_solver-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-solver\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dask_influence.solvers]\nplugged = plugin_solver:PluginInfluence\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "plugged" not in SOLVERS
    try:
        job = parse_job(
            {
                "model": {"factory": "m:f"},
                "solver": {"method": "plugged", "regularization": 0.5},
                "output": {"store": str(tmp_path / "s.zarr")},
            },
            base_dir=tmp_path,
        )
        assert job.solver.solver_class.__name__ == "PluginInfluence"
        model, loss, (x, y), _ = make_problem(n=12)
        solver = make_solver(job, model, loss)
        assert solver.method == "plugged" and solver.regularization == 0.5
        reference = di.DirectInfluence(model, loss, regularization=0.5).fit((x, y)).influences(x, y)
        assert rel(solver.fit((x, y)).influences(x, y), reference) < 1e-14
    finally:
        SOLVERS.pop("plugged", None)
