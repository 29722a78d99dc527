"""A resume never mixes fits: every solver's fingerprint covers its fitted state, and a well-formed
fit file whose state was altered (with a matching checksum) is refused by the store it would resume."""

from __future__ import annotations

import sys

import pytest
import torch
import zarr

from cases import fit_problem, solver_cases
from dask_influence.core import serialization
from test_safe_files import invoke, write_job


def _scale_tensors(value, factor: float) -> int:
    """Multiply every floating tensor of a state tree by ``factor`` in place; returns how many."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel():
            value.mul_(factor)
            return 1
        return 0
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_scale_tensors(getattr(value, f.name), factor) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(_scale_tensors(v, factor) for v in value)
    if isinstance(value, dict):
        return sum(_scale_tensors(v, factor) for v in value.values())
    if hasattr(value, "__dict__"):
        return sum(_scale_tensors(v, factor) for v in vars(value).values())
    return 0


@pytest.mark.parametrize("case", solver_cases(variants={"cg": [{"preconditioner": "nystroem"}]}), ids=lambda c: c.id)
def test_the_fingerprint_covers_the_fitted_state_of_every_solver(case):
    model, loss, (x, y), _ = fit_problem()
    solver = case.cls(model, loss, **{"regularization": 0.3, **case.kwargs}).fit((x, y))
    before = solver.fingerprint()
    assert solver.fingerprint() == before  # deterministic
    state = solver.fitted_state()
    if all(v is None for v in state.values()):
        assert case.name == "cg" and solver.preconditioner_ is None  # solves with the data alone: no state
        return
    if not _scale_tensors(state, 1.5):
        scalars = [k for k, v in state.items() if isinstance(v, float)]
        assert scalars, f"{case.id} has no fitted state to alter"
        setattr(solver, scalars[0], 1.5 * state[scalars[0]])  # LiSSA's scale_
    assert solver.fingerprint() != before, f"{case.id}: the fingerprint ignores the fitted state"


def test_a_resume_with_an_altered_well_formed_fit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    job = write_job(tmp_path, 1e-3)
    assert invoke("run", job, "--quiet").exit_code == 0
    store = tmp_path / "influences.zarr"
    first = zarr.open_group(str(store), mode="r")["influences"][:]
    saved = tmp_path / "influences.zarr.fit.pt"
    record = serialization.load(saved)
    assert _scale_tensors(record["attributes"], 1.5)
    serialization.save(record, saved)  # a valid file (its checksum matches) with another fitted state
    result = invoke("run", job, "--resume", "--quiet")
    assert result.exit_code == 1 and "was written by a different configuration" in result.output
    assert "solver_fingerprint" in result.output
    assert (zarr.open_group(str(store), mode="r")["influences"][:] == first).all()  # nothing was mixed in
