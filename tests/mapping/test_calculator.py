"""Dask result == sequential result == in-memory result, for every input kind and mode."""

import dask.array as da
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def inputs(kind, x, y, block):
    if kind == "loader":
        return DataLoader(TensorDataset(x, y), batch_size=block), {}
    if kind == "dataset":
        return TensorDataset(x, y), {"block": block}
    if kind == "dask":
        return (da.from_array(x.numpy(), chunks=(block, -1)), da.from_array(y.numpy(), chunks=block)), {}
    if kind == "numpy":
        return (x.numpy(), y.numpy()), {"block": block}
    raise AssertionError(kind)


def lazy(calc, test, train, mode, test_block=7, train_block=10, test_kind="loader", train_kind="loader"):
    t, topt = inputs(test_kind, *test, test_block)
    r, ropt = inputs(train_kind, *train, train_block)
    return calc.influences(t, r, mode=mode, test_block_size=topt.get("block"), train_block_size=ropt.get("block"))


@pytest.mark.parametrize("kind", ["loader", "dataset", "dask", "numpy"])
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_sequential_equals_in_memory(problem, kind, mode):
    solver, train, test = problem
    expected = solver.influences(*test, *train, mode=mode).numpy()
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    result = lazy(calc, test, train, mode, test_kind=kind, train_kind=kind)
    # 17 test points in blocks of 7 and 53 train points in blocks of 10: ragged last blocks
    assert result.chunks[:2] == ((7, 7, 3), (10, 10, 10, 10, 10, 3))
    assert result.shape == expected.shape and result.dtype == np.float64
    assert rel_err(result.compute(scheduler="sync"), expected) < 1e-10


@pytest.mark.parametrize("kind", ["loader", "dask"])
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_dask_equals_sequential(problem, cluster_client, kind, mode):
    solver, train, test = problem
    seq = lazy(
        di.SequentialInfluenceCalculator(solver, progress=False), test, train, mode, test_kind=kind, train_kind=kind
    ).compute(scheduler="sync")
    dist = lazy(
        di.DaskInfluenceCalculator(solver, cluster_client, progress=False),
        test,
        train,
        mode,
        test_kind=kind,
        train_kind=kind,
    ).compute()
    assert rel_err(dist, seq) < 1e-10


def test_block_size_invariance(problem):
    solver, train, test = problem
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    a = lazy(calc, test, train, "up", 17, 53).compute(scheduler="sync")
    b = lazy(calc, test, train, "up", 1, 4).compute(scheduler="sync")
    c = lazy(calc, test, train, "up", 5, 11).compute(scheduler="sync")
    assert rel_err(b, a) < 1e-12 and rel_err(c, a) < 1e-12


def test_task_names_are_deterministic(problem):
    solver, train, test = problem
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    assert lazy(calc, test, train, "up").name == lazy(calc, test, train, "up").name
    assert lazy(calc, test, train, "up").name != lazy(calc, test, train, "up", 8).name


def test_train_gradients_once_per_train_block(problem, monkeypatch):
    """n_train + n_test backward passes, whatever the number of test blocks."""
    solver, train, test = problem
    counts = {"rows": 0}
    # the two entry points (joined gradients; per-tensor blocks for scoring) share no code path
    for name in ("per_sample_grads", "per_sample_grad_blocks"):
        original = getattr(type(solver._functions), name)

        def counting(self, theta, batch, _original=original, **kwargs):
            counts["rows"] += int(batch[0].shape[0])
            return _original(self, theta, batch, **kwargs)

        monkeypatch.setattr(type(solver._functions), name, counting)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    lazy(calc, test, train, "up", test_block=2).compute(scheduler="sync")
    assert counts["rows"] == len(train[0]) + len(test[0])


def test_memory_budget_groups_test_blocks(problem):
    solver, train, test = problem
    p = solver.num_params
    calc = di.SequentialInfluenceCalculator(solver, progress=False, memory_budget=7 * p * 8)
    result = lazy(calc, test, train, "up", test_block=7)
    expected = solver.influences(*test, *train).numpy()
    assert rel_err(result.compute(scheduler="sync"), expected) < 1e-10


@pytest.mark.parametrize("kind", ["numpy", "dataset"])
def test_without_a_test_block_size_a_test_block_holds_the_factors_the_budget_allows(problem, kind, caplog):
    """No ``test_block_size``: a block holds ``budget // (2 p itemsize)`` test points (3 here, so
    its factors fit the budget), each block its own task; the influences are the solver's. A given
    ``test_block_size`` is kept."""
    solver, train, test = problem
    p = solver.num_params
    calc = di.SequentialInfluenceCalculator(solver, progress=False, memory_budget=3 * 2 * p * 8 + 5)
    t = (test[0].numpy(), test[1].numpy()) if kind == "numpy" else torch.utils.data.TensorDataset(*test)
    with caplog.at_level("INFO", logger="dask_influence"):
        result = calc.influences(t, train, test_block_size=None if kind == "numpy" else 3)
    n = len(test[0])
    assert result.chunks[0] == (3,) * (n // 3) + ((n % 3,) if n % 3 else ())
    assert ("Test blocks of 3 points" in caplog.text) == (kind == "numpy")
    assert rel_err(result.compute(scheduler="sync"), solver.influences(*test, *train).numpy()) < 1e-10
    kept = calc.influences((test[0].numpy(), test[1].numpy()), train, test_block_size=n)
    assert kept.chunks[0] == (n,)


def test_test_groups_are_solved_in_turn_one_group_ahead():
    """With several test groups (factors beyond the per-task budget), group g's factors are solved only
    after every influence task of group g - 2: a worker holds two groups' factors, not all of them (the
    factor tasks, ready first, ran ahead on GPT-2-small). The influences are unchanged."""
    from dask.callbacks import Callback

    from cases import mapping_problem

    model, loss, train, test = mapping_problem()  # its own solver: the shared one's fit is not part of this
    solver = di.DirectInfluence(model, loss, regularization=0.05).fit(train)
    p = solver.num_params
    calc = di.SequentialInfluenceCalculator(solver, progress=False, memory_budget=2 * (p + 10) * 8 * 3)
    result = lazy(calc, test, train, "up", test_block=3, train_block=10, test_kind="numpy", train_kind="numpy")
    done: list = []
    with Callback(posttask=lambda key, *_: done.append(key)):
        values = result.compute(scheduler="sync", optimize_graph=False)  # the keys as built
    assert rel_err(values, solver.influences(*test, *train).numpy()) < 1e-10
    names = {k[0] if isinstance(k, tuple) else k for k in done}
    factors = next(n for n in names if str(n).startswith("factors-"))
    group = next(n for n in names if str(n).startswith("group-"))
    at = {k: n for n, k in enumerate(done)}
    n_groups = 1 + max(k[1] for k in done if isinstance(k, tuple) and k[0] == group)
    assert n_groups == 6  # 17 test points in blocks of 3, one block per group
    for g in range(2, n_groups):
        first_factor = at[(factors, g)]  # one test block per group: block g is group g
        assert all(at[k] < first_factor for k in done if isinstance(k, tuple) and k[0] == group and k[1] == g - 2)


def test_self_influences(problem, cluster_client):
    solver, train, _ = problem
    expected = solver.self_influences(*train).numpy()
    loader = DataLoader(TensorDataset(*train), batch_size=9)
    seq = di.SequentialInfluenceCalculator(solver, progress=False).self_influences(loader)
    dist = di.DaskInfluenceCalculator(solver, cluster_client, progress=False).self_influences(loader)
    assert rel_err(seq.compute(scheduler="sync"), expected) < 1e-10
    assert rel_err(dist.compute(), expected) < 1e-10


def test_output_dtype_follows_model_not_data(problem):
    """Integer-valued float data or int data never turns influences into integers."""
    solver, train, test = problem
    model32 = __import__("copy").deepcopy(solver.model).float()
    s32 = di.DirectInfluence(model32, solver.loss, regularization=0.05).fit((train[0].float(), train[1]))
    calc = di.SequentialInfluenceCalculator(s32, progress=False)
    out = calc.influences(
        (test[0].numpy(), test[1].numpy()), (train[0].numpy(), train[1].numpy()), test_block_size=5, train_block_size=5
    )
    assert out.dtype == np.float32


def test_refused_inputs(problem):
    solver, train, test = problem
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    shuffled = DataLoader(TensorDataset(*train), batch_size=10, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        calc.influences(DataLoader(TensorDataset(*test)), shuffled)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(TypeError, match="iterable-style"):
        calc.influences(DataLoader(TensorDataset(*test)), DataLoader(Stream(), batch_size=4))
    with pytest.raises(ValueError, match="different lengths"):
        calc.influences((test[0].numpy(), test[1].numpy()[:-1]), (train[0].numpy(), train[1].numpy()))
    with pytest.raises(ValueError, match="different lengths"):
        calc.influences(test, (da.from_array(train[0].numpy()), da.from_array(train[1].numpy()[:-2])))
    with pytest.raises(ValueError, match="block_size"):
        calc.influences(TensorDataset(*test), TensorDataset(*train))
    with pytest.raises(ValueError, match="feature shape"):
        calc.influences((test[0][:, :3].numpy(), test[1].numpy()), (train[0].numpy(), train[1].numpy()))
    with pytest.raises(ValueError, match="mode"):
        calc.influences(test, train, mode="down")
    with pytest.raises(TypeError, match="Unsupported"):
        calc.influences("data.csv", train)
    unfitted = di.DirectInfluence(solver.model, solver.loss)
    with pytest.raises(di.NotFittedError, match="calc.fit"):
        di.SequentialInfluenceCalculator(unfitted).influences(test, train)


def test_progress_bar_shown_and_silenced(problem, tmp_path, capsys):
    solver, train, test = problem
    t = DataLoader(TensorDataset(*test), batch_size=7)
    r = DataLoader(TensorDataset(*train), batch_size=10)
    di.SequentialInfluenceCalculator(solver, progress=True).influences_to_zarr(t, r, tmp_path / "a.zarr")
    shown = capsys.readouterr().out
    assert "100%" in shown
    di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(t, r, tmp_path / "b.zarr")
    assert capsys.readouterr().out == ""
