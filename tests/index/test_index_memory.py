"""The gradient index's memory per worker known before anything is written (issue 29 item 2): the
build's and a query's estimates from the shapes, and their one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest

import dask_influence as di
from cases import trained_classification_problem
from dask_influence.index import Projector
from dask_influence.index.memory_check import build_estimate, query_estimate

K = 16


@pytest.fixture(scope="module")
def problem():
    """The 4-5-3 tanh MLP (43 parameters, 3 outputs), float64: ``model, loss, (x, y), (xt, yt)``."""
    model, loss, (x, y), (xt, yt) = trained_classification_problem()
    return model.double(), loss, (x.double().numpy(), y.numpy()), (xt.double().numpy(), yt.numpy())


def _build(problem, path, **kw):
    model, loss, train, _ = problem
    return di.GradientIndex.build(
        model, loss, train, path, projection_dim=K, train_block_size=10, client="sync", progress=False, **kw
    )


def test_build_estimate_is_the_sum_of_its_shapes(problem):
    model, loss, (x, y), _ = problem
    projector = Projector(model, loss, "sjlt", K, 0)
    first = projector.batch((x[:10], y[:10]))
    est = build_estimate(projector, first, 10, "curvature", "ggn", {"kind": "leading", "trace": 0.95})
    assert est.pieces == (
        ("the projected gradients of a block and their copy (2 x (10, 16))", 2 * 10 * K * 8),
        ("a chunk's per-sample gradients (10, 43)", 10 * 43 * 8),
        ("the count sketch's kept hashes (43 x 5 bytes)", 43 * 5),  # an int32 bucket and an int8 sign each
        ("the curvature sums (9 x (16, 16) float64)", 9 * K * K * 8),
        ("the exact output-curvature roots and the loss's (3 + 1 x 10 x 3)", 4 * 10 * 3 * 8),
    )
    assert est.total == 25_392 + 215
    assert build_estimate(projector, first, 1, "curvature", "ggn", "exact").total == 19_128 + 215
    # the sampled Fisher's roots and the loss gradients in the outputs: (draws + 1) x samples x outputs
    sampled = build_estimate(projector, first, 10, "curvature", "ggn", {"kind": "sampled", "draws": 4, "seed": 0})
    assert sampled.bytes_of("the sampled output-curvature roots and the loss's (4 + 1 x 10 x 3)") == 5 * 10 * 3 * 8
    assert build_estimate(projector, first, 10, "none", None, None).total == 2 * 10 * K * 8 + 10 * 43 * 8 + 43 * 5
    # the Hessian: 16 curvature-vector products over the block, 5 x the hidden layer's 5 float64 per sample
    hessian = build_estimate(projector, first, 10, "curvature", "hessian", None)
    assert hessian.pieces[-2:] == (
        ("the projection's columns and their product (2 x (43, 16))", 2 * 43 * K * 8),
        ("one piece of a curvature product (10 samples x 16 vectors x 5 x 40 bytes)", 5 * 40 * 10 * K),
    )
    # the empirical Fisher sums the stored gradients: the (k, k) sums, no roots or products (the
    # scale benchmark's Fisher index on a 50,257-token GPT-2 was refused for products it never makes)
    fisher = build_estimate(projector, first, 10, "fisher", "ggn", None)
    assert fisher.pieces[-1][0].startswith("the curvature sums") and len(fisher.pieces) == 4
    # the Kronecker projection forms no per-sample gradient: a chunk's forward and backward
    kronecker = Projector(model, loss, "kronecker", K, 0)
    assert build_estimate(kronecker, first, 10, "none", None, None).pieces[1] == (
        "a chunk's forward and backward (2 x 10 samples x 40 bytes)",
        2 * 10 * 40,
    )


def test_build_refuses_in_one_line_before_writing_anything(problem, tmp_path):
    path = tmp_path / "ix.zarr"
    with pytest.raises(ValueError) as err:
        _build(problem, path, memory_budget=20_000)
    assert str(err.value) == (
        "The index build (per worker, a block of 10) needs 25,607 bytes (25.6 kB), beyond memory_budget=20,000 "
        "bytes (20.0 kB); the largest piece is the curvature sums (9 x (16, 16) float64), 18,432 bytes (18.4 kB). "
        "Pass a smaller train_block_size (one sample needs 19,343 bytes (19.3 kB)), or a larger memory_budget."
    )
    assert not path.exists()
    with pytest.raises(ValueError) as err:
        _build(problem, path, memory_budget=10_000)
    assert str(err.value) == (
        "The index build (per worker, a block of 1) needs 19,343 bytes (19.3 kB), beyond memory_budget=10,000 "
        "bytes (10.0 kB); the largest piece is the curvature sums (9 x (16, 16) float64), 18,432 bytes (18.4 kB). "
        "Even one sample does not fit: pass a larger memory_budget, or a smaller projection_dim."
    )
    assert not path.exists()
    index = _build(problem, path, memory_budget=25_607)  # exactly the estimate: built
    assert index.memory_budget == 25_607 and index.last_run_["blocks_written"] == 5


def test_query_refuses_a_test_block_beyond_the_budget_and_nothing_is_written(problem, tmp_path):
    _, _, _, test = problem
    index = _build(problem, tmp_path / "ix.zarr")
    expected = index.influences(test, test_block_size=6)
    est = query_estimate(index.projector, None, 6, 10)
    assert est.pieces == (
        ("the Cholesky factor (16, 16) float64", K * K * 8),
        ("a test block's projected gradients and factors (6, 16)", 6 * K * 16),
        ("a chunk's per-sample gradients (6, 43)", 6 * 43 * 8),
        ("an index block's gradients (10, 16) and their cast", 10 * K * 8),
        ("the scores (6, 10)", 6 * 10 * 8),
        ("the count sketch's kept hashes (43 x 5 bytes)", 43 * 5),
    )
    assert query_estimate(index.projector, None, 1, 10).total == 4_008 + 215
    index.memory_budget = 5_000
    with pytest.raises(ValueError) as err:
        index.influences_to_zarr(test, tmp_path / "out.zarr", test_block_size=6)
    assert str(err.value) == (
        "The index query (per worker, a test block of 6) needs 7,623 bytes (7.6 kB), beyond memory_budget=5,000 "
        "bytes (5.0 kB); the largest piece is a chunk's per-sample gradients (6, 43), 2,064 bytes (2.1 kB). "
        "Pass a smaller test_block_size (one sample needs 4,223 bytes (4.2 kB)), or a larger memory_budget."
    )
    assert not (tmp_path / "out.zarr").exists()
    # blocks of one test point fit: the same numbers
    np.testing.assert_allclose(index.influences(test, test_block_size=1), expected, rtol=1e-12)
