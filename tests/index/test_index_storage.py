"""The index's storage and queries (issue 28 items 2-3): float16 gradients and a float32 curvature
by default (attributes say the dtypes; older float32/float64 indexes stay readable), a float32
query path for float32 models, the Cholesky factor reused across queries, and the effective
dimension ``tr(C (C + lambda I)^-1)`` recorded, shown by ``inspect`` and warned about when ``k``
is below it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

import dask_influence as di
from cases import classification_data
from dask_influence.cli.main import cli

pytestmark = [pytest.mark.slow]


def _mlp(n: int = 600, n_test: int = 40, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A 12-24-24-10 tanh MLP (1,162 parameters) trained briefly on a noisy linear teacher."""
    x, y = classification_data(n + n_test, 12, 10, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    model = model.to(dtype).eval()
    x = x.to(dtype)
    return model, nn.CrossEntropyLoss(), (x[:n].numpy(), y[:n].numpy()), (x[n:].numpy(), y[n:].numpy())


@pytest.fixture(scope="module")
def float32_problem():
    return _mlp(dtype=torch.float32)


@pytest.fixture(scope="module")
def float64_problem():
    return _mlp()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_default_storage_is_float16_gradients_and_a_float32_curvature(float32_problem, tmp_path):
    model, loss, train, test = float32_problem
    kw = dict(projection_dim=256, train_block_size=200, client="sync")
    small = _quiet(di.GradientIndex.build, model, loss, train, tmp_path / "a.zarr", **kw)
    wide = _quiet(di.GradientIndex.build, model, loss, train, tmp_path / "b.zarr", dtype="float32", **kw)
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert (small.attributes["dtype"], small.attributes["curvature_dtype"]) == ("float16", "float32")
    assert (group["gradients"].dtype, group["curvature"].dtype) == (np.float16, np.float32)
    np.testing.assert_array_equal(small.curvature_matrix(), wide.curvature_matrix())  # both stored float32
    a, b = small.influences(test), wide.influences(test)
    assert a.dtype == np.float32 and b.dtype == np.float32  # scored in float32 for a float32 model
    assert 1 - np.corrcoef(a.ravel(), b.ravel())[0, 1] < 1e-6  # measured 4e-8 (k = 256)
    assert np.abs(a - b).max() < 2e-3 * np.abs(b).max()  # float16's 2^-11, measured 3e-4
    # a float64 model keeps float32 gradients (and a float32 curvature) by default
    m64, _, train64, _ = _mlp()
    ix64 = _quiet(di.GradientIndex.build, m64, loss, train64, tmp_path / "c.zarr", **kw)
    assert (ix64.attributes["dtype"], ix64.attributes["curvature_dtype"]) == ("float32", "float32")


def test_queries_in_float32_equal_float64_math_and_reuse_the_cholesky_factor(float32_problem, tmp_path):
    model, loss, train, test = float32_problem
    index = _quiet(
        di.GradientIndex.build, model, loss, train, tmp_path / "a.zarr", projection_dim=128, train_block_size=200,
        client="sync",
    )  # fmt: skip
    got = index.influences(test)
    factors = index.influence_factors(test)  # float64 (the public factors stay float64)
    assert factors.dtype == np.float64
    expected = factors @ index.gradients().astype(np.float64).T
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert list(index._factors) == [index.regularization]  # factored once, kept for the next query
    kept = index._factors[index.regularization]
    index.top_k(test, 3)
    assert index._factors[index.regularization] is kept
    index.influences(test, regularization=2 * index.regularization)
    assert list(index._factors) == [2 * index.regularization]  # one factor kept at a time


def test_the_build_stores_the_cholesky_factor_that_queries_at_its_lambda_use(float32_problem, tmp_path, monkeypatch):
    """The build stores ``L`` of ``C + lambda I`` (float32, lower triangle) instead of ``C``: a query at
    the index's ``lambda`` reads it and factors nothing; ``C`` and queries at another ``lambda`` are
    rebuilt from it and agree with float64 math on the float64 sum of ``C``."""
    import dask_influence.index.build as gi

    model, loss, train, test = float32_problem
    sums: list[np.ndarray] = []
    original = gi._curvature
    monkeypatch.setattr(gi, "_curvature", lambda *a, **k: sums.append(original(*a, **k)) or sums[-1])
    index = _quiet(
        di.GradientIndex.build, model, loss, train, tmp_path / "a.zarr", projection_dim=128, train_block_size=200,
        client="sync",
    )  # fmt: skip
    (c64,) = sums
    lam = index.regularization
    stored = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["curvature"][:]
    assert stored.dtype == np.float32 and index.attributes["curvature_form"] == "cholesky"
    assert index.attributes["curvature_factor_lambda"] == lam
    assert not np.triu(stored, 1).any()  # lower-triangular
    exact = np.linalg.cholesky(c64 + lam * np.eye(len(c64)))
    np.testing.assert_allclose(stored, exact, rtol=0, atol=1e-6 * np.abs(exact).max())  # float32 rounding
    np.testing.assert_allclose(index.curvature_matrix(), c64, rtol=0, atol=1e-6 * np.abs(c64).max())

    phi = torch.from_numpy(index.gradients().astype(np.float64))
    fresh = di.GradientIndex.open(tmp_path / "a.zarr", model, loss, client="sync")

    def refused(*args, **kwargs):
        raise AssertionError("a query at the build's lambda factored the curvature")

    monkeypatch.setattr(torch.linalg, "cholesky_ex", refused)
    got = torch.from_numpy(fresh.influence_factors(test))
    monkeypatch.undo()
    ref = torch.from_numpy(np.linalg.solve(c64 + lam * np.eye(len(c64)), _test_phi(fresh, test).T).T)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-5 * ref.abs().max().item())
    other = fresh.influences(test, regularization=3 * lam)  # refactored from C = L L^T - lambda I
    want = np.linalg.solve(c64 + 3 * lam * np.eye(len(c64)), _test_phi(fresh, test).T).T @ phi.numpy().T
    np.testing.assert_allclose(other, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _test_phi(index, test) -> np.ndarray:
    """The projected test measurements ``(n_test, k)`` float64 (``influence_factors`` at ``lambda -> inf``
    times ``lambda``, computed directly from the projector)."""
    x, y = test
    return index.projector.project((x, y), measurement=True).astype(np.float64)


def test_an_index_written_before_float32_curvature_and_auto_dtype_stays_readable(float32_problem, tmp_path):
    """An older index: float32 gradients (the old default), a float64 curvature, no curvature_dtype,
    ggn_estimate or effective dimension attributes. It opens, scores as before, and a resume with
    the default arguments (dtype='auto', ggn_draws='auto') completes it as it was built."""
    model, loss, train, test = float32_problem
    path = tmp_path / "old.zarr"
    kw = dict(projection_dim=64, train_block_size=200, client="sync")
    # the exact GGN, as such indexes were built
    index = _quiet(di.GradientIndex.build, model, loss, train, path, dtype="float32", ggn_draws=0, **kw)
    before = index.influences(test)
    c = index.curvature_matrix()  # such an index stored C, not its Cholesky factor
    group = zarr.open_group(str(path), mode="r+")
    del group["curvature"]
    group.create_array("curvature", shape=c.shape, chunks=c.shape, dtype="float64")
    group["curvature"][:] = c
    attrs = dict(group.attrs["dask_influence_index"])
    for key in ("curvature_dtype", "ggn_estimate", "effective_dimension", "effective_dimension_projected"):
        attrs.pop(key)
    for key in ("curvature_form", "curvature_factor_lambda"):
        attrs.pop(key)
    group["gradients_done"][1] = 0  # an interrupted build
    attrs["complete"] = False
    group.attrs["dask_influence_index"] = attrs
    resumed = _quiet(di.GradientIndex.build, model, loss, train, path, **kw)
    assert resumed.last_run_["blocks_written"] == 1
    assert (resumed.attributes["dtype"], resumed.attributes["ggn_estimate"]) == ("float32", "exact")
    np.testing.assert_allclose(resumed.influences(test), before, rtol=1e-5, atol=1e-6 * np.abs(before).max())
    opened = di.GradientIndex.open(path, model, loss, client="sync")
    np.testing.assert_allclose(opened.influences(test), before, rtol=1e-5, atol=1e-6 * np.abs(before).max())


def test_float16_index_refuses_gradients_beyond_its_range(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = np.full((6, 3), 1e3, np.float32)  # squared error gradients of about 1e6
    y = np.zeros((6, 1), np.float32)
    with pytest.raises(
        ValueError,
        match=r"^Training point 0 \(block 0\) has a projected gradient entry of 3.404e\+05, beyond float16's range "
        r"\(65504\); build the index with dtype='float32'\.$",
    ):
        di.GradientIndex.build(model, nn.MSELoss(), (x, y), tmp_path / "a.zarr", projection_dim=4, client="sync")
    assert (
        _quiet(
            di.GradientIndex.build, model, nn.MSELoss(), (x, y), tmp_path / "b.zarr", projection_dim=4,
            dtype="float32", client="sync",
        ).attributes["dtype"]
        == "float32"
    )  # fmt: skip


def test_effective_dimension_is_recorded_shown_and_warned_about(float64_problem, tmp_path):
    """``d_k = tr(C (C + lambda I)^-1)`` equals the eigenvalue sum; its estimate of the full
    curvature's effective dimension (exact: 313.9 at lambda = 0.01 x the largest eigenvalue)
    approaches it from above as k grows (measured 647 at k = 256); k = 256 is warned
    about, naming projection_dim=1024, k = 512 is not."""
    model, loss, train, _ = float64_problem
    p = 1162
    full = di.GradientIndex.build(
        model,
        loss,
        train,
        tmp_path / "full.zarr",
        projection="orthogonal",
        projection_dim=p,
        dtype="float64",
        regularization=1.0,
        train_block_size=200,
        client="sync",
        ggn_draws=0,
    )  # fmt: skip  (ggn_draws=0: the exact GGN, whose effective dimension the figures below are of)
    e = np.clip(np.linalg.eigvalsh(full.curvature_matrix()), 0, None)
    lam = 0.01 * e[-1]
    exact = float((e / (e + lam)).sum())
    assert 305 < exact < 320  # 313.9
    kw = dict(regularization=lam, train_block_size=200, client="sync", ggn_draws=0)
    with pytest.warns(UserWarning, match=r"^projection_dim=256 is too small for regularization=") as caught:
        small = di.GradientIndex.build(model, loss, train, tmp_path / "k256.zarr", projection_dim=256, **kw)
    message = str(next(w.message for w in caught if "too small" in str(w.message)))
    assert "Build with projection_dim=1024 (or a larger regularization)." in message
    assert "the estimated effective dimension of the curvature is 647 " in message
    c = small.curvature_matrix()
    ec = np.clip(np.linalg.eigvalsh(c), 0, None)
    assert small.attributes["effective_dimension_projected"] == pytest.approx(float((ec / (ec + lam)).sum()), rel=1e-8)
    assert exact < small.attributes["effective_dimension"] < 2.5 * exact
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # k = 512 is enough: no warning
        large = di.GradientIndex.build(model, loss, train, tmp_path / "k512.zarr", projection_dim=512, **kw)
    assert exact < large.attributes["effective_dimension"] < small.attributes["effective_dimension"]
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "k256.zarr")])
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.output.splitlines() if "eff. dim." in line)
    assert "of k = 256 (tr(C (C + lambda I)^-1)); full curvature ~647" in line
    assert line.endswith(": k too small, build with projection_dim=1024")
    assert "exact GGN, stored float32" in shown.output
    as_json = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path / "k512.zarr"), "--json"]).output)
    assert as_json["effective_dimension"] == pytest.approx(large.attributes["effective_dimension"])
    assert "k is enough" in CliRunner().invoke(cli, ["inspect", str(tmp_path / "k512.zarr")]).output
