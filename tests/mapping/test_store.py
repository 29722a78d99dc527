"""The zarr output: layout, attributes, resume, refusals, top-k, self-influences."""

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence.mapping import store as zstore


def loaders(problem, test_block=7, train_block=10):
    solver, train, test = problem
    return (
        DataLoader(TensorDataset(*test), batch_size=test_block),
        DataLoader(TensorDataset(*train), batch_size=train_block),
    )


def test_store_layout_and_attributes(problem, tmp_path):
    solver, train, test = problem
    t, r = loaders(problem)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    group = calc.influences_to_zarr(t, r, tmp_path / "out.zarr", top_k=4, self_influences=True)
    expected = solver.influences(*test, *train).numpy()
    arr = group["influences"]
    assert arr.shape == (17, 53) and arr.chunks == (7, 10) and arr.dtype == np.float64
    np.testing.assert_allclose(arr[...], expected, rtol=1e-10, atol=1e-12)
    attrs = group.attrs["dask_influence"]
    assert attrs["complete"] is True
    assert attrs["config"]["method"] == "DirectInfluence"
    assert attrs["config"]["regularization"] == 0.05
    assert attrs["config"]["mode"] == "up"
    assert "positive means" in attrs["sign_convention"]
    assert {"torch", "dask", "zarr", "dask_influence"} <= set(attrs["versions"])
    assert zstore.completion(group) == {"influences": (18, 18), "self_influences": (6, 6), "top_k": (3, 3)}
    np.testing.assert_allclose(group["self_influences"][...], solver.self_influences(*train).numpy(), rtol=1e-10)


def calculator(solver, scheduler):
    """The calculator that runs where the ``scheduler`` fixture says: in process, or on the cluster."""
    if scheduler == "sync":
        return di.SequentialInfluenceCalculator(solver, progress=False)
    return di.DaskInfluenceCalculator(solver, scheduler, progress=False)


def test_top_k_equals_argsort(problem, tmp_path, scheduler):
    solver, train, test = problem
    t, r = loaders(problem, 5, 8)
    calc = calculator(solver, scheduler)
    group = calc.influences_to_zarr(t, r, str(tmp_path / "top.zarr"), top_k=6)
    full = solver.influences(*test, *train).numpy()
    order = np.argsort(full, axis=1, kind="stable")
    np.testing.assert_array_equal(group["top_harmful_indices"][...], order[:, :6])
    np.testing.assert_array_equal(group["top_helpful_indices"][...], order[:, ::-1][:, :6])
    np.testing.assert_allclose(group["top_harmful_values"][...], np.take_along_axis(full, order[:, :6], 1), rtol=1e-10)
    assert np.all(np.diff(group["top_helpful_values"][...], axis=1) <= 0)


def test_resume_computes_only_missing_chunks(problem, tmp_path, scheduler):
    solver, train, test = problem
    t, r = loaders(problem)
    path = tmp_path / "resume.zarr"
    calc = calculator(solver, scheduler)
    clean = calc.influences_to_zarr(t, r, path, top_k=3)["influences"][...]
    # lose three chunks: clear their done flags and delete their data
    group = zarr.open_group(str(path), mode="r+")
    for i, j in [(0, 0), (1, 4), (2, 5)]:
        group["influences_done"][i, j] = 0
        group["influences"][i * 7 : (i + 1) * 7, j * 10 : (j + 1) * 10] = np.nan
    group["topk_done"][1] = 0
    attrs = dict(group.attrs["dask_influence"])
    attrs["complete"] = False
    group.attrs["dask_influence"] = attrs
    assert not zstore.is_complete(group)
    resumed = calc.influences_to_zarr(t, r, path, top_k=3, resume=True)
    assert calc.last_run_["chunks_computed"] == 3 and calc.last_run_["chunks_skipped"] == 15
    np.testing.assert_array_equal(resumed["influences"][...], clean)
    assert zstore.is_complete(resumed)
    # a complete store resumes with nothing to do
    calc.influences_to_zarr(t, r, path, top_k=3, resume=True)
    assert calc.last_run_["chunks_computed"] == 0


def test_existing_store_refused_without_resume_or_overwrite(problem, tmp_path):
    solver, _, _ = problem
    t, r = loaders(problem)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    path = tmp_path / "o.zarr"
    calc.influences_to_zarr(t, r, path)
    with pytest.raises(di.StoreError, match="resume=True.*overwrite=True"):
        calc.influences_to_zarr(t, r, path)
    group = calc.influences_to_zarr(t, r, path, overwrite=True)
    assert zstore.is_complete(group)


def test_store_of_other_configuration_refused(problem, tmp_path):
    solver, train, _ = problem
    t, r = loaders(problem)
    path = tmp_path / "o.zarr"
    di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(t, r, path)
    other = di.DirectInfluence(solver.model, solver.loss, regularization=0.5).fit(train)
    with pytest.raises(di.StoreError, match="different configuration.*regularization"):
        di.SequentialInfluenceCalculator(other, progress=False).influences_to_zarr(t, r, path, resume=True)
    _, r2 = loaders(problem, train_block=11)
    with pytest.raises(di.StoreError, match="different configuration"):
        di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(t, r2, path, resume=True)


def test_bad_output_paths(problem, tmp_path):
    solver, _, _ = problem
    t, r = loaders(problem)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    a_file = tmp_path / "file.zarr"
    a_file.write_text("not a store")
    with pytest.raises(di.StoreError, match="is a file"):
        calc.influences_to_zarr(t, r, a_file)
    other = tmp_path / "somedir"
    other.mkdir()
    (other / "precious.txt").write_text("user data")
    with pytest.raises(di.StoreError, match="not a dask-influence zarr store"):
        calc.influences_to_zarr(t, r, other, overwrite=True)
    assert (other / "precious.txt").exists()
    with pytest.raises(ValueError, match="not both"):
        calc.influences_to_zarr(t, r, tmp_path / "x.zarr", resume=True, overwrite=True)
    with pytest.raises(ValueError, match="top_k"):
        calc.influences_to_zarr(t, r, tmp_path / "y.zarr", mode="perturbation", top_k=3)


def test_perturbation_mode_store(problem, tmp_path):
    solver, train, test = problem
    t, r = loaders(problem)
    group = di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(
        t, r, tmp_path / "p.zarr", mode="perturbation"
    )
    expected = solver.influences(*test, *train, mode="perturbation").numpy()
    assert group["influences"].shape == (17, 53, 4) and group["influences"].chunks == (7, 10, 4)
    np.testing.assert_allclose(group["influences"][...], expected, rtol=1e-9, atol=1e-12)
