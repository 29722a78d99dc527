"""The fitting tests' cases (the problem and solvers of ``tests/cases.py``) and their fitted state as tensors."""

from __future__ import annotations

import numpy as np
import torch

import dask_influence as di
from cases import fit_problem, solver_cases

N_TRAIN = 47
UNEVEN = (13, 5, 20, 9)  # train blocks of the distributed fits (the in-process fit uses batches of 10)

# passes over the data of a fit: the validating pass + the fit's sweeps (None: varies, or not
# listed: a new solver is still fitted in process, block by block and on the cluster and compared).
PASSES = {"direct": 2, "cg": 2, "lissa": 11, "arnoldi": None, "nystroem": 2, "ekfac": 3}

# (class, keyword arguments, passes) for every registered solver, from tests/cases.py
SOLVERS = [
    (case.cls, case.kwargs, PASSES.get(case.name))
    for case in solver_cases(
        override={
            "cg": {"preconditioner": "nystroem", "preconditioner_rank": 5},
            "lissa": {"maxiter": 40, "rtol": 1e-12},
        },
        variants={"direct": [{"blocks": "layer"}], "cg": [{"preconditioner": "jacobi", "blocks": "layer"}]},
    )
]


def solver_id(case) -> str:
    cls, kwargs, _ = case
    return cls.__name__.replace("Influence", "") + "".join(f"-{v}" for v in kwargs.values() if isinstance(v, str))


make_problem = fit_problem  # a 4-5-3 tanh MLP near a minimum of its L2-regularized cross entropy (float64)


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
    # any other solver: its inverse applied to fixed vectors (independent of bases and signs)
    probe = torch.randn(5, solver.num_params, generator=torch.Generator().manual_seed(0), dtype=solver.dtype)
    return {"inverse": solver.apply_inverse(probe)}


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def state_diff(a, b) -> float:
    sa, sb = fitted_state(a), fitted_state(b)
    assert sa.keys() == sb.keys()
    return max(rel_diff(sa[k], sb[k]) for k in sa)
