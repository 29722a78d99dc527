"""Every registered solver gives the same influences on a CUDA device as on the CPU.

Marked ``gpu``: collected everywhere, skipped where ``torch.cuda.is_available()`` is false (the
conftest skips the marker), run on a machine with a GPU (``make test-gpu``). Float64 on both
devices, so the comparison is to rounding, not to float32's reordering noise.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cases import mlp_classification_problem, rel_err, solver_cases

pytestmark = pytest.mark.gpu

# the tolerances differ only by how the solve accumulates (iterations, random probes seeded alike)
TOL = {"direct": 1e-10, "cg": 1e-8, "lissa": 1e-8, "arnoldi": 1e-6, "nystroem": 1e-6, "ekfac": 1e-8}
CASES = solver_cases()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_solver_on_cuda_equals_cpu(case):
    model, loss, x, y, xt, yt = mlp_classification_problem()
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)  # the randomized solvers (LiSSA's batches, Nystroem's sketch) draw alike
        m = copy.deepcopy(model).to(device)
        solver = case.cls(m, loss, regularization=0.5, **case.kwargs).fit((x.to(device), y.to(device)))
        assert solver.device.type == device
        values = solver.influences(xt, yt, x, y)  # CPU inputs are moved to the model's device
        assert values.device.type == device
        results.append(values.cpu())
    cpu, cuda = results
    assert rel_err(cuda, cpu) < TOL.get(case.name, 1e-6), case.name


def test_gradient_index_on_cuda_equals_cpu(tmp_path):
    import dask_influence as di

    model, loss, x, y, xt, yt = mlp_classification_problem()
    scores = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        index = di.GradientIndex.build(
            m, loss, (x, y), str(tmp_path / f"{device}.zarr"), projection_dim=16, seed=0, client="sync"
        )
        scores.append(torch.as_tensor(index.influences((xt, yt))))
    assert rel_err(scores[1], scores[0]) < 1e-5
