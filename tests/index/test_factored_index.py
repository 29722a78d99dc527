"""A factored index (``storage="factored"``: per layer ``r`` pairs ``(u, v)`` of the Kronecker-projected
gradient) against the dense index of the same build (seed, projection, ``k``).

The exact rank gives the dense index's influences, top-k, self-influences, gradients and
empirical-Fisher curvature: to 1e-10 of the largest in float64 (the two differ only in the order
of float64 sums: ``sum_t u_t v_t^T`` formed before or after storing), and in float16 to the
rounding of the stored numbers (dense rounds each of the ``k_o k_i`` entries once, factored each
``u`` and ``v``: relative ``2^-11`` per number, so about ``1e-3`` of the largest entry). A
truncated rank approaches the dense influences as ``r`` grows; a damaged factor chunk is named
by every read and recomputed by a resumed build; and the bytes on disk shrink to about
``sum_l (k_o + k_i) / sum_l k_o k_i`` of the dense index's on a classifier (rank 1)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dask_influence as di
from cases import tiny_gpt2, trained_classification_problem
from dask_influence.errors import StoreError
from dask_influence.index import layout

KW = dict(projection="kronecker", seed=3, client="sync")


@pytest.fixture(scope="module")
def mlp():
    """The 4-5-3 tanh MLP near a minimum, float64: ``model, loss, (x, y), (xt, yt)`` as numpy."""
    model, loss, (x, y), (xt, yt) = trained_classification_problem()
    return model.double(), loss, (x.double().numpy(), y.numpy()), (xt.double().numpy(), yt.numpy())


@pytest.fixture(scope="module")
def gpt2():
    """The tests' tiny GPT-2 (float64) with 12 train and 4 test sequences of 6 tokens, two padded."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_gpt2(attn_implementation="eager")
    ids = torch.randint(0, 16, (16, 6))
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0
    mask[13, 3:] = 0
    data = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    return model, di.tasks.causal_lm(), {k: v[:12] for k, v in data.items()}, {k: v[12:] for k, v in data.items()}


def _build(model, task, train, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # left-out parameters, k too small
        return di.GradientIndex.build(model, task, train, path, **{**KW, **kw})


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("preconditioner", ["curvature", "fisher"])
def test_exact_factors_of_a_classifier_give_the_dense_index(mlp, preconditioner, tmp_path):
    model, loss, train, test = mlp
    kw = dict(projection_dim=20, dtype="float64", train_block_size=10, preconditioner=preconditioner)
    dense = _build(model, loss, train, tmp_path / "dense.zarr", **kw)
    fac = _build(model, loss, train, tmp_path / "fac.zarr", storage="factored", **kw)
    attrs = fac.attributes
    assert (attrs["storage"], attrs["factor_rank"], attrs["factor_dropped"]) == ("factored", 1, 0.0)
    assert "gradients" not in fac.group and fac.group["factors_out"].shape == (47, 1, 5)  # k_o: 3 + 2
    assert fac.group["factors_in"].shape == (47, 1, 8)  # k_i: 4 + 4
    assert fac.dim == dense.dim == 3 * 4 + 2 * 4
    assert _rel(fac.gradients(), dense.gradients()) < 1e-12
    assert _rel(fac.curvature_matrix(), dense.curvature_matrix()) < 1e-12
    exact = dense.influences(test)
    assert _rel(fac.influences(test), exact) < 1e-10
    assert _rel(fac.self_influences(), dense.self_influences()) < 1e-10
    top, top_dense = fac.top_k(test, 5), dense.top_k(test, 5)
    np.testing.assert_array_equal(top.helpful_indices, top_dense.helpful_indices)
    np.testing.assert_array_equal(top.harmful_indices, top_dense.harmful_indices)
    store = fac.influences_to_zarr(test, tmp_path / "q.zarr", top_k=3, self_influences=True)
    assert _rel(store["influences"][:], exact) < 1e-10


def test_float16_factors_give_the_dense_float16_index_to_its_rounding(mlp, tmp_path):
    model, loss, (x, y), (xt, yt) = mlp
    model = model.float()
    train, test = (x.astype(np.float32), y), (xt.astype(np.float32), yt)
    dense = _build(model, loss, train, tmp_path / "dense.zarr", projection_dim=20)
    fac = _build(model, loss, train, tmp_path / "fac.zarr", projection_dim=20, storage="factored")
    assert fac.attributes["dtype"] == "float16" and fac.group["factors_out"].dtype == np.float16
    exact = dense.influences(test)
    got = fac.influences(test)
    assert _rel(got, exact) < 3e-3  # float16: 2^-11 relative per stored number
    assert np.corrcoef(got.ravel(), exact.ravel())[0, 1] > 1 - 1e-5


def test_exact_factors_of_a_language_model_give_the_dense_index(gpt2, tmp_path):
    model, task, train, test = gpt2
    kw = dict(projection_dim=1024, dtype="float64", train_block_size=5)  # k = 904: every layer whole
    dense = _build(model, task, train, tmp_path / "dense.zarr", **kw)
    fac = _build(model, task, train, tmp_path / "fac.zarr", storage="factored", **kw)
    assert fac.attributes["factor_rank"] == 6  # T = 6 positions (the last predicts nothing: its pair is 0)
    assert fac.attributes["factor_dropped"] == 0.0
    assert _rel(fac.gradients(), dense.gradients()) < 1e-12
    assert _rel(fac.influences(test), dense.influences(test)) < 1e-10
    assert _rel(fac.self_influences(), dense.self_influences()) < 1e-10


def test_truncated_factors_approach_the_dense_index_as_the_rank_grows(gpt2, tmp_path):
    model, task, train, test = gpt2
    kw = dict(projection_dim=1024, dtype="float64", train_block_size=6, preconditioner="fisher")
    exact = _build(model, task, train, tmp_path / "dense.zarr", **kw).influences(test)
    pearson, dropped = [], []
    for rank in (1, 2, 3, 4, 5):
        index = _build(model, task, train, tmp_path / f"r{rank}.zarr", storage="factored", factor_rank=rank, **kw)
        assert index.attributes["factor_rank"] == rank
        pearson.append(float(np.corrcoef(index.influences(test).ravel(), exact.ravel())[0, 1]))
        dropped.append(index.attributes["factor_dropped"])
    print("factor_rank 1-5: Pearson", [round(p, 4) for p in pearson], "dropped", [round(d, 4) for d in dropped])
    assert all(a < b for a, b in zip(pearson, pearson[1:])), pearson
    assert all(a > b for a, b in zip(dropped, dropped[1:])), dropped
    assert pearson[0] < 0.99 and pearson[-1] > 1 - 1e-9  # 5 active positions: rank 5 is exact
    assert 0.1 < dropped[0] < 1 and dropped[-1] < 1e-7


def test_a_damaged_factor_chunk_is_named_and_a_resume_recomputes_it(mlp, tmp_path):
    model, loss, train, test = mlp
    kw = dict(projection_dim=20, dtype="float32", train_block_size=10, storage="factored")
    path = tmp_path / "ix.zarr"
    clean = _build(model, loss, train, path, **kw)
    before = clean.influences(test)
    os.remove(path / "factors_in" / "c" / "1" / "0" / "0")
    missing = r"chunk 1 of its array 'factors_in' \(block 1, training points 10 to 19\) is missing"
    for query in (lambda: clean.influences(test), lambda: clean.self_influences(), lambda: clean.gradients()):
        with pytest.raises(StoreError, match=missing):
            query()
    with pytest.raises(StoreError, match=r"block\(s\) 1 of its array 'factors_in' are missing \(chunk files deleted\)"):
        di.GradientIndex.open(path, model, loss, client="sync")
    chunk = path / "factors_out" / "c" / "3" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(
        StoreError, match=r"chunk 3 of its array 'factors_out' \(block 3, training points 30 to 39\) does not decode"
    ):
        layout.read_gradients(str(path), (25, 40))  # what every query reads: block 2 is intact
    report = layout.verify(layout.open_index(path), mode="full")
    assert report.damaged == {"factors_in": [1], "factors_out": [3]}
    from dask_influence.storage.index_info import describe_index

    shown = describe_index(str(path), layout.open_index(path), verify=True)
    assert shown["damaged"].startswith("block(s) 3 of its array 'factors_out' are missing or not decoding")
    assert shown["blocks_done"] == 3
    resumed = _build(model, loss, train, path, **kw)
    assert resumed.last_run_["blocks_written"] == 2 and resumed.last_run_["blocks_repaired"] == 2
    np.testing.assert_array_equal(resumed.influences(test), before)


def test_another_storage_or_projection_is_refused(mlp, tmp_path):
    model, loss, train, _ = mlp
    with pytest.raises(ValueError, match=r"storage='factored' .* needs projection='kronecker'; got projection='sjlt'"):
        di.GradientIndex.build(model, loss, train, tmp_path / "ix.zarr", storage="factored", client="sync")
    assert not (tmp_path / "ix.zarr").exists()
    _build(model, loss, train, tmp_path / "ix.zarr", projection_dim=20, storage="factored")
    with pytest.raises(
        StoreError, match=r"was built with another storage \(storage: index has factored, this build has dense\)"
    ):
        _build(model, loss, train, tmp_path / "ix.zarr", projection_dim=20)
    with pytest.raises(StoreError, match=r"another factor_rank \(factor_rank: index has 1, this build has 2\)"):
        _build(model, loss, train, tmp_path / "ix.zarr", projection_dim=20, storage="factored", factor_rank=2)


def _bytes(path: Path, *arrays: str) -> int:
    return sum(f.stat().st_size for a in arrays for f in (path / a).rglob("*") if f.is_file() and f.name != "zarr.json")


def test_factored_classifier_index_is_smaller_on_disk(tmp_path):
    """The digits MLP's shape (64-64-32-10, 6,570 parameters) at k ~ 1,024: 106 numbers per point
    instead of 1,027 (layers (25, 26), (13, 25), (4, 13))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    gen = np.random.default_rng(0)
    train = (gen.normal(size=(256, 64)).astype(np.float32), gen.integers(0, 10, 256))
    test = (train[0][:5], train[1][:5])
    kw = dict(projection_dim=1024, train_block_size=64, preconditioner="fisher")
    dense = _build(model, nn.CrossEntropyLoss(), train, tmp_path / "dense.zarr", **kw)
    fac = _build(model, nn.CrossEntropyLoss(), train, tmp_path / "fac.zarr", storage="factored", **kw)
    assert dense.dim == fac.dim == 1027
    assert fac.group["factors_out"].shape[1:] + fac.group["factors_in"].shape[1:] == (1, 42, 1, 64)
    dense_bytes = _bytes(tmp_path / "dense.zarr", "gradients")
    fac_bytes = _bytes(tmp_path / "fac.zarr", "factors_out", "factors_in", "factors_dropped")
    ratio = fac_bytes / dense_bytes
    print(f"bytes: dense {dense_bytes:,}, factored {fac_bytes:,} (ratio {ratio:.3f}; numbers 106 / 1,027 = 0.103)")
    assert 0.05 < ratio < 0.13
    exact = dense.influences(test)
    assert _rel(fac.influences(test), exact) < 3e-3
    shutil.rmtree(tmp_path / "dense.zarr")
