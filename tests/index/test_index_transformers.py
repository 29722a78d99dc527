"""The index on a tiny GPT-2 (built from a config) with the causal-LM task and dict batches:
the Kronecker projection of the Conv1D layers and the position embedding (from layer inputs
and output gradients) equals the dense projection of torch.func's per-sample gradients, and
a k = p orthogonal index equals Direct with the same task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dask_influence as di
from cases import tiny_gpt2
from dask_influence.index import Projector

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2(attn_implementation="eager")
    ids = torch.randint(0, 16, (12, 6))
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0  # a padded sequence
    return model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def test_kronecker_projection_of_gpt2_equals_the_dense_projection(gpt2):
    model, batch = gpt2
    with pytest.warns(UserWarning, match=r"left out of the index.*transformer\.wte\.weight"):
        pr = Projector(model, di.tasks.causal_lm(), "kronecker", 64, seed=2)
    assert [layer.kind for layer in pr.layers] == ["embedding"] + ["conv1d"] * 4
    g = pr.functions.per_sample_grads(pr.theta, pr.batch(batch))
    dense = (g @ pr.columns(0, pr.dim)).numpy()
    got = pr.project(batch)
    assert np.abs(got - dense).max() < 1e-10 * np.abs(dense).max()
    measured = pr.project(batch, measurement=True)  # the default measurement is the loss
    np.testing.assert_allclose(measured, got, rtol=1e-12, atol=1e-14)


def test_full_orthogonal_index_of_gpt2_equals_direct(gpt2, tmp_path):
    model, batch = gpt2
    task = di.tasks.causal_lm()
    lam = 2.0
    direct = di.DirectInfluence(model, task, regularization=lam, curvature="ggn").fit(batch)
    test = {k: v[:3] for k, v in batch.items()}
    exact = direct.influences(test, batch).numpy()
    index = di.GradientIndex.build(
        model, task, batch, tmp_path / "ix.zarr", projection="orthogonal", projection_dim=direct.num_params,
        dtype="float64", regularization=lam, block_size=5, client="sync",
    )  # fmt: skip
    got = index.influences(test)
    assert np.abs(got - exact).max() < 1e-8 * np.abs(exact).max()
