"""Saved test factors, graphs of the missing work only, and the top-k merge on the workers.

A resume reads back the test factors its chunks need instead of solving again (bit-identical
results); a refit makes them stale; damaged ones are solved again. A resume builds tasks for
the missing chunks only. The top-k merge (candidates per chunk, merged per test block) gives
the stable argsort's answer: by value, ties by the lower index, NaN last.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence.mapping import calculator, tasks
from dask_influence.storage import factors as zfactors
from dask_influence.storage import topk
from dask_influence.storage.layout import ATTR

N_TRAIN, N_TEST, TEST_BLOCK, TRAIN_BLOCK = 40, 12, 3, 4  # 4 test blocks x 10 train blocks
LOST = [(0, 0), (1, 7), (3, 9)]


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 3, generator=g, dtype=torch.float64)
    y = torch.randn(N_TRAIN, 1, generator=g, dtype=torch.float64)
    xt = torch.randn(N_TEST, 3, generator=g, dtype=torch.float64)
    yt = torch.randn(N_TEST, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double().eval()
    return model, torch.nn.MSELoss(), (x, y), (xt, yt)


@pytest.fixture(scope="module")
def problem():
    return make()


def loaders(test, train):
    return (
        DataLoader(TensorDataset(*test), batch_size=TEST_BLOCK),
        DataLoader(TensorDataset(*train), batch_size=TRAIN_BLOCK),
    )


def arrays(path):
    group = zarr.open_group(str(path), mode="r")
    return {n: group[n][...] for n in sorted(group.array_keys()) if not n.endswith("_done")}


class Counter:
    """Counts the test blocks whose factors a job solves (the task functions run in this process)."""

    def __init__(self, monkeypatch):
        self.blocks = 0
        for name in ("factor_block", "factors_with_info"):
            original = getattr(tasks, name)

            def counted(solver, block, _original=original):
                self.blocks += 1
                return _original(solver, block)

            monkeypatch.setattr(tasks, name, counted)


def recorded_graphs(monkeypatch) -> list[dict]:
    """The graph (its tasks) of every job the calculators execute from now on, in order."""
    graphs: list[dict] = []
    original = calculator._BlockCalculator._execute_graph

    def recorded(self, graph, keys):
        graphs.append(dict(graph.dsk))
        return original(self, graph, keys)

    monkeypatch.setattr(calculator._BlockCalculator, "_execute_graph", recorded)
    return graphs


def lose(path: Path, chunks):
    """Chunks lost as by a killed job: their data and flag files gone."""
    for i, j in chunks:
        (path / "influences" / "c" / str(i) / str(j)).unlink()
        (path / "influences_done" / "c" / str(i) / str(j)).unlink()
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_a_resume_reads_the_saved_factors_and_a_refit_solves_them_again(problem, tmp_path, monkeypatch, method):
    model, loss, train, test = problem
    path, fit_file = tmp_path / "store.zarr", tmp_path / "fit.pt"

    def solver():
        if method == "cg":
            return di.CgInfluence(model, loss, regularization=0.1, curvature="ggn", rtol=1e-10)
        return di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn")

    def job(refit=False, **kw):
        calc = di.SequentialInfluenceCalculator(solver(), progress=False)
        calc.fit(TensorDataset(*train), train_block_size=TRAIN_BLOCK, path=fit_file, refit=refit)
        t, r = loaders(test, train)
        calc.influences_to_zarr(t, r, path, top_k=3, self_influences=True, **kw)
        return calc

    count = Counter(monkeypatch)
    first = job()
    assert count.blocks == 4 and first.last_run_["factor_blocks_solved"] == 4
    clean = arrays(path)
    assert clean["factors"].shape == (N_TEST, model[0].weight.numel() + 4 + 4 + 1)
    assert np.isfinite(clean["factors"]).all()
    assert np.unique(zarr.open_group(str(path))["factors_done"][...]).tolist() == [1]
    if method == "cg":  # the saves wrote the solver's reports
        assert np.isfinite(clean["solver_info"]).all()

    # lost chunks of three test blocks: recomputed from the saved factors, none solved again
    lose(path, LOST)
    count.blocks = 0
    resumed = job(resume=True)
    assert count.blocks == 0
    assert resumed.last_run_["chunks_computed"] == len(LOST)
    assert resumed.last_run_["factor_blocks_read"] == 4 and resumed.last_run_["factor_blocks_solved"] == 0
    for name, value in arrays(path).items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)  # bit-identical

    # a refit makes every saved factor stale: solved again (the same fitted state: the same numbers)
    count.blocks = 0
    refitted = job(refit=True, resume=True)
    assert count.blocks == 4 and refitted.last_run_["factor_blocks_solved"] == 4
    assert np.unique(zarr.open_group(str(path))["factors_done"][...]).tolist() == [2]
    for name, value in arrays(path).items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)


def test_missing_or_damaged_factors_are_solved_again(problem, tmp_path, monkeypatch):
    model, loss, train, test = problem
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    path = tmp_path / "store.zarr"
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    t, r = loaders(test, train)
    calc.influences_to_zarr(t, r, path)
    clean = arrays(path)
    count = Counter(monkeypatch)

    # a deleted factor file: found by its listing, that block solved again
    lose(path, [(0, 0)])
    (path / "factors" / "c" / "1" / "0").unlink()
    calc.influences_to_zarr(t, r, path, resume=True, verify=False)
    assert count.blocks == 1 and calc.last_run_["factor_blocks_read"] == 3
    for name, value in arrays(path).items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)

    # a truncated one: verify="full" decodes the saved factors and solves that block again
    lose(path, [(0, 1)])
    raw = path / "factors" / "c" / "2" / "0"
    raw.write_bytes(raw.read_bytes()[:-5])
    count.blocks = 0
    calc.influences_to_zarr(t, r, path, resume=True, verify=True)
    assert count.blocks == 1
    for name, value in arrays(path).items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)

    # unchecked (verify=False), the read fails with one clear error and clears the flag:
    # the next resume solves that block again
    lose(path, [(0, 2)])
    raw = path / "factors" / "c" / "3" / "0"
    raw.write_bytes(raw.read_bytes()[:-5])
    with pytest.raises(di.StoreError, match="saved factors of test block 3 .* damaged"):
        calc.influences_to_zarr(t, r, path, resume=True, verify=False)
    assert zarr.open_group(str(path))["factors_done"][3] == 0
    count.blocks = 0
    calc.influences_to_zarr(t, r, path, resume=True, verify=False)
    assert count.blocks == 1
    for name, value in arrays(path).items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)


def test_without_saved_factors_and_for_a_store_of_an_earlier_version(problem, tmp_path, monkeypatch):
    model, loss, train, test = problem
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    path = tmp_path / "store.zarr"
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    t, r = loaders(test, train)
    calc.influences_to_zarr(t, r, path, save_factors=False)
    assert "factors" not in zarr.open_group(str(path))
    count = Counter(monkeypatch)
    lose(path, [(2, 3)])
    calc.influences_to_zarr(t, r, path, resume=True)  # the store gets its factors arrays
    assert count.blocks == 4  # one group of 4 test blocks: the group's factors are solved
    group = zarr.open_group(str(path))
    assert group["factors_done"][...].tolist() == [1, 1, 1, 1]
    xt, yt = test
    per_block = [solver.influence_factors(xt[a : a + TEST_BLOCK], yt[a : a + TEST_BLOCK]) for a in range(0, 12, 3)]
    np.testing.assert_array_equal(group["factors"][...], torch.cat(per_block).numpy())


def test_a_resume_builds_tasks_for_the_missing_chunks_only(problem, tmp_path, monkeypatch):
    model, loss, train, test = problem
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    path = tmp_path / "store.zarr"
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    t, r = loaders(test, train)
    graphs = recorded_graphs(monkeypatch)
    calc.influences_to_zarr(t, r, path)
    # solver, 2 dataset literals; 4 factors + 1 save (one group); 10 groups + 40 picks + 10 writes
    assert len(graphs[-1]) == 3 + 5 + 60
    calc.influences_to_zarr(t, r, path, resume=True)  # complete: nothing but the literals
    assert len(graphs[-1]) == 3 and calc.last_run_["chunks_computed"] == 0
    lose(path, [(0, 0), (3, 9)])
    calc.influences_to_zarr(t, r, path, resume=True)
    # 1 read of the group's factors and 4 picks; per missing chunk its group's task, 4 picks and 1 write
    assert len(graphs[-1]) == 3 + 5 + 2 * 6 and calc.last_run_["chunks_computed"] == 2


def test_top_k_after_losing_chunks_reads_the_done_ones_back(problem, tmp_path, caplog):
    model, loss, train, test = problem
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    path = tmp_path / "store.zarr"
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    t, r = loaders(test, train)
    with caplog.at_level(logging.INFO, logger="dask_influence"):
        calc.influences_to_zarr(t, r, path, top_k=5)
    assert "Top-5 merged for 4 of 4 test block(s)" in caplog.text  # a progress line for the merges
    full = solver.influences(*test, *train).numpy()
    order = np.argsort(full, axis=1, kind="stable")
    clean = arrays(path)
    np.testing.assert_array_equal(clean["top_harmful_indices"], order[:, :5])
    np.testing.assert_array_equal(clean["top_helpful_indices"], np.argsort(-full, axis=1, kind="stable")[:, :5])
    lose(path, [(1, 2), (1, 5)])
    group = zarr.open_group(str(path), mode="r+")
    group["topk_done"][1] = 0
    group["topk_done"][2] = 0
    shutil.rmtree(path / "completion")
    calc.influences_to_zarr(t, r, path, top_k=5, resume=True)
    assert calc.last_run_["topk_blocks_merged"] == 2
    for name, value in arrays(path).items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)


def reference(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The stable argsort's top-k (NaN last in both directions)."""
    helpful = np.argsort(-values, axis=1, kind="stable")[:, :k]
    harmful = np.argsort(values, axis=1, kind="stable")[:, :k]
    return helpful, harmful


@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_candidates_and_merges_give_the_stable_argsort(kind):
    rng = np.random.default_rng(3)
    for _ in range(60):
        n, m, k = int(rng.integers(1, 5)), int(rng.integers(1, 3000)), int(rng.integers(1, 12))
        values = rng.standard_normal((n, m)).astype(np.float32)
        if kind == "ties":  # duplicated training points: equal influences
            values = rng.integers(-3, 4, size=(n, m)).astype(np.float32)
        elif kind == "nan":
            values[rng.random((n, m)) < 0.2] = np.nan
            values[0, : m // 2] = np.nan
        cuts = sorted({0, m, *map(int, rng.integers(0, m, size=4))})
        parts = [topk.candidates(values[:, a:b], a, k) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        merged = topk.merge([topk.merge(parts[:2], k), *parts[2:]], k) if len(parts) > 2 else topk.merge(parts, k)
        helpful, harmful = reference(values, k)
        np.testing.assert_array_equal(merged[0], helpful)
        np.testing.assert_array_equal(merged[2], harmful)
        np.testing.assert_array_equal(merged[1], np.take_along_axis(values, helpful, 1))
        np.testing.assert_array_equal(merged[3], np.take_along_axis(values, harmful, 1))


def test_factor_chunks_stay_bounded():
    assert zfactors.factor_chunks((7, 7, 3), 1000, "float64") == (7, 1000)
    rows, width = zfactors.factor_chunks((512,), 10**8, "float32")
    assert rows == 512 and rows * width * 4 <= zfactors.CHUNK_BYTES


def test_auto_saves_factors_up_to_the_influences_size_or_one_gib():
    from types import SimpleNamespace

    from dask_influence.mapping.plan import BlockPlan

    plan = BlockPlan((100,), (1000,), ((0,),))  # 100 test x 1,000 train points
    graph = SimpleNamespace(feature_shape=(), dtype="float32")
    assert calculator._saves_factors("auto", plan, graph, 10**6)  # 400 MB of factors: under 1 GiB
    assert not calculator._saves_factors("auto", plan, graph, 10**7)  # 4 GB, 10,000x the influences
    assert calculator._saves_factors("auto", plan, SimpleNamespace(feature_shape=(10**4,), dtype="float32"), 10**7)
    assert calculator._saves_factors(True, plan, graph, 10**9) and not calculator._saves_factors(False, plan, graph, 1)
    with pytest.raises(ValueError, match="save_factors must be"):
        calculator._saves_factors("yes", plan, graph, 1)
