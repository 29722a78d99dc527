"""One-pass scoring: every test point scored in one pass over the training data, the factors read back
from the store by columns.

Against the in-memory scoring (``influences_from_factors``, and the store job scored in groups): the same
numbers, with slabs and held gradients cut small so that every reader path runs; a resume reads the
saved factors; a damaged factor chunk fails with one clear error and is solved again; each chunk of the
saved factors is decoded once per read of a span.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from cases import tiny_gpt2_config
from dask_influence.core import factor_columns
from dask_influence.core.solvers import ekfac as ekfac_module
from dask_influence.mapping import calculator, tasks
from dask_influence.storage import factors as zfactors
from test_saved_factors import Counter, arrays, lose, make, recorded_graphs

TEST_BLOCK, TRAIN_BLOCK = 3, 4


class Reader:
    """Factors in memory read by columns, counting what is read."""

    def __init__(self, factors: torch.Tensor):
        self.factors, self.read = factors, 0

    @property
    def shape(self):
        return tuple(self.factors.shape)

    def columns(self, start, stop):
        self.read += stop - start
        return self.factors[:, start:stop].clone()


def tiny_gpt2(vocab=97):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = tiny_gpt2_config(vocab_size=vocab, n_layer=2, n_embd=16, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval(), torch.randint(0, vocab, (10, 6))


@pytest.mark.parametrize("tied", ["head", "exclude"])
@pytest.mark.parametrize("route", ["layers", "flat"])
def test_ekfac_by_columns_equals_its_scoring_in_memory(monkeypatch, tied, route):
    model, ids = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver = di.EkfacInfluence(
            model, di.tasks.causal_lm(), regularization=0.1, tied=tied, fisher="sampled", chunk_size=3
        ).fit({"input_ids": ids})
    factors = solver.influence_factors({"input_ids": ids[:4]})
    expected = solver.influences_from_factors(factors, {"input_ids": ids})
    monkeypatch.setattr(ekfac_module, "FLAT_SCORING_MAX_PARAMS", 0 if route == "layers" else 10**9)

    whole = Reader(factors)  # everything held: each column read at most once
    got = solver.influences_from_factor_columns(whole, {"input_ids": ids})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
    assert 0 < whole.read <= solver.num_params

    # slabs of 500 numbers, one chunk of 3 sequences held at a time: 4 reads of the factors
    monkeypatch.setattr(factor_columns, "SLAB_BYTES", 4 * 4 * 500)
    monkeypatch.setattr(type(solver), "held_gradient_bytes", lambda self: 1)
    small = Reader(factors)
    got = solver.influences_from_factor_columns(small, {"input_ids": ids})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
    assert small.read == 4 * whole.read


def test_flat_route_by_columns_equals_in_memory(monkeypatch):
    model, loss, train, test = make()
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn", chunk_size=7).fit(train)
    factors = solver.influence_factors(*test)
    expected = solver.influences_from_factors(factors, *train)
    monkeypatch.setattr(factor_columns, "SLAB_BYTES", 3 * 8 * len(test[0]))  # 3 columns per slab
    monkeypatch.setattr(type(solver), "held_gradient_bytes", lambda self: 1)
    reader = Reader(factors)
    got = solver.influences_from_factor_columns(reader, *train)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert reader.read == -(-len(train[0]) // 7) * solver.num_params  # once per chunk of 7
    with pytest.raises(ValueError, match=r"shape \(n_test, 21\)"):
        solver.influences_from_factor_columns(Reader(factors[:, :5]), *train)


def job(solver, test, train, path, **kw):
    calc = di.SequentialInfluenceCalculator(solver, progress=False, memory_budget=kw.pop("budget", None))
    t = DataLoader(TensorDataset(*test), batch_size=TEST_BLOCK)
    r = DataLoader(TensorDataset(*train), batch_size=kw.pop("train_block", TRAIN_BLOCK))
    calc.influences_to_zarr(t, r, path, **kw)
    return calc


def test_a_one_pass_store_equals_the_groups_store_and_resumes(tmp_path, monkeypatch):
    model, loss, train, test = make()
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    budget = 2 * 2 * 21 * 8 * TEST_BLOCK  # the factors of one test block per group: 4 groups
    grouped = job(solver, test, train, tmp_path / "groups", budget=budget, top_k=3, self_influences=True)
    assert grouped.last_run_["scoring"] == "groups"
    count = Counter(monkeypatch)
    opts = dict(budget=budget, top_k=3, self_influences=True, scoring="one_pass")
    one = job(solver, test, train, tmp_path / "one", **opts)
    assert one.last_run_["scoring"] == "one_pass" and "4 group(s)" in one.last_run_["plan"]
    assert count.blocks == 4 and one.last_run_["chunks_computed"] == 40
    clean = arrays(tmp_path / "one")
    reference = arrays(tmp_path / "groups")
    for name in ("influences", "self_influences", "top_helpful_indices", "top_harmful_indices"):
        np.testing.assert_allclose(clean[name], reference[name], rtol=1e-12, atol=1e-12, err_msg=name)
    assert np.isfinite(clean["factors"]).all()

    # lost chunks: recomputed against the saved factors (none solved again), bit-identical
    lose(tmp_path / "one", [(0, 0), (1, 7), (3, 9)])
    count.blocks = 0
    resumed = job(solver, test, train, tmp_path / "one", resume=True, **opts)
    assert count.blocks == 0 and resumed.last_run_["chunks_computed"] == 3
    assert resumed.last_run_["factor_blocks_read"] == 4
    for name, value in arrays(tmp_path / "one").items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)

    # a damaged factor chunk: one clear error, its flag cleared, solved again by the next resume
    lose(tmp_path / "one", [(2, 5)])
    raw = tmp_path / "one" / "factors" / "c" / "3" / "0"
    raw.write_bytes(raw.read_bytes()[:-5])
    with pytest.raises(di.StoreError, match="saved factors of test block 3 .* damaged"):
        job(solver, test, train, tmp_path / "one", resume=True, verify=False, **opts)
    assert zarr.open_group(str(tmp_path / "one"))["factors_done"][3] == 0
    count.blocks = 0
    job(solver, test, train, tmp_path / "one", resume=True, verify=False, **opts)
    assert count.blocks == 1
    np.testing.assert_array_equal(arrays(tmp_path / "one")["influences"], clean["influences"])


def test_the_scoring_choice(tmp_path, monkeypatch):
    model, loss, train, test = make()
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    budget = 2 * 2 * 21 * 8 * TEST_BLOCK
    # auto: groups on a model below ONE_PASS_MIN_PARAMS, one pass above it where there are several groups
    assert job(solver, test, train, tmp_path / "a", budget=budget).last_run_["scoring"] == "groups"
    monkeypatch.setattr(calculator, "ONE_PASS_MIN_PARAMS", 21)
    assert job(solver, test, train, tmp_path / "b", budget=budget).last_run_["scoring"] == "one_pass"
    assert job(solver, test, train, tmp_path / "c").last_run_["scoring"] == "groups"  # one group
    with pytest.raises(ValueError, match="only mode='up'"):
        job(solver, test, train, tmp_path / "d", mode="perturbation", scoring="one_pass")
    with pytest.raises(ValueError, match="scoring must be one of"):
        job(solver, test, train, tmp_path / "e", scoring="stream")


@pytest.mark.parametrize("codecs", ["checksum", "zstd"])
def test_stored_columns_decode_each_chunk_once_per_span(tmp_path, codecs):
    """Checksummed factors are read from their chunk files directly; an older store's compressed ones through
    zarr; the same values either way, a partial last chunk included, and a damaged chunk named."""
    from dask_influence.storage.codecs import codecs as compressed

    p = 1030
    group = zarr.open_group(str(tmp_path / "s"), mode="w")
    group.create_array(
        zfactors.FACTORS,
        shape=(5, p),
        chunks=(2, 100),
        dtype="float32",
        fill_value=np.nan,
        **(zfactors.checksum_only() if codecs == "checksum" else compressed()),
    )
    assert (zfactors._direct_reader(group[zfactors.FACTORS]) is not None) == (codecs == "checksum")
    values = np.random.default_rng(0).standard_normal((5, p)).astype("float32")
    group[zfactors.FACTORS][...] = values
    reader = zfactors.StoredFactorColumns(str(tmp_path / "s"), [(0, (0, 2)), (2, (4, 5))])  # blocks 0 and 2
    assert reader.shape == (3, p)
    rows = values[[0, 1, 4]]
    for a, b in [(0, 30), (30, 100), (100, 250), (250, 260), (260, 1030)]:
        np.testing.assert_array_equal(reader.columns(a, b).numpy(), rows[:, a:b])
    # spans [0, 100), [100, 300), [200, 1030): the chunk [200, 300) twice (the last read began in it)
    assert reader.decoded == 3 * 1130
    raw = tmp_path / "s" / zfactors.FACTORS / "c" / "2" / "3"
    raw.write_bytes(raw.read_bytes()[:-5])
    zarr.open_group(str(tmp_path / "s"), mode="r+").create_array(zfactors.FACTORS_DONE, shape=(3,), dtype="int8")
    with pytest.raises(di.StoreError, match="saved factors of test block 2 .* damaged"):
        zfactors.StoredFactorColumns(str(tmp_path / "s"), [(0, (0, 2)), (2, (4, 5))]).columns(300, 400)
    assert zfactors.factor_chunks((2, 2, 1), 10**8, "float32")[1] <= zfactors.CHUNK_BYTES // (2 * 4)
    assert zfactors.factor_chunks((2,) * 8, 10**8, "float32") == (2, zfactors.SPAN_BYTES // (16 * 4))
    assert zfactors.SPAN_BYTES == factor_columns.SLAB_BYTES  # a slab of every test point reads one span


def test_one_pass_on_the_cluster_equals_the_solver(cluster_client, tmp_path):
    model, ids = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver = di.EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, tied="head", fisher="sampled")
        solver.fit({"input_ids": ids})
    expected = solver.influences({"input_ids": ids[:5]}, {"input_ids": ids}).numpy()
    calc = di.DaskInfluenceCalculator(solver, cluster_client, progress=False, memory_budget=2 * 4 * solver.num_params)
    group = calc.influences_to_zarr(
        ids[:5].numpy(), ids.numpy(), tmp_path / "s", test_block_size=2, train_block_size=3, scoring="one_pass"
    )
    assert calc.last_run_["scoring"] == "one_pass" and calc.last_run_["factor_blocks_solved"] == 3
    np.testing.assert_allclose(group["influences"][...], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_block_is_solved_once_the_block_a_place_before_it_is_saved(tmp_path, monkeypatch):
    """Every factor task is ready at the start: without an order, a worker solved blocks ahead of their saves
    (GPT-2-small's are 1 GB each). With 2 places, block ``i`` waits for the save of block ``i - 2``."""
    model, loss, train, test = make()
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    graphs = recorded_graphs(monkeypatch)
    monkeypatch.setattr(di.SequentialInfluenceCalculator, "_places", lambda self: 2)
    job(solver, test, train, tmp_path / "s", scoring="one_pass")
    (dsk,) = graphs
    saves = {key[1]: key for key in dsk if isinstance(key, tuple) and str(key[0]).startswith("factorsave-")}
    factors = {
        key[1]: task for key, task in dsk.items() if isinstance(key, tuple) and str(key[0]).startswith("factors-")
    }
    assert sorted(saves) == sorted(factors) == [0, 1, 2, 3]
    for i, task in factors.items():
        waits = [arg for arg in task[1:] if arg in saves.values()] if task[0] is tasks.after else []
        assert waits == ([saves[i - 2]] if i >= 2 else []), (i, task)


def test_consecutive_train_blocks_are_scored_together_and_resume_bit_identically(tmp_path, monkeypatch):
    """20 train blocks of 2, ``STREAM_BLOCKS`` 2: one-pass tasks of 2 blocks each (the factors read once per
    task); a resume of one lost chunk recomputes its whole group, the same task as in the clean run."""
    from dask_influence.mapping import store_job

    monkeypatch.setattr(store_job, "STREAM_BLOCKS", 2)
    model, loss, train, test = make()
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    reads = []
    original = zfactors.StoredFactorColumns.columns

    def counted(self, start, stop):
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(zfactors.StoredFactorColumns, "columns", counted)
    opts = dict(train_block=2, scoring="one_pass", top_k=2)
    job(solver, test, train, tmp_path / "one", **opts)
    job(solver, test, train, tmp_path / "groups", train_block=2, top_k=2)
    reference = arrays(tmp_path / "groups")
    clean = arrays(tmp_path / "one")
    np.testing.assert_allclose(clean["influences"], reference["influences"], rtol=1e-12, atol=1e-12)
    clean_reads = len(reads)
    lose(tmp_path / "one", [(1, 7)])
    reads.clear()
    resumed = job(solver, test, train, tmp_path / "one", resume=True, **opts)
    assert resumed.last_run_["chunks_computed"] == 1  # its group of 2 blocks scored again, one block written
    assert clean_reads == 10 * len(reads) > 0  # 10 tasks of 2 blocks, each reading the factors once
    for name, value in arrays(tmp_path / "one").items():
        np.testing.assert_array_equal(value, clean[name], err_msg=name)
