"""The factored index's memory per worker (index/memory_check.py): a build holds a block's factors
``(b, r, sum k_o + k_i)`` and their copy instead of its ``(b, k)`` gradients, plus one chunk's
largest layer three times in float64 for a truncating SVD; a query reads an index block's
factors beside the densified rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dask_influence as di
from cases import trained_classification_problem
from dask_influence.index import Projector
from dask_influence.index.memory_check import build_estimate, query_estimate


@pytest.fixture(scope="module")
def problem():
    model, loss, (x, y), (xt, yt) = trained_classification_problem()
    return model.double(), loss, (x.double().numpy(), y.numpy()), (xt.double().numpy(), yt.numpy())


def test_factored_build_and_query_estimates_count_the_factors(problem, tmp_path):
    model, loss, (x, y), (xt, yt) = problem
    projector = Projector(model, loss, "kronecker", 20, 0)  # layers (k_o, k_i): (3, 4), (2, 4); k = 20
    first = projector.batch((x[:10], y[:10]))
    dense = build_estimate(projector, first, 10, "none", None, None)
    est = build_estimate(projector, first, 10, "none", None, None, 2)  # T = 1 position: no SVD
    assert est.pieces[0] == (
        "the projected gradient factors of a block and their copy (2 x (10, 2, 13))",
        2 * 10 * 2 * 13 * 8,
    )
    assert est.pieces[1:] == dense.pieces[1:]  # the chunk's forward and backward, as the dense build's
    assert dense.pieces[0] == ("the projected gradients of a block and their copy (2 x (10, 20))", 2 * 10 * 20 * 8)
    query = query_estimate(projector, None, 6, 10, 13)
    assert query.pieces[-1] == ("an index block's factors (10, 13) and their cast", 10 * 13 * 8)
    assert query.total == query_estimate(projector, None, 6, 10).total + 10 * 13 * 8
    # the build checks the factored estimate: a budget between the two refuses only the dense build
    budget = build_estimate(projector, first, 47, "none", None, None, 1).total + 1000
    assert budget < build_estimate(projector, first, 47, "none", None, None).total
    kw = dict(projection="kronecker", projection_dim=20, preconditioner="none", client="sync", memory_budget=budget)
    with pytest.raises(ValueError, match=r"the projected gradients of a block and their copy \(2 x \(47, 20\)\)"):
        di.GradientIndex.build(model, loss, (x, y), tmp_path / "dense.zarr", **kw)
    index = di.GradientIndex.build(model, loss, (x, y), tmp_path / "fac.zarr", storage="factored", **kw)
    index.memory_budget = None  # the query holds the whole index block densified beside its factors
    assert index.attributes["factor_rank"] == 1 and index.influences((xt, yt)).shape == (6, 47)


def test_truncating_build_estimate_counts_the_svd_of_the_largest_layer():
    pytest.importorskip("transformers")
    from cases import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(attn_implementation="eager")
    with pytest.warns(UserWarning, match="left out of the index"):
        projector = Projector(model, di.tasks.causal_lm(), "kronecker", 256, 0)
    first = projector.batch({"input_ids": np.ones((4, 6), dtype=np.int64)})
    dims = projector.projection.layer_dims  # (4, 5), (13, 5), (4, 5), (17, 5), (4, 19): 85 the largest
    assert max(ko * ki for ko, ki in dims) == 85 and sum(ko + ki for ko, ki in dims) == 81
    est = build_estimate(projector, first, 4, "none", None, None, 2)  # T = 6 positions > r = 2
    assert est.pieces[:2] == (
        ("the projected gradient factors of a block and their copy (2 x (4, 2, 81))", 2 * 4 * 2 * 81 * 8),
        ("a chunk's largest layer for its SVD (3 x (4, 85) float64)", 3 * 4 * 85 * 8),
    )
    assert len(build_estimate(projector, first, 4, "none", None, None, 6).pieces) == 2  # r = T: no SVD
