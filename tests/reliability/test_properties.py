"""Properties over random small models and data (hypothesis).

- the influence matrix does not depend on the block sizes (in memory, lazily, in zarr) nor
  on the number of workers (a cluster of 1 in-process worker and one of 3 worker processes,
  one thread each);
- permuting the training set (and fitting on it) permutes the columns;
- ``influences(x, y, x, y)`` is symmetric for the exact solvers, with the self-influences
  on its diagonal.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dask_influence as di

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def problems(draw):
    """A random float64 model (linear or one tanh layer; regression or 3 classes) and data."""
    n_train = draw(st.integers(2, 24))
    n_test = draw(st.integers(1, 8))
    d = draw(st.integers(1, 4))
    hidden = draw(st.sampled_from([0, 3]))
    classify = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    regularization = draw(st.sampled_from([0.05, 0.5]))
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = 3 if classify else 1
    y = torch.randint(0, 3, (n,), generator=g) if classify else torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    layers = [nn.Linear(d, out)] if hidden == 0 else [nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, out)]
    model = nn.Sequential(*layers).double().eval()
    loss = nn.CrossEntropyLoss() if classify else nn.MSELoss()
    return {
        "model": model,
        "loss": loss,
        "train": (x[:n_train], y[:n_train]),
        "test": (x[n_train:], y[n_train:]),
        "regularization": regularization,
    }


def fitted(p, solver=di.DirectInfluence, **kw):
    return solver(p["model"], p["loss"], regularization=p["regularization"], curvature="ggn", **kw).fit(p["train"])


def close(a, b, rel):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), 1e-300)
    assert a.shape == b.shape and float(np.abs(a - b).max()) <= rel * scale, float(np.abs(a - b).max()) / scale


@pytest.fixture(scope="module")
def clients():
    """One in-process worker, and three worker processes; one thread each."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as one,
        LocalCluster(
            n_workers=3, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as three,
        Client(one, set_as_default=False) as c1,
        Client(three, set_as_default=False) as c3,
    ):
        yield c1, c3


@settings(SETTINGS, max_examples=8)
@given(p=problems(), data=st.data())
def test_invariant_to_block_sizes_and_number_of_workers(p, data, clients):
    solver = fitted(p)
    expected = solver.influences(*p["test"], *p["train"]).numpy()
    n_test, n_train = len(p["test"][0]), len(p["train"][0])
    tb = data.draw(st.integers(1, n_test), label="test block")
    rb = data.draw(st.integers(1, n_train), label="train block")
    test = tuple(t.numpy() for t in p["test"])
    train = tuple(t.numpy() for t in p["train"])
    seq = di.SequentialInfluenceCalculator(solver, progress=False)
    close(
        seq.influences(test, train, test_block_size=tb, train_block_size=rb).compute(scheduler="sync"), expected, 1e-10
    )
    for client in clients:
        calc = di.DaskInfluenceCalculator(solver, client, progress=False, memory_budget=None)
        close(
            calc.influences(test, train, test_block_size=tb, train_block_size=rb).compute(scheduler=client.get),
            expected,
            1e-10,
        )
    with tempfile.TemporaryDirectory() as tmp:
        group = seq.influences_to_zarr(test, train, f"{tmp}/out.zarr", test_block_size=tb, train_block_size=rb)
        close(group["influences"][...], expected, 1e-10)
        assert group["influences"].chunks == (tb, rb)


@SETTINGS
@given(p=problems(), seed=st.integers(0, 2**16))
def test_permuting_the_training_set_permutes_the_columns(p, seed):
    x, y = p["train"]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    original = fitted(p).influences(*p["test"], x, y).numpy()
    permuted = fitted({**p, "train": (x[perm], y[perm])}).influences(*p["test"], x[perm], y[perm]).numpy()
    close(permuted, original[:, perm.numpy()], 1e-9)


@SETTINGS
@given(p=problems())
def test_influences_of_a_set_on_itself_are_symmetric_for_exact_solvers(p):
    x, y = p["train"]
    for solver, rel in ((di.DirectInfluence, 1e-10), (di.CgInfluence, 1e-7)):
        m = fitted(p, solver)
        matrix = m.influences(x, y, x, y).numpy()
        close(matrix, matrix.T, rel)
        close(np.diag(matrix), m.self_influences(x, y).numpy(), rel)


def test_threads_of_one_worker_sharing_the_solver():
    """Tasks in several threads of one worker share the solver (and its model): the forward
    lock keeps functional_call's parameter swap from corrupting concurrent gradients."""
    from distributed import Client, LocalCluster

    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (120,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, curvature="ggn").fit((x, y))
    expected = solver.influences(x[:20], y[:20], x, y).numpy()
    with (
        LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        calc = di.DaskInfluenceCalculator(solver, client, progress=False, memory_budget=None)
        for _ in range(3):
            out = calc.influences(
                (x[:20].numpy(), y[:20].numpy()), (x.numpy(), y.numpy()), test_block_size=5, train_block_size=10
            ).compute(scheduler=client.get)
            close(out, expected, 1e-10)
