"""The gradient index against exact solvers: with ``k = p`` and an orthogonal projection its
influences are exactly those of the same curvature (only the compression approximates);
resumable builds, distributed == in-process, refusals of another model, task or projection."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import Dataset

import dask_influence as di
from cases import trained_classification_problem
from dask_influence.errors import StoreError
from dask_influence.index import Projector

LAM = 0.3


@pytest.fixture(scope="module")
def problem():
    """A 4-5-3 tanh MLP (43 parameters) near a minimum, float64: ``model, loss, (x, y), (xt, yt)``."""
    model, loss, (x, y), (xt, yt) = trained_classification_problem()
    return model.double(), loss, (x.double().numpy(), y.numpy()), (xt.double().numpy(), yt.numpy())


def _exact(problem, curvature):
    model, loss, (x, y), (xt, yt) = problem
    direct = di.DirectInfluence(model, loss, regularization=LAM, curvature=curvature).fit(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), 16)
    )
    return direct.influences(xt, yt, x, y).numpy(), direct.self_influences(x, y).numpy()


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_full_orthogonal_projection_is_exact(problem, curvature, tmp_path):
    model, loss, train, test = problem
    p = sum(q.numel() for q in model.parameters())
    exact, exact_self = _exact(problem, curvature)
    index = di.GradientIndex.build(
        model, loss, train, tmp_path / "ix.zarr", projection="orthogonal", projection_dim=p, dtype="float64",
        curvature=curvature, regularization=LAM, train_block_size=10, client="sync",
    )  # fmt: skip
    assert index.dim == p and index.last_run_ == {"blocks_written": 5, "blocks_skipped": 0}
    np.testing.assert_allclose(index.influences(test), exact, rtol=1e-8, atol=1e-8 * np.abs(exact).max())
    np.testing.assert_allclose(index.self_influences(), exact_self, rtol=1e-8)
    group = index.influences_to_zarr(test, tmp_path / "out.zarr", top_k=4, self_influences=True, test_block_size=4)
    np.testing.assert_allclose(group["influences"][:], exact, rtol=1e-8, atol=1e-8 * np.abs(exact).max())
    np.testing.assert_allclose(group["self_influences"][:], exact_self, rtol=1e-8)
    assert group.attrs["dask_influence"]["complete"]
    np.testing.assert_array_equal(group["top_helpful_indices"][:], np.argsort(-exact, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(group["top_harmful_indices"][:], np.argsort(exact, axis=1, kind="stable")[:, :4])


def test_fisher_preconditioner_is_the_projected_empirical_fisher(problem, tmp_path):
    """``C = Phi^T Phi / n``: with an orthogonal k = p projection, the influences of the damped
    empirical Fisher ``G^T G / n + lambda I`` computed densely here."""
    model, loss, train, test = problem
    p = sum(q.numel() for q in model.parameters())
    index = di.GradientIndex.build(
        model, loss, train, tmp_path / "ix.zarr", projection="orthogonal", projection_dim=p, dtype="float64",
        preconditioner="fisher", regularization=LAM, train_block_size=16, client="sync",
    )  # fmt: skip
    pr = Projector(model, loss)
    g = pr.functions.per_sample_grads(pr.theta, pr.batch(train)).numpy()
    gt = pr.functions.per_sample_grads(pr.theta, pr.batch(test)).numpy()
    fisher = g.T @ g / len(g) + LAM * np.eye(p)
    expected = gt @ np.linalg.solve(fisher, g.T)
    np.testing.assert_allclose(index.influences(test), expected, rtol=1e-8, atol=1e-9 * np.abs(expected).max())


def test_projections_agree_with_their_dense_matrix(problem):
    """Each kind's ``project`` (the Kronecker one from layer inputs and output gradients, never a
    per-sample gradient) equals the per-sample gradients times the dense ``P^T`` built from ``columns``."""
    model, loss, train, _ = problem
    for kind, k in (("sjlt", 16), ("gaussian", 16), ("orthogonal", 16), ("kronecker", 24)):
        pr = Projector(model, loss, kind, k, seed=5)
        g = pr.functions.per_sample_grads(pr.theta, pr.batch(train))
        dense = (g @ pr.columns(0, pr.dim)).numpy()
        got = pr.project(train)
        np.testing.assert_allclose(got, dense, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(pr.project_flat(g).numpy(), dense, rtol=1e-10, atol=1e-12)
        # same seed, same projection in a fresh object (as on another worker); another seed differs
        np.testing.assert_array_equal(Projector(model, loss, kind, k, seed=5).project(train), got)
        assert not np.allclose(Projector(model, loss, kind, k, seed=6).project(train), got)


def test_sparse_projection_preserves_inner_products_on_average():
    """E[<Px, Py>] = <x, y>: averaged over 200 seeds the error is small (a test that can fail)."""
    from dask_influence.core.projection import SparseProjection

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3000, generator=gen, dtype=torch.float64)
    exact = float(x[0] @ x[1])
    estimates = []
    for seed in range(200):
        px = SparseProjection(3000, 256, seed).project(x)
        estimates.append(float(px[0] @ px[1]))
    spread = np.std(estimates)
    assert abs(np.mean(estimates) - exact) < 4 * spread / np.sqrt(200)
    assert spread < 0.15 * float(x.norm(dim=1).prod())  # about sqrt(2/k) of |x||y| for k = 256


def test_top_k_equals_argsort_of_the_index_influences(problem, tmp_path):
    model, loss, train, test = problem
    index = di.GradientIndex.build(
        model, loss, train, tmp_path / "ix.zarr", projection_dim=12, train_block_size=7, client="sync"
    )
    full = index.influences(test)
    top = index.top_k(test, 5)
    np.testing.assert_array_equal(top.helpful_indices, np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(full, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(top.helpful_values, np.take_along_axis(full, top.helpful_indices, 1), rtol=1e-6)


def test_query_store_top_k_merges_in_a_tree_and_resumes_from_stored_chunks(problem, tmp_path):
    """More index blocks than one merge takes (a merge tree), then a resume whose top-k rows
    mix chunks computed again with chunks read back: the same top-k as argsort of the store."""
    model, loss, train, test = problem
    index = di.GradientIndex.build(
        model, loss, train, tmp_path / "ix.zarr", projection_dim=12, train_block_size=1, client="sync"
    )
    assert len(index.attributes["block_sizes"]) > 32  # store_job.FAN_IN
    path = tmp_path / "q.zarr"
    group = index.influences_to_zarr(test, path, top_k=4, test_block_size=3)
    full = group["influences"][:]
    top = {name: group[name][:] for name in ("top_helpful_indices", "top_helpful_values", "top_harmful_indices")}
    np.testing.assert_array_equal(top["top_helpful_indices"], np.argsort(-full, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(top["top_harmful_indices"], np.argsort(full, axis=1, kind="stable")[:, :4])
    writable = zarr.open_group(str(path), mode="r+")
    for i, j in [(0, 3), (0, 40), (1, 0)]:
        writable["influences_done"][i, j] = 0
        writable["influences"][i * 3 : (i + 1) * 3, j] = np.nan
    writable["topk_done"][:] = 0
    attrs = dict(writable.attrs["dask_influence"])
    attrs["complete"] = False
    writable.attrs["dask_influence"] = attrs
    resumed = index.influences_to_zarr(test, path, top_k=4, test_block_size=3, resume=True)
    assert index.last_run_["chunks_computed"] == 3
    np.testing.assert_array_equal(resumed["influences"][:], full)
    for name, values in top.items():
        np.testing.assert_array_equal(resumed[name][:], values)


class _Failing(Dataset):
    """The training pairs; while ``armed``, reading more than ``budget`` rows raises (in one
    process, whatever order the blocks are loaded in)."""

    def __init__(self, x, y, budget):
        self.x, self.y, self.budget, self.armed = x, y, budget, True

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.armed:
            self.budget -= 1
            if self.budget < 0:
                raise RuntimeError("simulated loss of the data source")
        return self.x[i], self.y[i]


def test_interrupted_build_resumes_only_missing_blocks(problem, tmp_path):
    model, loss, (x, y), test = problem
    kw = dict(projection_dim=16, dtype="float32", train_block_size=8, client="sync")
    data = _Failing(x, y, budget=8 + 3 * 8)  # the first block's digest, then 3 blocks; the 4th fails
    with pytest.raises(RuntimeError, match="simulated"):
        di.GradientIndex.build(model, loss, data, tmp_path / "ix.zarr", **kw)
    done = zarr.open_group(str(tmp_path / "ix.zarr"), mode="r")["gradients_done"][:]
    assert 0 < done.sum() < len(done)
    data.armed = False
    resumed = di.GradientIndex.build(model, loss, data, tmp_path / "ix.zarr", **kw)
    assert resumed.last_run_["blocks_written"] == len(done) - int(done.sum())
    clean = di.GradientIndex.build(model, loss, (x, y), tmp_path / "clean.zarr", **kw)
    np.testing.assert_array_equal(resumed.gradients(), clean.gradients())
    np.testing.assert_array_equal(resumed.curvature_matrix(), clean.curvature_matrix())
    np.testing.assert_array_equal(resumed.influences(test), clean.influences(test))
    again = di.GradientIndex.build(model, loss, data, tmp_path / "ix.zarr", **kw)
    assert again.last_run_["blocks_written"] == 0 and again.last_run_["blocks_skipped"] == len(done)
    assert again.last_run_["blocks_repaired"] == 0 and again.last_run_["verify"]["checked"] == len(done) + 1


def test_build_on_two_workers_equals_build_in_one_process(problem, tmp_path, cluster_client):
    model, loss, train, test = problem
    kw = dict(projection_dim=20, projection="kronecker", dtype="float32", train_block_size=9)
    local = di.GradientIndex.build(model, loss, train, tmp_path / "one.zarr", client="sync", **kw)
    dist = di.GradientIndex.build(model, loss, train, tmp_path / "two.zarr", client=cluster_client, **kw)
    np.testing.assert_array_equal(dist.gradients(), local.gradients())
    np.testing.assert_allclose(dist.curvature_matrix(), local.curvature_matrix(), rtol=1e-12)
    np.testing.assert_allclose(dist.influences(test), local.influences(test), rtol=1e-10)
    group = dist.influences_to_zarr(test, tmp_path / "q.zarr", top_k=3, test_block_size=3)
    np.testing.assert_allclose(group["influences"][:], local.influences(test), rtol=1e-6)


def test_queries_refuse_another_model_task_or_projection(problem, tmp_path):
    model, loss, train, test = problem
    di.GradientIndex.build(
        model, loss, train, tmp_path / "ix.zarr", projection_dim=8, train_block_size=16, client="sync"
    )
    changed = trained_classification_problem()[0].double()
    with torch.no_grad():
        next(changed.parameters())[0, 0] += 1e-3
    with pytest.raises(StoreError, match="model_checksum"):
        di.GradientIndex.open(tmp_path / "ix.zarr", changed, loss)
    with pytest.raises(StoreError, match="task_loss"):
        di.GradientIndex.open(tmp_path / "ix.zarr", model, nn.MSELoss())
    with pytest.raises(StoreError, match="projection"):
        di.GradientIndex.build(
            model, loss, train, tmp_path / "ix.zarr", projection_dim=8, seed=1, train_block_size=16, client="sync"
        )
    # the same index opens for the same model and task
    assert di.GradientIndex.open(tmp_path / "ix.zarr", model, loss, client="sync").n_train == len(train[0])


def test_bad_arguments_are_refused(problem, tmp_path):
    model, loss, train, _ = problem
    with pytest.raises(ValueError, match="preconditioner"):
        di.GradientIndex.build(model, loss, train, tmp_path / "a", preconditioner="exact", client="sync")
    with pytest.raises(ValueError, match="projection must be one of"):
        di.GradientIndex.build(model, loss, train, tmp_path / "a", projection="fft", client="sync")
    with pytest.raises(ValueError, match="at most p"):
        di.GradientIndex.build(model, loss, train, tmp_path / "a", projection="orthogonal", client="sync")
    with pytest.raises(StoreError, match="not a gradient index"):
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "file").write_text("x")
        di.GradientIndex.build(model, loss, train, tmp_path / "b", client="sync")
    with pytest.raises(StoreError, match="No gradient index"):
        di.GradientIndex.open(tmp_path / "missing", model, loss)


def test_index_scores_answer_evaluations_without_the_full_matrix(problem, tmp_path):
    """``index.scores(test)`` (subset sums from the factors and one read of the index) gives what the
    matrix of ``index.influences(test)`` gives, also through ``di.evaluate``'s LDS."""
    from dask_influence.evaluate.lds import lds_from

    model, loss, train, test = problem
    index = di.GradientIndex.build(
        model, loss, train, tmp_path / "ix.zarr", projection_dim=12, train_block_size=7, client="sync"
    )
    full = index.influences(test)
    scores = index.scores(test)
    assert (scores.n_test, scores.n_train) == full.shape
    rng = np.random.default_rng(0)
    masks = rng.random((9, full.shape[1])) < 0.5
    np.testing.assert_allclose(scores.subset_sums(masks), full @ masks.T, rtol=1e-10)
    np.testing.assert_allclose(scores.columns(np.array([3, 0, 40])), full[:, [3, 0, 40]], rtol=1e-10)
    np.testing.assert_allclose(scores.mean_influence(), full.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(scores.self_influences(), index.self_influences(), rtol=1e-12)
    measurements = rng.normal(size=(9, full.shape[0]))
    a, b = lds_from(scores, masks, measurements), lds_from(full, masks, measurements)
    np.testing.assert_allclose(a["per_test"], b["per_test"], rtol=1e-10)


@pytest.mark.parametrize("kind", ["sjlt", "kronecker"])
def test_projected_ggn_from_output_roots_equals_ggn_products(problem, kind):
    """The GGN preconditioner from the c output-curvature roots (c backward passes) equals
    ``P G P^T`` from k Gauss-Newton-vector products."""
    from dask_influence.core.gradients import second_order

    model, loss, train, _ = problem
    pr = Projector(model, loss, kind, 24, seed=3)
    batch = pr.batch(train)
    with second_order():
        gv = pr.functions.ggn_matmat(pr.theta, batch, pr.columns(0, pr.dim))  # (p, k)
    expected = pr.project_flat(gv.T).numpy()
    got = pr.curvature(train, "ggn")  # 3 classes <= k: the roots path
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


class _Pause(nn.Module):
    """Holds the first forward open until ``release`` is set (events shared through the class,
    which pickles by reference)."""

    inside, release = threading.Event(), threading.Event()

    def forward(self, x):
        if not type(self).inside.is_set():
            type(self).inside.set()
            type(self).release.wait(30)
        return x


def test_projector_pickles_while_another_thread_is_inside_a_forward():
    """A Dask worker sends its projector to a peer from its event-loop thread while its task
    thread computes a block (the model's parameters swapped for functorch wrappers): the pickle
    waits for the forward to end and carries the model's own parameters (it used to fail, and a
    2-worker job hung)."""
    import pickle

    inside, release = _Pause.inside, _Pause.release
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), _Pause()).eval()
    projector = Projector(model, nn.CrossEntropyLoss(), "sjlt", 8, 0)
    x, y = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32), np.array([0, 1, 2, 0, 1])
    results: dict = {}
    task = threading.Thread(target=lambda: results.setdefault("task", projector.project((x, y))))
    task.start()
    assert inside.wait(30)
    sender = threading.Thread(target=lambda: results.setdefault("bytes", pickle.dumps(projector)))
    sender.start()
    sender.join(0.5)
    assert sender.is_alive()  # waits for the forward: no snapshot of swapped parameters
    release.set()
    task.join(30)
    sender.join(30)
    copy = pickle.loads(results["bytes"])
    np.testing.assert_array_equal(copy.project((x, y)), results["task"])
