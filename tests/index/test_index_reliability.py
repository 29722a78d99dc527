"""The gradient index held to the influence store's standard (issue 31, items 1-5): it verifies
what it reads (a missing or damaged chunk is named: index, array, chunk, block, the repair),
a resumed build repairs exactly the damaged blocks, ``inspect`` tells the truth, it records
what it was computed from and refuses mismatching queries in one line, and a build tries one
batch before it deletes anything. All in this process (``client="sync"``)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

import dask_influence as di
from cases import trained_classification_problem
from dask_influence.cli.main import cli
from dask_influence.errors import StoreError
from dask_influence.index import Projector

KW = dict(projection_dim=8, train_block_size=10, client="sync")  # 47 points: blocks of 10, 10, 10, 10, 7
MISSING = r"chunk 2 of its array 'gradients' \(block 2, training points 20 to 29\) is missing"
UNDECODABLE = r"chunk 3 of its array 'gradients' \(block 3, training points 30 to 39\) does not decode"


@pytest.fixture(scope="module")
def problem():
    """The 4-5-3 tanh MLP near a minimum, float64: ``model, loss, (x, y), (xt, yt)`` as numpy."""
    model, loss, (x, y), (xt, yt) = trained_classification_problem()
    return model.double(), loss, (x.double().numpy(), y.numpy()), (xt.double().numpy(), yt.numpy())


@pytest.fixture(scope="module")
def clean(problem, tmp_path_factory):
    """A complete index of the problem and its influences on the test points."""
    model, loss, train, test = problem
    path = tmp_path_factory.mktemp("clean") / "ix.zarr"
    index = di.GradientIndex.build(model, loss, train, path, **KW)
    return path, index.influences(test)


def _copy(clean, tmp_path):
    path = tmp_path / "ix.zarr"
    shutil.copytree(clean[0], path)
    return path


def _flip_byte(path):
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(path, "wb").write(bytes(raw))


def _inspect(path, *extra):
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_deleted_chunk_is_named_by_every_read_and_a_resume_recomputes_exactly_it(problem, clean, tmp_path):
    """Item 1: a query returned NaN for the 10 points of the block, ``inspect`` said complete and a
    resumed build wrote nothing (the block's flag was set)."""
    model, loss, train, test = problem
    path = _copy(clean, tmp_path)
    os.remove(path / "gradients" / "c" / "2" / "0")
    index = di.GradientIndex(path, Projector(model, loss, "sjlt", 8), client="sync")
    for query in (
        lambda: index.influences(test),
        lambda: index.top_k(test, 3),
        lambda: index.self_influences(),
        lambda: index.influences_to_zarr(test, tmp_path / "q.zarr"),
        lambda: index.scores(test).mean_influence(),
        lambda: index.scores(test).columns(np.array([25])),
        lambda: index.gradients(),
    ):
        with pytest.raises(StoreError, match=MISSING) as err:
            query()
        assert str(path) in str(err.value) and "dask-influence index JOB.toml --verify" in str(err.value)
    with pytest.raises(StoreError, match=r"block\(s\) 2 of its array 'gradients' are missing \(chunk files deleted\)"):
        di.GradientIndex.open(path, model, loss)
    shown = _inspect(path)
    assert shown["complete"] is False and shown["blocks_done"] == 4 and "block(s) 2" in shown["damaged"]

    resumed = di.GradientIndex.build(model, loss, train, path, verify="exists", **KW)
    assert resumed.last_run_["blocks_written"] == 1 and resumed.last_run_["blocks_repaired"] == 1
    assert resumed.last_run_["verify"]["damaged"] == {"gradients": [2]}
    np.testing.assert_array_equal(resumed.influences(test), clean[1])  # bit for bit
    assert _inspect(path, "--verify")["complete"] is True


def test_flipped_byte_is_named_and_a_verifying_resume_repairs_it(problem, clean, tmp_path):
    """Item 2: zarr's bare ``Stored and computed checksum do not match`` named neither the index nor
    the chunk, and a resumed build wrote nothing."""
    model, loss, train, test = problem
    path = _copy(clean, tmp_path)
    _flip_byte(path / "gradients" / "c" / "3" / "0")
    index = di.GradientIndex.open(path, model, loss, client="sync")  # the files are all there
    with pytest.raises(StoreError, match=UNDECODABLE + r" \(ValueError: Stored and computed checksum"):
        index.influences(test)
    assert _inspect(path)["complete"] is True  # listing only: a flipped byte needs --verify
    verified = _inspect(path, "--verify")
    assert verified["complete"] is False and verified["verify"]["damaged"] == {"gradients": [3]}

    listed = di.GradientIndex.build(model, loss, train, path, verify="exists", **KW)
    assert listed.last_run_["blocks_written"] == 0  # "exists" lists files: it cannot see a flipped byte
    resumed = di.GradientIndex.build(model, loss, train, path, **KW)  # verify=True, the default
    assert resumed.last_run_["blocks_written"] == 1 and resumed.last_run_["verify"]["damaged"] == {"gradients": [3]}
    np.testing.assert_array_equal(resumed.influences(test), clean[1])


def test_damaged_flag_and_damaged_curvature_are_recomputed(problem, clean, tmp_path):
    """A done flag that does not decode counts as not written; a damaged curvature is named when
    read and recomputed by a resume."""
    model, loss, train, test = problem
    path = _copy(clean, tmp_path)
    _flip_byte(path / "gradients_done" / "c" / "1")
    _flip_byte(path / "curvature" / "c" / "0" / "0")
    index = di.GradientIndex(path, Projector(model, loss, "sjlt", 8), client="sync")
    with pytest.raises(StoreError, match=r"chunk 0 of its array 'curvature' does not decode"):
        index.curvature_matrix()
    shown = _inspect(path, "--verify")
    assert shown["complete"] is False and "done flag(s) of block(s) 1" in shown["damaged"]
    assert "'curvature' is missing or does not decode" in shown["damaged"]
    resumed = di.GradientIndex.build(model, loss, train, path, **KW)
    assert resumed.last_run_["blocks_written"] == 1 and resumed.last_run_["blocks_repaired"] == 1
    np.testing.assert_array_equal(resumed.influences(test), clean[1])


def test_preconditioner_none_is_the_plain_inner_product(problem, tmp_path):
    """Item 3: ``regularization="auto"`` gave 0.01 and divided every score by 1.01."""
    model, loss, train, test = problem
    path = tmp_path / "ix.zarr"
    index = di.GradientIndex.build(model, loss, train, path, preconditioner="none", dtype="float64", **KW)
    assert index.regularization == 0.0
    projector = Projector(model, loss, "sjlt", 8)
    expected = projector.project(test, measurement=True) @ projector.project(train).T
    np.testing.assert_allclose(index.influences(test), expected, rtol=1e-12, atol=1e-15)
    # an index built before the rule (regularization 0.01 stored for "auto") reads as 0 too
    group = zarr.open_group(str(tmp_path / "ix.zarr"), mode="r+")
    group.attrs["dask_influence_index"] = {**group.attrs["dask_influence_index"], "regularization": 0.01}
    old = di.GradientIndex.open(tmp_path / "ix.zarr", model, loss, client="sync")
    assert _inspect(path)["regularization"] == 0.0
    np.testing.assert_allclose(old.influences(test), expected, rtol=1e-12, atol=1e-15)
    # an explicit lambda is still applied: the identity plus lambda
    np.testing.assert_allclose(old.influences(test, regularization=1.0), expected / 2, rtol=1e-12, atol=1e-15)


def test_test_batches_of_another_feature_shape_or_dtype_are_refused_in_one_line(problem, clean, tmp_path):
    """Item 4: torch's ``mat1 and mat2 shapes cannot be multiplied`` / ``expected m1 and m2 to
    have the same dtype`` came from inside ``nn.Linear``."""
    model, loss, train, (xt, yt) = problem
    index = di.GradientIndex.open(clean[0], model, loss, client="sync")
    assert index.attributes["inputs"] == {
        "leaves": {"[0]": {"shape": [4], "dtype": "float64"}, "[1]": {"shape": [], "dtype": "int64"}},
        "input": "[0]",
    }
    six = np.zeros((3, 6))
    with pytest.raises(
        ValueError,
        match=r"^x_test has feature shape \(6,\) but the index was built on inputs of feature shape \(4,\); "
        r"pass inputs shaped \(n, 4\)\.$",
    ):
        index.influences((six, yt[:3]))
    with pytest.raises(
        TypeError,
        match=r"^x_test has integer dtype int64, but the index was built on floating point inputs \(float64\); "
        r"pass them as float64 \(e\.g\. \.astype\('float64'\)\)\.$",
    ):
        index.top_k((xt.astype(np.int64), yt), 2)
    with pytest.raises(ValueError, match=r"feature shape \(6,\)"):  # the store path too, before anything is written
        index.influences_to_zarr((six, yt[:3]), tmp_path / "q.zarr")
    assert not (tmp_path / "q.zarr").exists()


def test_dict_batches_are_checked_leaf_by_leaf(problem, tmp_path):
    """With a Task of dict batches, a recorded leaf that turns from integer to floating point (or
    back) is refused, naming the leaf; the input (``perturb``) is held to its feature shape."""
    model, _, (x, y), (xt, yt) = problem
    task = di.Task(
        loss=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["label"]),
        outputs=lambda m, b: m(b["x"]),
        output_loss=lambda out, b: nn.functional.cross_entropy(out, b["label"]),
        output_curvature="classification",
        perturb="x",
    )
    index = di.GradientIndex.build(model, task, {"x": x, "label": y}, tmp_path / "ix.zarr", **KW)
    index.influences({"x": xt, "label": yt})  # accepted
    with pytest.raises(TypeError, match=r"^the input 'label' of the test batch has floating point dtype float64"):
        index.influences({"x": xt, "label": yt.astype(np.float64)})
    with pytest.raises(ValueError, match=r"^the input 'x' of the test batch has feature shape \(3,\)"):
        index.influences({"x": xt[:, :3], "label": yt})


def test_an_index_built_before_inputs_were_recorded_is_queried_and_resumed(problem, clean, tmp_path):
    model, loss, train, test = problem
    path = _copy(clean, tmp_path)
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs["dask_influence_index"])
    del attrs["inputs"]
    group.attrs["dask_influence_index"] = attrs
    np.testing.assert_array_equal(di.GradientIndex.open(path, model, loss, client="sync").influences(test), clean[1])
    resumed = di.GradientIndex.build(model, loss, train, path, **KW)  # not "another configuration": recorded now
    assert resumed.last_run_["blocks_written"] == 0 and "inputs" in resumed.attributes


def test_overwrite_with_data_the_model_cannot_take_leaves_the_index_as_it_was(problem, clean, tmp_path):
    """Item 5: ``overwrite=True`` with training data of the wrong shape deleted a good index and
    left an incomplete one."""
    model, loss, (x, y), test = problem
    path = _copy(clean, tmp_path)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError,
        match=r"^The model and loss could not be evaluated on the first training batch \(x \(n, 6\) float64, "
        r"y \(n,\) int64\): RuntimeError: mat1 and mat2 shapes cannot be multiplied .*Nothing was written; "
        r"the index path '.*ix\.zarr' is left as it was\.$",
    ):
        di.GradientIndex.build(model, loss, (np.zeros((47, 6)), y), path, overwrite=True, **KW)
    with pytest.raises(ValueError, match=r"x \(n, 4\) int64.*same dtype.*Nothing was written"):
        di.GradientIndex.build(model, loss, (x.astype(np.int64), y), path, overwrite=True, **KW)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "ix.zarr.lock").exists()
    np.testing.assert_array_equal(di.GradientIndex.open(path, model, loss, client="sync").influences(test), clean[1])


def test_uneven_dask_chunks_are_indexed_one_block_per_chunk(problem, tmp_path):
    """Dask arrays with uneven chunks (5, 20, 22) are indexed in even blocks (the chunk size of the
    index), so that no two blocks share a chunk and every block's chunk is verified as a whole."""
    import dask.array as da

    model, loss, (x, y), test = problem
    chunks = ((5, 20, 22),)
    dx, dy = da.from_array(x, chunks=chunks + ((4,),)), da.from_array(y, chunks=chunks)
    index = di.GradientIndex.build(model, loss, (dx, dy), tmp_path / "ix.zarr", projection_dim=8, client="sync")
    assert index.attributes["block_sizes"] == [22, 22, 3]
    reference = di.GradientIndex.build(model, loss, (x, y), tmp_path / "ref.zarr", projection_dim=8, client="sync",
                                       train_block_size=22)  # fmt: skip
    np.testing.assert_array_equal(index.gradients(), reference.gradients())


def test_looped_projected_vjps_equal_the_vmapped_ones(problem):
    """Item 6's fallback (one sample at a time, for models vmap cannot batch) gives the vmapped numbers."""
    model, loss, train, _ = problem
    projector = Projector(model, loss, "sjlt", 12, seed=2)
    vmapped = projector.curvature(train, "ggn")
    projector.functions._vmap_samples = False
    np.testing.assert_allclose(projector.curvature(train, "ggn"), vmapped, rtol=1e-12, atol=1e-15)
    assert torch.is_tensor(projector.theta)


def test_a_resumed_query_store_repairs_its_damaged_chunks(problem, clean, tmp_path):
    """The stores a query writes are verified on resume like the solvers' stores: a deleted and a
    damaged influence chunk are recomputed (exactly those two), the result equals the clean run."""
    model, loss, _, test = problem
    index = di.GradientIndex.open(clean[0], model, loss, client="sync")
    path = tmp_path / "q.zarr"
    first = index.influences_to_zarr(test, path, top_k=3, test_block_size=3)["influences"][:]
    os.remove(path / "influences" / "c" / "0" / "1")
    _flip_byte(path / "influences" / "c" / "1" / "4")
    listed = index.influences_to_zarr(test, path, top_k=3, test_block_size=3, resume=True, verify="exists")
    assert index.last_run_["chunks_computed"] == 1 and index.last_run_["chunks_repaired"] == 1
    assert listed.attrs["dask_influence"]["complete"]
    resumed = index.influences_to_zarr(test, path, top_k=3, test_block_size=3, resume=True)  # verify=True
    assert index.last_run_["chunks_computed"] == 1 and index.last_run_["verify"]["damaged"] == {"influences": [[1, 4]]}
    np.testing.assert_array_equal(resumed["influences"][:], first)
    np.testing.assert_allclose(first, clean[1], rtol=0, atol=1e-12 * np.abs(clean[1]).max())  # other test blocks
