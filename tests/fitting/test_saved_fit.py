"""A fit saved next to the output is restored instead of refitting, and refused when it belongs to
another solver, model or training set (checksums recorded in the file)."""

import copy
import pickle

import pytest
import torch

import dask_influence as di
from dask_influence.mapping.fitting import fit_path_for
from fit_cases import make_problem, rel_diff


@pytest.fixture(scope="module")
def problem():
    return make_problem()


CG = {"regularization": 0.3, "preconditioner": "nystroem", "preconditioner_rank": 5}


def fit(problem, path, *, cls=di.CgInfluence, model=None, x=None, refit=False, **kwargs):
    base, loss, (x0, y), _ = problem
    kwargs = {**CG, **kwargs} if cls is di.CgInfluence else {"regularization": 0.3, **kwargs}
    calc = di.SequentialInfluenceCalculator(cls(model or base, loss, **kwargs), progress=False)
    calc.fit((x0 if x is None else x, y), train_block_size=10, path=path, refit=refit)
    return calc


def test_a_saved_fit_is_reused(problem, tmp_path):
    path = fit_path_for(tmp_path / "out.zarr")
    assert path == str(tmp_path / "out.zarr.fit.pt")
    first = fit(problem, path)
    assert not first.last_fit_["reused"] and first.last_fit_["sweeps"] == 2
    again = fit(problem, path)
    assert again.last_fit_["reused"] and again.last_fit_["sweeps"] == 1  # the checksum pass only
    _, _, (x, y), (xt, yt) = problem
    assert torch.equal(again.solver.preconditioner.factor.basis, first.solver.preconditioner.factor.basis)
    assert torch.equal(again.solver.influences(xt, yt, x, y), first.solver.influences(xt, yt, x, y))
    pickle.dumps(again.solver)  # ships to workers like a fresh fit
    assert not fit(problem, path, refit=True).last_fit_["reused"]
    # the file is also an ordinary saved solver
    loaded = di.CgInfluence.load(path, problem[0], problem[1], train=(x, y))  # one batch of 47: other sums
    assert rel_diff(loaded.influences(xt, yt, x, y), first.solver.influences(xt, yt, x, y)) < 1e-12


def test_a_saved_fit_of_another_model_or_data_set_is_refused(problem, tmp_path):
    path = tmp_path / "fit.pt"
    fit(problem, path)
    other_model = copy.deepcopy(problem[0])
    with torch.no_grad():
        other_model[0].weight.add_(1e-3)
    with pytest.raises(ValueError, match="fitted with other model weights.*refit=True"):
        fit(problem, path, model=other_model)
    other_x = problem[2][0].clone()
    other_x[3, 1] += 1e-9
    with pytest.raises(ValueError, match=r"other training data \(differs in: sha256\)"):
        fit(problem, path, x=other_x)
    # only what the fit depends on must match: CG's regularization and tolerances are solve-time
    with pytest.raises(ValueError, match=r"hyperparameters differ \(preconditioner_rank\)"):
        fit(problem, path, preconditioner_rank=4)
    assert fit(problem, path, regularization=0.5, rtol=1e-9).last_fit_["reused"]
    with pytest.raises(ValueError, match="holds a fitted CgInfluence, not a DirectInfluence"):
        fit(problem, path, cls=di.DirectInfluence)
    # refit replaces it
    assert not fit(problem, path, preconditioner_rank=4, refit=True).last_fit_["reused"]
    assert fit(problem, path, preconditioner_rank=4).last_fit_["reused"]


def test_files_that_are_not_saved_fits_are_refused(problem, tmp_path):
    model, loss, (x, y), _ = problem
    plain = tmp_path / "plain.pt"
    di.CgInfluence(model, loss, **CG).fit((x, y)).save(plain)
    with pytest.raises(ValueError, match="no checksum of its training data"):
        fit(problem, plain)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a saved fit"):
        fit(problem, junk)
