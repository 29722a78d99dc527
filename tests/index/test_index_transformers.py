"""The index on a tiny GPT-2 (built from a config) with the causal-LM task and dict batches:
the Kronecker projection of the Conv1D layers and the position embedding (from layer inputs
and output gradients) equals the dense projection of torch.func's per-sample gradients, and
a k = p orthogonal index equals Direct with the same task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

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
        model,
        task,
        batch,
        tmp_path / "ix.zarr",
        projection="orthogonal",
        projection_dim=direct.num_params,
        dtype="float64",
        regularization=lam,
        train_block_size=5,
        ggn_draws=0,
        client="sync",
    )  # fmt: skip  (ggn_draws=0: the exact GGN; "auto" samples it for a causal LM)
    got = index.influences(test)
    assert np.abs(got - exact).max() < 1e-8 * np.abs(exact).max()


def test_index_of_bert_with_an_attention_mask_builds_with_the_looped_fallback(tmp_path):
    """Issue 31 item 6: the projected-VJP path of the GGN preconditioner had no one-sample-at-a-time
    fallback, so a Hugging Face ``BertForSequenceClassification`` with an ``attention_mask`` (whose
    mask check vmap cannot batch, also with ``attn_implementation="eager"``) crashed with torch's raw
    vmap ``RuntimeError``. The curvature it now builds equals ``P G P^T`` from Gauss-Newton-vector
    products (no vmap over samples), and the queries score with it."""
    from dask_influence.core.gradients import second_order

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=12, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=6, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(1, 12, (10, 6))  # no token 0: the padding row of the embedding is not used
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0  # a padded sequence
    data = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "labels": (ids[:, 0] % 3).numpy()}
    task = di.tasks.classification()
    with pytest.warns(UserWarning, match="one sample at a time"):
        index = di.GradientIndex.build(
            model, task, data, tmp_path / "ix.zarr", projection_dim=16, seed=1, regularization=0.5, train_block_size=5,
            dtype="float64", client="sync",
        )  # fmt: skip
    pr = Projector(model, task, "sjlt", 16, seed=1)
    batch = pr.batch(data)
    with second_order():
        gv = pr.functions.ggn_matmat(pr.theta, batch, pr.columns(0, pr.dim))  # (p, k)
    expected = pr.project_flat(gv.T).numpy()
    np.testing.assert_allclose(index.curvature_matrix(), expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    scores = index.influences(data)
    phi, phi_test = index.gradients(), pr.project(data, measurement=True)
    exact = phi_test @ np.linalg.solve(expected + 0.5 * np.eye(16), phi.T)
    np.testing.assert_allclose(scores, exact, rtol=1e-8, atol=1e-10 * np.abs(exact).max())


@pytest.mark.slow
def test_index_and_query_of_the_text_example_job(tmp_path):
    """Issue 31 item 6 from the command line: ``dask-influence index`` on the BERT classifier of
    ``examples/transformers`` (the factory of ``text_job.toml``, smaller) crashed with torch's raw
    vmap ``RuntimeError``; it now builds, and ``query`` writes a complete store."""
    from click.testing import CliRunner

    from dask_influence.cli.main import cli

    examples = Path(__file__).resolve().parents[2] / "examples" / "transformers"
    (tmp_path / "job.toml").write_text(
        f"""
[model]
factory = "factory:make_text_classifier"
path = {json.dumps(str(examples))}
options = {{ n_train = 20, n_test = 4, steps = 2 }}

[task]
name = "classification"

[index]
store = "index.zarr"
projection_dim = 16

[blocks]
train = 10
test = 4

[output]
store = "scores.zarr"
top_k = 3

[cluster]
sequential = true
"""
    )
    runner = CliRunner()
    built = runner.invoke(cli, ["index", str(tmp_path / "job.toml")])
    assert built.exit_code == 0, built.output
    assert "2 blocks written, 0 already done" in built.output
    queried = runner.invoke(cli, ["query", str(tmp_path / "job.toml")])
    assert queried.exit_code == 0, queried.output
    group = zarr.open_group(str(tmp_path / "scores.zarr"), mode="r")
    assert group["influences"].shape == (4, 20) and np.isfinite(group["influences"][:]).all()
    assert group.attrs["dask_influence"]["complete"]
