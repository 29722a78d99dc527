"""A job whose influence matrix is several times a worker's memory completes with bounded memory."""

import shutil

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from torch import nn

import dask_influence as di
from dask_influence.mapping.store import is_complete


@pytest.mark.slow
def test_matrix_larger_than_worker_memory(tmp_path):
    from distributed import Client, LocalCluster

    n_train, n_test, d = 400_000, 2_000, 8
    limit = 800 * 2**20
    rng = da.random.default_rng(0)
    x = rng.standard_normal((n_train, d), chunks=(20_000, d), dtype=np.float32)
    y = rng.standard_normal((n_train, 1), chunks=(20_000, 1), dtype=np.float32)
    g = torch.Generator().manual_seed(0)
    x_test, y_test = torch.randn(n_test, d, generator=g), torch.randn(n_test, 1, generator=g)
    torch.manual_seed(0)
    solver = di.DirectInfluence(nn.Linear(d, 1), nn.MSELoss(), regularization=1e-2)
    solver.fit((x[:5000].compute(), y[:5000].compute()))
    matrix_bytes = n_test * n_train * 4
    assert matrix_bytes > 3.5 * limit  # the result could never sit in one worker

    path = tmp_path / "big.zarr"
    try:
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, memory_limit=limit, host="127.0.0.1", dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            calc = di.DaskInfluenceCalculator(solver, client, progress=False)
            group = calc.influences_to_zarr((x_test.numpy(), y_test.numpy()), (x, y), path, test_block_size=500)
            # the nanny restarts a worker above 95% of its limit; none was restarted
            assert len(client.scheduler_info()["workers"]) == 2
        assert is_complete(group) and group["influences"].shape == (n_test, n_train)
        assert calc.last_run_["chunks_computed"] == 4 * 20
        # spot-check two chunks against the in-memory solver
        for i0, j0 in [(0, 0), (1500, 380_000)]:
            xb, yb = x[j0 : j0 + 100].compute(), y[j0 : j0 + 100].compute()
            expected = solver.influences(x_test[i0 : i0 + 50], y_test[i0 : i0 + 50], xb, yb).numpy()
            stored = zarr.open_group(str(path), mode="r")["influences"][i0 : i0 + 50, j0 : j0 + 100]
            np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
    finally:
        shutil.rmtree(path, ignore_errors=True)
