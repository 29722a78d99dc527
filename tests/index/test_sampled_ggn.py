"""The gradient index's GGN preconditioner from the sampled (true) Fisher: labels drawn from the
model's predictive distribution, one backward pass per sample and draw
(:mod:`dask_influence.core.sampled_fisher`), chosen by ``ggn_draws="auto"`` where it is cheaper
than the exact projected GGN (a causal LM: ``(T - 1) V`` roots per sequence), converging to it
as the draws grow, and within 0.02 Pearson of it at the default draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dask_influence as di
from cases import tiny_gpt2, trained_classification_problem

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow]


def _sequences(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` sequences of 8 tokens of a sparse random Markov chain over 16 tokens, every fifth padded."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(rng.dirichlet(np.full(16, 0.2), size=16), axis=1)
    ids = np.empty((n, 8), np.int64)
    ids[:, 0] = rng.integers(0, 16, n)
    for t in range(1, 8):
        ids[:, t] = np.minimum((cumulative[ids[:, t - 1]] < rng.random(n)[:, None]).sum(1), 15)
    mask = np.ones_like(ids)
    mask[::5, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def lm():
    """A tiny GPT-2 (1,080 parameters, float64), 60 train and 12 test sequences, lambda = 0.01 x
    the largest eigenvalue of the GGN, and the exact influences at that lambda (DirectInfluence)."""
    torch.manual_seed(0)
    model = tiny_gpt2(attn_implementation="eager")
    data = _sequences(72)
    train, test = {k: v[:60] for k, v in data.items()}, {k: v[60:] for k, v in data.items()}
    task = di.tasks.causal_lm()
    direct = di.DirectInfluence(model, task, regularization=1.0, curvature="ggn").fit(train)
    lam = 0.01 * float(torch.linalg.eigvalsh(direct.hessian)[-1])
    direct = di.DirectInfluence(model, task, regularization=lam, curvature="ggn").fit(train)
    return model, task, train, test, lam, direct.influences(test, train).numpy()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_auto_samples_the_lm_ggn_within_002_pearson_of_the_exact_projected_ggn(lm, tmp_path):
    model, task, train, test, lam, exact = lm
    common = dict(projection_dim=64, regularization=lam, train_block_size=20, dtype="float64", client="sync")
    auto = di.GradientIndex.build(model, task, train, tmp_path / "auto.zarr", **common)
    assert auto.attributes["ggn_estimate"] == {"kind": "sampled", "draws": 8, "seed": 0}  # ceil(8 x 64 / 60) > 8
    full = di.GradientIndex.build(model, task, train, tmp_path / "exact.zarr", ggn_draws=0, **common)
    assert full.attributes["ggn_estimate"] == "exact"
    sampled, reference = _pearson(auto.influences(test), exact), _pearson(full.influences(test), exact)
    assert reference > 0.8  # measured 0.815 (k = 64 of p = 1,080)
    assert abs(sampled - reference) < 0.02, (sampled, reference)  # measured 0.797 vs 0.815 (8 draws; 16: 0.807)
    fisher = di.GradientIndex.build(model, task, train, tmp_path / "f.zarr", preconditioner="fisher", **common)
    assert _pearson(fisher.influences(test), exact) < reference - 0.05  # the empirical Fisher is another matrix


def test_sampled_ggn_converges_to_the_exact_projected_ggn_as_draws_grow(lm):
    """Relative Frobenius error of the sampled projected GGN falls like 1/sqrt(draws) (measured
    0.59, 0.29, 0.15, 0.075 at 1, 4, 16, 64 draws); the same seed gives the same draws
    whatever the blocks."""
    from dask_influence.index import Projector

    model, task, train, *_ = lm
    pr = Projector(model, task, "sjlt", 64, seed=0)
    exact = pr.curvature(train, "ggn")
    errors = [
        np.linalg.norm(pr.curvature(train, "ggn", {"draws": d, "seed": 0}) - exact) / np.linalg.norm(exact)
        for d in (1, 4, 16, 64)
    ]
    assert errors[0] > 0.3 and errors[-1] < 0.12, errors
    assert all(b < 0.75 * a for a, b in zip(errors, errors[1:])), errors
    halves = [{k: v[s] for k, v in train.items()} for s in (slice(0, 25), slice(25, 60))]
    whole = pr.curvature(train, "ggn", {"draws": 4, "seed": 0})
    split = sum(
        len(h["input_ids"]) / 60 * pr.curvature(h, "ggn", {"draws": 4, "seed": 0}, offset=o)
        for h, o in zip(halves, (0, 25))
    )
    np.testing.assert_allclose(split, whole, rtol=1e-10, atol=1e-12 * np.abs(whole).max())


def test_auto_keeps_the_leading_ggn_roots_where_they_are_cheaper_and_explicit_draws_sample(tmp_path):
    """3 classes: the leading exact roots (95% of the output curvature's trace) beat 16 draws; the
    GGN they sum leaves out at most 5% of the exact one's trace and none of its definiteness;
    ggn_draws=0 is the exact GGN; ggn_draws=2 samples there too."""
    model, loss, (x, y), _ = trained_classification_problem()
    data = (x.double().numpy(), y.numpy())
    model = model.double()
    auto = di.GradientIndex.build(model, loss, data, tmp_path / "a.zarr", projection_dim=16, client="sync")
    assert auto.attributes["ggn_estimate"] == {"kind": "leading", "trace": 0.95}
    exact = di.GradientIndex.build(
        model, loss, data, tmp_path / "e.zarr", projection_dim=16, ggn_draws=0, client="sync"
    )
    assert exact.attributes["ggn_estimate"] == "exact"
    c_auto, c_exact = auto.curvature_matrix(), exact.curvature_matrix()
    left_out = c_exact - c_auto  # the directions each sample curves least: positive semi-definite
    assert np.linalg.eigvalsh(left_out).min() > -1e-10 * np.trace(c_exact)
    # 3 classes: softmax's Hessian has rank 2 (the ones vector is its null space), so the 2 leading
    # roots of 3 hold all of it here; leading_roots' choice is checked on 6 classes below
    assert np.trace(left_out) <= 0.05 * np.trace(c_exact)
    two = di.GradientIndex.build(model, loss, data, tmp_path / "b.zarr", projection_dim=16, ggn_draws=2, client="sync")
    assert two.attributes["ggn_estimate"] == {"kind": "sampled", "draws": 2, "seed": 0}
    assert not np.allclose(two.curvature_matrix(), auto.curvature_matrix())
    with pytest.raises(ValueError, match=r"ggn_draws must be 'auto', None or an int >= 0; got -1\."):
        di.GradientIndex.build(model, loss, data, tmp_path / "c.zarr", ggn_draws=-1, client="sync")
    with pytest.raises(ValueError, match=r"ggn_draws=4 draws labels .* Pass ggn_draws=0 \(the exact GGN\)\."):
        di.GradientIndex.build(
            model, lambda o, t: ((o - torch.nn.functional.one_hot(t, 3)) ** 4).mean(), data, tmp_path / "d.zarr",
            ggn_draws=4, client="sync",
        )  # fmt: skip


@pytest.mark.cluster
def test_sampled_ggn_on_two_workers_and_other_blocks_equals_the_in_process_build(lm, tmp_path, cluster_client):
    """Each sample's labels are drawn from a generator seeded by its index in the training data:
    blocks of 7 on 2 workers give the in-process index of blocks of 20 (up to summation order)."""
    model, task, train, test, lam, _ = lm
    kw = dict(projection_dim=32, regularization=lam, dtype="float64", ggn_draws=4)
    local = di.GradientIndex.build(model, task, train, tmp_path / "one.zarr", train_block_size=20, client="sync", **kw)
    dist = di.GradientIndex.build(
        model, task, train, tmp_path / "two.zarr", train_block_size=7, client=cluster_client, **kw
    )
    assert dist.attributes["ggn_estimate"] == {"kind": "sampled", "draws": 4, "seed": 0}
    np.testing.assert_allclose(dist.curvature_matrix(), local.curvature_matrix(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dist.influences(test), local.influences(test), rtol=1e-8, atol=1e-12)


def test_auto_draws_fall_with_the_training_points_per_dimension(lm, tmp_path):
    """``ggn_draws="auto"`` draws ``ceil(8 k / n_train)`` labels per sample (1 to 8): with 512
    sequences and k = 32 one draw per sequence keeps the index within 0.02 Pearson of the exact
    projected GGN (also measured: 1,024 sequences, k = 64: 0.867 vs 0.874; the empirical Fisher
    0.673)."""
    from dask_influence.index.build import auto_draws

    assert [auto_draws(64, 60), auto_draws(8, 60), auto_draws(64, 1024), auto_draws(256, 1024)] == [8, 2, 1, 2]
    model, task, *_ = lm
    data = _sequences(536, seed=1)
    train, test = {k: v[:512] for k, v in data.items()}, {k: v[512:] for k, v in data.items()}
    direct = di.DirectInfluence(model, task, regularization=1.0, curvature="ggn").fit(train)
    lam = 0.01 * float(torch.linalg.eigvalsh(direct.hessian)[-1])
    exact = di.DirectInfluence(model, task, regularization=lam, curvature="ggn").fit(train).influences(test, train)
    common = dict(projection_dim=32, regularization=lam, train_block_size=256, dtype="float64", client="sync")
    auto = di.GradientIndex.build(model, task, train, tmp_path / "auto.zarr", **common)
    assert auto.attributes["ggn_estimate"] == {"kind": "sampled", "draws": 1, "seed": 0}
    full = di.GradientIndex.build(model, task, train, tmp_path / "exact.zarr", ggn_draws=0, **common)
    sampled, reference = _pearson(auto.influences(test), exact.numpy()), _pearson(full.influences(test), exact.numpy())
    assert reference > 0.7 and abs(sampled - reference) < 0.02, (sampled, reference)  # 0.743 vs 0.749


def test_leading_roots_keep_the_largest_curvature_and_the_asked_share_of_the_trace():
    """Per sample the eigen-roots of H_i = sum_r s_r s_r^T, largest first: with trace=1 they square
    back to H_i; with 0.9 the block keeps the fewest directions holding >= 90% of its trace, and
    each sample's kept part is its best rank-m approximation."""
    from dask_influence.index.projector import leading_roots

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 6, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, dim=1)
    s = p.sqrt()
    roots = (torch.diag_embed(s) - p[:, :, None] * s[:, None, :]).permute(2, 0, 1)  # (c, n, c): S S^T = H
    h = torch.einsum("rni,rnj->nij", roots, roots)
    full = leading_roots(roots, 1.0)
    torch.testing.assert_close(torch.einsum("rni,rnj->nij", full, full), h, rtol=0, atol=1e-12)
    kept = leading_roots(roots, 0.9)
    m = kept.shape[0]
    values = torch.linalg.eigvalsh(h).flip(-1)
    held = values.sum(0).cumsum(0) / values.sum()
    assert held[m - 1] >= 0.9 > held[m - 2]  # the fewest directions that hold 90%
    approx = torch.einsum("rni,rnj->nij", kept, kept)
    torch.testing.assert_close(torch.linalg.eigvalsh(approx).flip(-1)[:, :m], values[:, :m], rtol=0, atol=1e-12)


@pytest.mark.parametrize("projection", ["sjlt", "kronecker"])
@pytest.mark.parametrize("estimate", ["sampled", "exact", "leading"])
def test_one_pass_gives_the_gradients_and_the_ggn_of_the_two_passes(lm, projection, estimate):
    """A GGN build's single pass (:meth:`Projector.gradients_and_ggn`: the loss gradient in the outputs
    back-propagated beside the roots, one forward per sample) stores the gradients of :meth:`project`
    and sums the GGN of :meth:`curvature`, for the sampled Fisher (the same draws), the exact roots and
    the leading ones, on a causal LM (padded sequences) and a classifier, float64."""
    from dask_influence.index.projector import Projector

    model, task, train, *_ = lm
    block, offset = {k: v[:20] for k, v in train.items()}, 40
    if estimate == "leading":  # a classifier: few outputs per sample
        model, task, (x, y), _ = trained_classification_problem()
        block = (x[:20].numpy(), y[:20].numpy())
    sampled = {"sampled": {"kind": "sampled", "draws": 3, "seed": 5}, "exact": None}.get(
        estimate, {"kind": "leading", "trace": 0.95}
    )
    k = 16 if estimate == "leading" else 48
    projector = Projector(model, task, projection, k, 0)
    grads, ggn = projector.gradients_and_ggn(block, sampled, offset)
    two_pass = projector.project(block), projector.curvature(block, "ggn", sampled, offset)
    assert grads.shape == two_pass[0].shape and ggn.shape == (projector.dim, projector.dim)
    assert np.abs(grads - two_pass[0]).max() <= 1e-10 * np.abs(two_pass[0]).max()
    assert np.abs(ggn - two_pass[1]).max() <= 1e-10 * np.abs(two_pass[1]).max()
