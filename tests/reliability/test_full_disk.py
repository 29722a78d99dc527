"""A full disk (a small tmpfs mounted for the test, filled up): taking a store's lock and
saving a fit fail with "No space left on device" and leave no empty lock and no partial file
behind, so the next run is not blocked (issue 17, item 3)."""

import errno
import os
import subprocess
import uuid

import pytest
import torch

import dask_influence as di
from dask_influence.errors import StoreError
from dask_influence.storage.lock import StoreLock, lock_path, read_lock


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs at ``tmp_path / "disk"``, filled to the last byte (skipped where it cannot be mounted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'mount failed'}); needs root")
    try:
        with open(mount / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 512)
            except OSError as err:
                assert err.errno == errno.ENOSPC
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _leftovers(directory):
    return sorted(name for name in os.listdir(directory) if name != "filler")


def test_lock_on_a_full_disk_fails_cleanly_and_leaves_no_empty_lock(full_disk):
    store = str(full_disk / "out.zarr")
    with pytest.raises(StoreError, match=r"creating its lock file .* failed \(No space left on device\)"):
        StoreLock(store).acquire()
    assert _leftovers(full_disk) == []  # neither an empty lock nor a temporary file
    assert read_lock(store) is None
    os.remove(full_disk / "filler")  # space again: the next run takes the lock at once
    with StoreLock(store):
        assert os.path.getsize(lock_path(store)) > 0
    assert _leftovers(full_disk) == []


def test_saving_a_fit_on_a_full_disk_says_so_and_leaves_no_partial_file(full_disk):
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 30).double()  # 1,230 parameters: the saved eigenvectors need ~12 MB
    x, y = torch.randn(50, 40, dtype=torch.float64), torch.randn(50, 30, dtype=torch.float64)
    solver = di.DirectInfluence(model, torch.nn.MSELoss(), regularization=0.1).fit((x, y))
    with pytest.raises(OSError) as info:
        solver.save(full_disk / f"fit-{uuid.uuid4().hex[:6]}.pt")
    assert info.value.errno == errno.ENOSPC
    assert _leftovers(full_disk) == []


def test_out_of_space_errors_name_the_file(full_disk):
    """Issue 31 item 18: a write that fails on a full disk said `[Errno 28] No space left on
    device` without naming the file (the open succeeded; the write raised)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 30).double()
    x, y = torch.randn(50, 40, dtype=torch.float64), torch.randn(50, 30, dtype=torch.float64)
    solver = di.DirectInfluence(model, torch.nn.MSELoss(), regularization=0.1).fit((x, y))
    target = full_disk / "fit.pt"
    with pytest.raises(OSError) as info:
        solver.save(target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert str(info.value).startswith("[Errno 28] No space left on device writing ")
    assert str(info.value).endswith(f"; free space on that disk or write the file elsewhere: '{target}'")


def test_a_chunk_that_does_not_fit_on_the_disk_names_the_store_and_the_chunk(tmp_path):
    import numpy as np
    import zarr

    from dask_influence.storage.store import write_influence_chunks

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'mount failed'}); needs root")
    try:
        store = str(mount / "out.zarr")
        group = zarr.open_group(store, mode="w")
        group.create_array("influences", shape=(10, 40_000), chunks=(10, 10_000), dtype="f8", compressors=None)
        group.create_array("influences_done", shape=(1, 4), chunks=(1, 1), dtype="i1", fill_value=0)
        with pytest.raises(OSError) as info:  # 800,000 bytes per chunk on a 64 KiB disk
            write_influence_chunks(store, 1, (10_000, 20_000), [(0, 0, 10, 0)], [np.ones((10, 10_000))])
        assert info.value.errno == errno.ENOSPC and info.value.filename == store
        assert str(info.value) == (
            "[Errno 28] No space left on device writing chunk (0, 1) of influences; free space on that disk "
            f"(or write the store elsewhere), then rerun with --resume: '{store}'"
        )
    finally:
        subprocess.run(["umount", str(mount)], check=False)
