"""Tiny seeded cases for the fitting tests: a problem, the solvers, and their fitted state as tensors."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import dask_influence as di

N_TRAIN = 47
UNEVEN = (13, 5, 20, 9)  # train blocks of the distributed fits (the in-process fit uses batches of 10)

# (class, keyword arguments, passes over the data: the validating pass + the fit's sweeps; None: varies)
SOLVERS = [
    (di.DirectInfluence, {}, 2),
    (di.DirectInfluence, {"blocks": "layer"}, 2),
    (di.CgInfluence, {"preconditioner": "nystroem", "preconditioner_rank": 5}, 2),
    (di.CgInfluence, {"preconditioner": "jacobi", "blocks": "layer"}, 2),
    (di.LissaInfluence, {"maxiter": 40, "rtol": 1e-12}, 31),
    (di.ArnoldiInfluence, {"rank": 8}, None),
    (di.NystroemSketchInfluence, {"rank": 8}, 2),
    (di.EkfacInfluence, {}, 3),
]


def solver_id(case) -> str:
    cls, kwargs, _ = case
    return cls.__name__.replace("Influence", "") + "".join(f"-{v}" for v in kwargs.values() if isinstance(v, str))


def make_problem(n: int = N_TRAIN, seed: int = 1):
    """A 4-5-3 tanh MLP near a minimum of its L2-regularized cross-entropy (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n + 6,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    return model, nn.CrossEntropyLoss(), (x[:n], y[:n]), (x[n:], y[n:])


def fitted_state(solver) -> dict[str, torch.Tensor]:
    """What a fit produced, in forms that do not depend on eigenvector signs or bases."""
    if isinstance(solver, di.DirectInfluence):
        return {"H": solver.hessian}
    if isinstance(solver, di.CgInfluence):
        pre = solver.preconditioner
        if isinstance(pre, di.JacobiPreconditioner):
            return {"diagonal": pre.diagonal}
        u, s = pre.factor.basis, pre.factor.eigenvalues
        return {"sketch": (u * s) @ u.T}
    if isinstance(solver, di.LissaInfluence):
        return {"scale": torch.tensor(solver.scale_)}
    if isinstance(solver, (di.ArnoldiInfluence, di.NystroemSketchInfluence)):
        d, v = solver.eigenvalues_, solver.eigenvectors_
        return {"eigenvalues": d, "low rank": (v * d) @ v.T}
    if isinstance(solver, di.EkfacInfluence):
        return {"curvature": solver.curvature_matrix()}
    raise AssertionError(type(solver))


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def state_diff(a, b) -> float:
    sa, sb = fitted_state(a), fitted_state(b)
    assert sa.keys() == sb.keys()
    return max(rel_diff(sa[k], sb[k]) for k in sa)
