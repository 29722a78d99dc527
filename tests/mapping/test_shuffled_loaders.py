"""A shuffling DataLoader is refused by every entry point of the mapping layer before any
work: no cluster started, no fit, no store or lock written. (``solver.fit`` accepts one by
design: the curvature does not depend on the order.)"""

from __future__ import annotations

import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import dask_influence as di
from cases import mapping_problem
from dask_influence.cli.main import cli

SHUFFLED = "shuffles \\(shuffle=True\\).*shuffle=False"


@pytest.fixture(scope="module")
def data():
    model, loss, (x, y), (xt, yt) = mapping_problem(n_train=20, n_test=6)
    return model, loss, TensorDataset(x, y), TensorDataset(xt, yt)


@pytest.fixture
def no_cluster(monkeypatch):
    """Starting a cluster (the embedded LocalCluster) fails the test."""
    import distributed

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(distributed, "LocalCluster", refuse)


def _calculators(solver):
    return [
        di.SequentialInfluenceCalculator(solver, progress=False),
        di.DaskInfluenceCalculator(solver, progress=False),  # no client: would start an embedded cluster
    ]


@pytest.mark.parametrize("fitted", [False, True])
def test_every_calculator_entry_point_refuses_a_shuffling_loader_first(data, tmp_path, no_cluster, fitted):
    model, loss, train, test = data
    shuffled_train = DataLoader(train, batch_size=10, shuffle=True)
    shuffled_test = DataLoader(test, batch_size=3, shuffle=True)
    train_loader, test_loader = DataLoader(train, batch_size=10), DataLoader(test, batch_size=3)
    solver = di.DirectInfluence(model, loss, regularization=0.05)
    if fitted:
        solver.fit(shuffled_train)  # accepted: the order does not change the curvature
    fit_id = solver.fit_id_
    store = tmp_path / "out.zarr"
    for calc in _calculators(solver):
        calls = {
            "fit": lambda c=calc: c.fit(shuffled_train),
            "influences train": lambda c=calc: c.influences(test_loader, shuffled_train),
            "influences test": lambda c=calc: c.influences(shuffled_test, train_loader),
            "to_zarr train": lambda c=calc: c.influences_to_zarr(test_loader, shuffled_train, store),
            "to_zarr test": lambda c=calc: c.influences_to_zarr(shuffled_test, train_loader, store, top_k=2),
            "self_influences": lambda c=calc: c.self_influences(shuffled_train),
        }
        for what, call in calls.items():
            # refused as a shuffling loader, also for an unfitted solver (not "fit it first")
            with pytest.raises(ValueError, match=SHUFFLED) as info:
                call()
            assert ("The train" if "test" not in what else "The test") in str(info.value), what
            assert "batch_size=10" in str(info.value) or "batch_size=3" in str(info.value)
        assert solver.fit_id_ == fit_id  # nothing fitted (or refitted)
    assert not store.exists() and not (tmp_path / "out.zarr.lock").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_custom_sampler_is_refused_and_a_sequential_loader_accepted(data, no_cluster):
    model, loss, train, test = data
    solver = di.DirectInfluence(model, loss, regularization=0.05).fit(DataLoader(train, batch_size=10))
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    picked = DataLoader(train, batch_size=10, sampler=SubsetRandomSampler(range(20)))
    with pytest.raises(ValueError, match="uses a custom sampler.*shuffle=False"):
        calc.influences(DataLoader(test, batch_size=3), picked)
    lazy = calc.influences(DataLoader(test, batch_size=3), DataLoader(train, batch_size=10))
    x, y = train.tensors
    xt, yt = test.tensors
    torch.testing.assert_close(
        torch.from_numpy(lazy.compute(scheduler="sync")), solver.influences(xt, yt, x, y), rtol=1e-10, atol=1e-12
    )


def test_the_gradient_index_refuses_a_shuffling_loader_before_writing(data, tmp_path):
    model, loss, train, test = data
    index_path = tmp_path / "index.zarr"
    with pytest.raises(ValueError, match=SHUFFLED):
        di.GradientIndex.build(
            model, loss, DataLoader(train, batch_size=10, shuffle=True), index_path, projection_dim=8, client="sync"
        )
    assert not index_path.exists()


def test_run_refuses_a_factory_that_returns_a_shuffling_loader_before_fitting(tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    (tmp_path / "shuffling_factory.py").write_text(
        textwrap.dedent("""\
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset


        def make_problem():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(12, 3, generator=g, dtype=torch.float64)
            data = TensorDataset(x, x.sum(1, keepdim=True))
            return {
                "model": nn.Linear(3, 1).double(),
                "loss": nn.MSELoss(),
                "train": DataLoader(data, batch_size=4, shuffle=True),
                "test": data,
            }
        """)
    )
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "shuffling_factory:make_problem"
        path = "{tmp_path}"

        [solver]
        method = "direct"
        regularization = 0.1

        [blocks]
        test = 4
        train = 4

        [output]
        store = "{tmp_path / "influences.zarr"}"

        [cluster]
        sequential = true
        """)
    )
    result = CliRunner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error:") and "train of type DataLoader" in last and "map-style" in last
    assert not (tmp_path / "influences.zarr").exists() and not (tmp_path / "influences.zarr.fit.pt").exists()
