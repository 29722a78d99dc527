"""A damaged store is detected by resume and repaired; a store of another job is refused.

Damage is injected into the chunk files of a complete store: deleted, truncated, one byte
flipped, a done flag's own chunk truncated. ``resume`` (``verify=True``, the default) reads
every done flag and chunk once, finds them, clears their flags and recomputes exactly them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.mapping import store as zstore
from dask_influence.mapping.store import ATTR

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST, TEST_BLOCK, TRAIN_BLOCK = 40, 12, 4, 10  # 3 x 4 chunks


def make(seed=0, n_train=N_TRAIN, n_test=N_TEST, n_features=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, n_features, generator=g, dtype=torch.float64)
    y = torch.randn(n_train, 1, generator=g, dtype=torch.float64)
    xt = torch.randn(n_test, n_features, generator=g, dtype=torch.float64)
    yt = torch.randn(n_test, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(n_features, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double().eval()
    return model, torch.nn.MSELoss(), (x, y), (xt, yt)


@pytest.fixture(scope="module")
def job():
    model, loss, train, test = make()
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)
    return (
        solver,
        DataLoader(TensorDataset(*test), batch_size=TEST_BLOCK),
        DataLoader(TensorDataset(*train), batch_size=TRAIN_BLOCK),
    )


def run(job, path, **kw):
    solver, test, train = job
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    group = calc.influences_to_zarr(test, train, path, top_k=3, self_influences=True, **kw)
    return calc, group


def arrays(path):
    group = zarr.open_group(str(path), mode="r")
    return {
        name: group[name][...]
        for name in sorted(group.array_keys())
        if not name.endswith("_done") and name != "solver_info"
    }


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_chunks_are_detected_by_resume_and_recomputed(job, tmp_path):
    _, clean = run(job, tmp_path / "clean.zarr")
    clean = arrays(tmp_path / "clean.zarr")
    path = tmp_path / "store.zarr"
    run(job, path)
    c = path / "influences" / "c"
    (c / "0" / "1").unlink()  # a deleted chunk (its flag still set)
    truncate(c / "1" / "2")  # a truncated chunk
    flip_byte(c / "2" / "3")  # one flipped byte (bit rot)
    truncate(path / "influences_done" / "c" / "2" / "0")  # a done flag that no longer decodes
    (path / "self_influences" / "c" / "3").unlink()  # a deleted self-influence chunk
    truncate(path / "top_helpful_values" / "c" / "1" / "0")  # a truncated top-k chunk

    # before resume: the completion manifest (one read) still counts 12 done; checking it against
    # the files (--verify) finds the 3 damaged chunks and the unreadable flag
    group = zarr.open_group(str(path), mode="r")
    assert zstore.completion(group)["influences"] == (12, 12)
    text = CliRunner().invoke(cli, ["inspect", str(path), "--no-stats", "--verify"])
    assert text.exit_code == 0 and "INCOMPLETE (8/12 chunks done)" in text.output
    assert "Verify: 1 unreadable done flag(s)" in text.output
    # without the manifest the flags are the truth: the unreadable flag counts as not done
    zarr.open_group(str(path), mode="r+")["completion"].attrs["manifest"] = {"damaged": True}
    group = zarr.open_group(str(path), mode="r")
    assert not zstore.is_complete(group) and zstore.completion(group)["influences"] == (11, 12)

    calc, group = run(job, path, resume=True)
    report = calc.last_run_["verify"]
    assert report["damaged"] == {"influences": [[0, 1], [1, 2], [2, 3]], "self_influences": [3], "top_k": [1]}
    assert report["unreadable_flags"] == {"influences": [[2, 0]]}
    assert report["checked"] == 11 + 4 + 3 and report["bytes_read"] > 0
    assert calc.last_run_["chunks_repaired"] == 3
    assert calc.last_run_["chunks_computed"] == 4 and calc.last_run_["chunks_skipped"] == 8
    assert calc.last_run_["self_influence_blocks_computed"] == 1
    assert zstore.is_complete(group) and group.attrs[ATTR]["last_run"]["chunks_repaired"] == 3
    got = arrays(path)
    for name, value in clean.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    # the repaired store verifies clean; a complete store resumes with nothing to do
    calc, _ = run(job, path, resume=True)
    assert calc.last_run_["chunks_computed"] == 0 and calc.last_run_["verify"]["damaged"] == {}
    print(
        "\nMEASURED corruption: 6 faults injected (3 influence chunks, 1 flag, 1 self-influence chunk, "
        "1 top-k chunk); all detected; 4 influence chunks + 1 self block + 1 top-k row recomputed; "
        "equal to clean run (bit-identical)"
    )


def test_a_complete_store_found_damaged_is_marked_incomplete_until_repaired(job, tmp_path, monkeypatch):
    path = tmp_path / "store.zarr"
    run(job, path)
    truncate(path / "influences" / "c" / "1" / "1")
    assert zstore.is_complete(zarr.open_group(str(path), mode="r"))  # flags alone cannot tell
    assert zstore.verify_store(zarr.open_group(str(path), mode="r")).damaged == {"influences": [(1, 1)]}
    text = CliRunner().invoke(cli, ["inspect", str(path), "--no-stats", "--verify"])
    assert text.exit_code == 0 and "Verify: 1 damaged chunk(s): influences [[1, 1]]" in text.output

    # a resume that dies while recomputing leaves the store marked incomplete
    def crash(self, dsk, keys):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(di.SequentialInfluenceCalculator, "_execute", crash)
    with pytest.raises(KeyboardInterrupt):
        run(job, path, resume=True)
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs[ATTR]["complete"] is False and not zstore.is_complete(group)
    assert not os.path.exists(f"{path}.lock")  # released on failure too
    monkeypatch.undo()
    calc, group = run(job, path, resume=True)
    assert calc.last_run_["chunks_computed"] == 1 and zstore.is_complete(group)


def test_verify_modes(job, tmp_path):
    path = tmp_path / "store.zarr"
    run(job, path)
    truncate(path / "influences" / "c" / "0" / "0")
    (path / "influences" / "c" / "0" / "2").unlink()
    # "exists" lists the chunk files only: it finds the deleted chunk, not the truncated one
    calc, _ = run(job, path, resume=True, verify="exists")
    assert calc.last_run_["verify"]["damaged"] == {"influences": [[0, 2]]}
    assert calc.last_run_["verify"]["bytes_read"] == 0 and calc.last_run_["chunks_computed"] == 1
    # False trusts the flags: the truncated chunk stays (and fails to decode when read)
    calc, group = run(job, path, resume=True, verify=False)
    assert calc.last_run_["verify"] is None and calc.last_run_["chunks_computed"] == 0
    with pytest.raises(ValueError, match="checksum"):
        group["influences"][0:4, 0:10]
    calc, group = run(job, path, resume=True)  # the default reads it and repairs it
    assert calc.last_run_["chunks_repaired"] == 1
    group["influences"][0:4, 0:10]
    with pytest.raises(ValueError, match="verify must be True, False, 'full' or 'exists'"):
        run(job, path, resume=True, verify="yes")


@pytest.mark.parametrize(
    "change, differs",
    [
        ("method", "method"),
        ("regularization", "regularization"),
        ("n_train", "shape"),
        ("n_test", "shape"),
        ("train_block", "train_block_sizes"),
        ("mode", "mode"),
    ],
)
def test_store_of_another_job_is_refused(job, tmp_path, change, differs):
    solver, test, train = job
    path = tmp_path / "store.zarr"
    di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(test, train, path)
    model, loss, tr, te = make()
    other, mode = solver, "up"
    if change == "method":
        other = di.CgInfluence(model, loss, regularization=0.1, curvature="ggn").fit(tr)
    elif change == "regularization":
        other = di.DirectInfluence(model, loss, regularization=0.2, curvature="ggn").fit(tr)
    elif change == "n_train":
        tr = (tr[0][:-1], tr[1][:-1])
        train = DataLoader(TensorDataset(*tr), batch_size=TRAIN_BLOCK)
    elif change == "n_test":
        test = DataLoader(TensorDataset(te[0][:-2], te[1][:-2]), batch_size=TEST_BLOCK)
    elif change == "train_block":
        train = DataLoader(TensorDataset(*tr), batch_size=TRAIN_BLOCK + 1)
    elif change == "mode":
        mode = "perturbation"
    with pytest.raises(di.StoreError, match=rf"different configuration \(differs in: .*{differs}"):
        di.SequentialInfluenceCalculator(other, progress=False).influences_to_zarr(
            test, train, path, mode=mode, resume=True
        )
    assert not os.path.exists(f"{path}.lock")


def test_store_whose_arrays_were_altered_is_refused(job, tmp_path):
    solver, test, train = job
    path = tmp_path / "store.zarr"
    di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(test, train, path)
    group = zarr.open_group(str(path), mode="r+")
    group.create_array("influences", shape=(N_TEST, N_TRAIN), chunks=(3, 10), dtype="float64", overwrite=True)
    with pytest.raises(
        di.StoreError,
        match=r"array 'influences' .* chunks \(3, 10\).* needs shape \(12, 40\), "
        r"chunks \(4, 10\)",
    ):
        di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(test, train, path, resume=True)
    path = tmp_path / "store2.zarr"
    di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(test, train, path)
    del zarr.open_group(str(path), mode="r+")["influences_done"]
    with pytest.raises(di.StoreError, match="has no array 'influences_done'"):
        di.SequentialInfluenceCalculator(solver, progress=False).influences_to_zarr(test, train, path, resume=True)
