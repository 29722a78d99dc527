"""Files read from disk are data, never code (issue 12, item 5).

A saved solver (``solver.save``) and a saved fit (``<store>.fit.pt``, which ``dask-influence
run`` loads without asking) are plain data read with ``torch.load(..., weights_only=True)``:
a file crafted to run code when unpickled is refused with a ``ValueError`` naming it, and the
code does not run. Files of the old pickled format 1 are refused with a "fit again" message.
A saved fit is reused when only solve-time hyperparameters (the regularization) changed.
"""

import builtins
import copy
import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import dask_influence as di
from dask_influence.core import serialization
from dask_influence.core.preconditioners import Preconditioner
from dask_influence.core.serialization import KIND, serializable
from dask_influence.core.solvers import fit_record
from dask_influence.core.solvers.direct import DirectState
from dask_influence.mapping import fitting
from dask_influence.mapping.fitting import fit_path_for, load_fit
from jobs import invoke

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "batch_job"


# -- payloads that run code when unpickled ------------------------------------------------------------
class TouchBySystem:
    """Unpickling calls ``os.system("touch MARKER")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class TouchByOpen:
    """Unpickling calls ``open(MARKER, "w")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def craft(kind, path, marker):
    """Write a file at ``path`` that creates ``marker`` if it is unpickled."""
    payloads = {"system": TouchBySystem, "open": TouchByOpen}
    if kind == "raw-pickle":  # not a torch file at all: a plain pickle
        Path(path).write_bytes(pickle.dumps({"format": 2, "attributes": TouchByOpen(marker)}))
    elif kind == "format-2-record":  # a plausible record whose fitted state is the payload
        torch.save(
            {
                "format": 2,
                "method": "direct",
                "class": "DirectInfluence",
                "attributes": {"state_": TouchBySystem(marker)},
            },
            path,
        )
    else:
        torch.save({"format": 1, "class": "DirectInfluence", "payload": payloads[kind](marker)}, path)
    assert not Path(marker).exists()  # writing it ran nothing


KINDS = ["system", "open", "raw-pickle", "format-2-record"]


def _problem(n=30):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.05)
    for _ in range(300):  # near a minimum, so that H + 0.3 I is positive definite
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, nn.CrossEntropyLoss(), x, y


@pytest.fixture(scope="module")
def problem():
    return _problem()


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- crafted files are refused, unrun -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_solver_file_is_refused_unrun(kind, problem, tmp_path):
    model, loss, x, y = problem
    path, marker = tmp_path / "solver.pt", tmp_path / "MARKER"
    craft(kind, path, marker)
    with pytest.raises(ValueError, match="solver.pt") as err:
        di.DirectInfluence.load(path, model, loss)
    assert not marker.exists()
    assert "not a file written by InfluenceModel.save()" in str(err.value) or "format 1" in str(err.value)
    with pytest.raises(ValueError, match="solver.pt"):
        di.CgInfluence.load(path, model, loss, train=(x, y))
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_fit_file_is_refused_unrun(kind, problem, tmp_path):
    model, loss, x, y = problem
    path, marker = tmp_path / "out.zarr.fit.pt", tmp_path / "MARKER"
    craft(kind, path, marker)
    calc = di.SequentialInfluenceCalculator(di.DirectInfluence(model, loss, regularization=0.3), progress=False)
    with pytest.raises(ValueError, match="out.zarr.fit.pt") as err:
        calc.fit((x, y), train_block_size=10, path=path)
    assert not marker.exists() and not calc.solver.is_fitted
    assert "is not a saved fit" in str(err.value) or "format 1" in str(err.value)
    # the function that restores fits, directly
    with pytest.raises(ValueError, match="out.zarr.fit.pt"):
        load_fit(di.DirectInfluence(model, loss), path, training_data={}, data=None)
    assert not marker.exists()


def test_the_refusal_names_the_object_and_says_nothing_ran(problem, tmp_path):
    model, loss, _, _ = problem
    craft("system", tmp_path / "evil.pt", tmp_path / "MARKER")
    with pytest.raises(ValueError) as err:
        di.DirectInfluence.load(tmp_path / "evil.pt", model, loss)
    message = str(err.value)
    assert "evil.pt" in message and "system" in message and "refused without running anything" in message
    assert "weights_only" not in message  # no advice to load it unsafely


def test_a_data_record_naming_a_class_off_the_allow_list_is_refused(problem, tmp_path):
    """A format-2 file of plain data whose state names another class: not built."""
    model, loss, x, y = problem
    path = tmp_path / "fit.pt"
    solver = di.DirectInfluence(model, loss, regularization=0.3).fit((x, y))
    solver.save(path)
    record = torch.load(path, weights_only=True)
    record["attributes"]["items"]["state_"] = {KIND: "object", "class": "posix.system", "fields": {}}
    record["sha256"] = serialization.content_digest(record)  # crafted with a matching checksum
    torch.save(record, path)
    with pytest.raises(ValueError, match=r"fit\.pt.*unknown type 'posix\.system'.*DirectState"):
        di.DirectInfluence.load(path, model, loss)
    record["attributes"]["items"]["state_"] = {KIND: "eval", "source": "print(1)"}
    record["sha256"] = serialization.content_digest(record)
    torch.save(record, path)
    with pytest.raises(ValueError, match=r"fit\.pt.*unknown kind 'eval'"):
        di.DirectInfluence.load(path, model, loss)


# -- damaged files ---------------------------------------------------------------------------------------
def flip_a_byte_of(path, tensor):
    """Change one byte of ``tensor``'s data where it is stored in the file at ``path``."""
    raw = bytearray(Path(path).read_bytes())
    t = tensor.detach().cpu()
    layouts = [t.contiguous()] + ([t.T.contiguous()] if t.ndim == 2 else [])  # row or column major
    data, at = next(((d, raw.find(d)) for d in (x.numpy().tobytes() for x in layouts) if raw.find(d) >= 0), (b"", -1))
    assert at >= 0, "the tensor's bytes are stored as they are"
    raw[at + len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(raw))


def test_a_fit_file_with_one_byte_changed_is_refused(problem, tmp_path):
    model, loss, x, y = problem
    solver = di.DirectInfluence(model, loss, regularization=0.3).fit((x, y))
    path = tmp_path / "solver.pt"
    solver.save(path)
    flip_a_byte_of(path, solver.state_.matrices[0])
    with pytest.raises(ValueError, match=r"solver\.pt.*is damaged: its contents do not match the checksum"):
        di.DirectInfluence.load(path, model, loss)
    # the same through a job's saved fit: refused, and refit=True replaces it
    fit_path = fit_path_for(tmp_path / "out.zarr")
    calc = di.SequentialInfluenceCalculator(di.DirectInfluence(model, loss, regularization=0.3), progress=False)
    calc.fit((x, y), train_block_size=10, path=fit_path)
    flip_a_byte_of(fit_path, calc.solver.state_.matrices[0])
    again = di.SequentialInfluenceCalculator(di.DirectInfluence(model, loss, regularization=0.3), progress=False)
    with pytest.raises(ValueError, match=r"out\.zarr\.fit\.pt.*is damaged.*refit=True"):
        again.fit((x, y), train_block_size=10, path=fit_path)
    again.fit((x, y), train_block_size=10, path=fit_path, refit=True)
    assert not again.last_fit_["reused"]
    assert rel_diff(again.solver.influences(x, y), solver.influences(x, y)) < 1e-10


# -- the old format -------------------------------------------------------------------------------
def _format_1(solver, path, **extra):
    """A file as format 1 wrote it: a torch pickle of the objects themselves."""
    theta = solver._require_fitted()
    torch.save(
        {
            "format": 1,
            "class": type(solver).__name__,
            "hyperparameters": solver.config.to_dict(),
            "params_checksum": fit_record.checksum(theta),
            "num_params": solver.num_params,
            "n_train": solver.n_train_,
            "feature_shape": tuple(solver.feature_shape_),
            "attributes": {name: getattr(solver, name) for name in solver._saved_attributes},
            **extra,
        },
        path,
    )


@pytest.mark.parametrize("cls, kwargs", [(di.DirectInfluence, {}), (di.LissaInfluence, {"maxiter": 5})])
def test_old_format_files_are_refused_with_fit_again(cls, kwargs, problem, tmp_path):
    """Direct's format-1 file names DirectState (refused by the restricted unpickler); LiSSA's holds
    only a float (it loads as data, and its format number refuses it)."""
    model, loss, x, y = problem
    solver = cls(model, loss, regularization=0.3, **kwargs).fit((x, y))
    old = tmp_path / "old.pt"
    _format_1(solver, old)
    with pytest.raises(ValueError, match=r"old\.pt.*older version.*format 1.*fit the solver again"):
        cls.load(old, model, loss, train=(x, y))
    fit_file = tmp_path / "out.zarr.fit.pt"
    _format_1(solver, fit_file, training_data={"n": 30})
    calc = di.SequentialInfluenceCalculator(cls(model, loss, regularization=0.3, **kwargs), progress=False)
    with pytest.raises(ValueError, match=r"fit\.pt.*format 1.*fit again.*--refit"):
        calc.fit((x, y), train_block_size=10, path=fit_file)
    # refit replaces it with a file of the current format
    calc.fit((x, y), train_block_size=10, path=fit_file, refit=True)
    assert torch.load(fit_file, weights_only=True)["format"] == serialization.FORMAT


# -- the data format --------------------------------------------------------------------------------
def test_state_trees_round_trip_as_plain_data():
    state = DirectState(
        blocks=((0, 3), (3, 5)),
        eigenvalues=(torch.ones(3), torch.arange(2.0)),
        eigenvectors=(torch.eye(3), torch.eye(2)[:, [1, 0]]),
    )
    tree = {
        "state": state,
        "list": [1, 2.5, None, True, "s"],
        "size": torch.Size([2, 3]),
        "dtype": torch.float32,
        "nested": ({"a": (1, (2,))},),
        "float": float("inf"),
    }
    data = serialization.to_data(tree)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(u) for k, u in v.items())
        if isinstance(v, list):
            return all(plain(u) for u in v)
        return v is None or isinstance(v, (bool, int, float, str, torch.Tensor))

    assert plain(data)
    back = serialization.from_data(data)
    assert isinstance(back["state"], DirectState) and back["state"].blocks == ((0, 3), (3, 5))
    assert all(
        torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(back["state"].eigenvectors, state.eigenvectors)
    )
    assert back["list"] == tree["list"] and back["size"] == torch.Size([2, 3]) and back["dtype"] is torch.float32
    assert back["nested"] == ({"a": (1, (2,))},) and back["float"] == float("inf")
    assert set(serialization.allowed_classes()) >= {
        "DirectState",
        "ArnoldiState",
        "LowRankFactor",
        "EkfacState",
        "LayerFactors",
        "JacobiPreconditioner",
        "NystroemPreconditioner",
    }
    with pytest.raises(TypeError, match=r"state\.x.*serializable"):
        serialization.to_data({"state": {"x": object()}}, where="state")


class HalfDiagonal(Preconditioner):
    """A custom preconditioner: the inverse of twice the regularization (not allow-listed)."""

    def _fit(self, operator, regularization):
        self.scale = 1.0 / (2.0 * regularization)

    def _apply(self, r):
        return self.scale * r


@serializable(name="tests.SavedHalfDiagonal")
class SavedHalfDiagonal(HalfDiagonal):
    """The same, allow-listed for saved files."""


def test_a_custom_preconditioner_is_saved_only_when_allow_listed(problem, tmp_path):
    model, loss, x, y = problem
    solver = di.CgInfluence(model, loss, regularization=0.3, preconditioner=HalfDiagonal()).fit((x, y))
    with pytest.raises(TypeError, match="HalfDiagonal.*serializable"):
        solver.save(tmp_path / "cg.pt")
    assert not (tmp_path / "cg.pt").exists()
    solver = di.CgInfluence(model, loss, regularization=0.3, preconditioner=SavedHalfDiagonal()).fit((x, y))
    solver.save(tmp_path / "cg.pt")
    loaded = di.CgInfluence.load(tmp_path / "cg.pt", model, loss, train=(x, y))
    assert type(loaded.preconditioner_) is SavedHalfDiagonal and loaded.preconditioner_.scale == pytest.approx(1 / 0.6)
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), solver.influences(x[:3], y[:3], x, y))
    # the base class loads whichever registered solver the file holds
    assert type(di.InfluenceModel.load(tmp_path / "cg.pt", model, loss, train=(x, y))) is di.CgInfluence


# -- the regularization is not part of the fit (the bug) ---------------------------------------------------
def test_a_saved_direct_fit_is_reused_when_only_the_regularization_changed(problem, tmp_path):
    model, loss, x, y = problem
    path = fit_path_for(tmp_path / "out.zarr")

    def fit(regularization, **kwargs):
        solver = di.DirectInfluence(copy.deepcopy(model), loss, regularization=regularization, **kwargs)
        calc = di.SequentialInfluenceCalculator(solver, progress=False)
        calc.fit((x, y), train_block_size=10, path=path)
        return calc

    assert not fit(0.3).last_fit_["reused"]
    again = fit(0.5)
    assert again.last_fit_["reused"] and again.last_fit_["sweeps"] == 1  # the checksum pass only
    assert again.solver.regularization == 0.5  # the new solve-time value is kept
    fresh = di.DirectInfluence(model, loss, regularization=0.5).fit((x, y))
    assert rel_diff(again.solver.influences(x[:4], y[:4], x, y), fresh.influences(x[:4], y[:4], x, y)) < 1e-10
    # a fit-relevant hyperparameter still refuses it
    with pytest.raises(ValueError, match=r"hyperparameters differ \(blocks\)"):
        fit(0.5, blocks="layer")


# -- through the command line ----------------------------------------------------------------------------
N_TRAIN, N_TEST = 40, 6


def write_job(tmp_path, regularization):
    path = tmp_path / "job.toml"
    path.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "factory:make_problem"
        path = "{EXAMPLE}"
        options = {{ n_train = {N_TRAIN}, n_test = {N_TEST} }}

        [solver]
        method = "direct"
        regularization = {regularization}

        [blocks]
        test = 3
        train = 16

        [output]
        store = "influences.zarr"

        [cluster]
        sequential = true
        """)
    )
    return path


@pytest.fixture
def fits(monkeypatch):
    """Counts the fits (restoring a saved fit is not one); restores the imports `run` adds."""
    calls = []
    real = fitting._fit

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "_fit", counting)
    path, had = list(sys.path), sys.modules.get("factory")
    yield calls
    sys.path[:] = path
    sys.modules.pop("factory", None) if had is None else sys.modules.__setitem__("factory", had)


def _expected(regularization):
    sys.path.insert(0, str(EXAMPLE))
    import factory

    problem = factory.make_problem(n_train=N_TRAIN, n_test=N_TEST)
    x, y = problem["train"].tensors
    solver = di.DirectInfluence(problem["model"], problem["loss"], regularization=regularization).fit((x, y))
    return solver.influences(*problem["test"].tensors, x, y).numpy()


def test_run_resume_reuses_the_fit_after_the_regularization_is_edited(tmp_path, fits):
    job = write_job(tmp_path, 1e-3)
    result = invoke("run", job, "--fit-only")
    assert result.exit_code == 0, result.output
    assert fits == [1] and (tmp_path / "influences.zarr.fit.pt").is_file()
    job = write_job(tmp_path, 1e-2)  # the user edits [solver] regularization
    result = invoke("run", job, "--resume")
    assert result.exit_code == 0, result.output
    assert "Reusing the saved fit" in result.output and fits == [1]
    values = zarr.open_group(str(tmp_path / "influences.zarr"), mode="r")["influences"][...]
    expected = _expected(1e-2)
    np.testing.assert_allclose(values, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


def test_run_resume_refuses_a_damaged_fit_file_and_refit_replaces_it(tmp_path, fits):
    job = write_job(tmp_path, 1e-3)
    assert invoke("run", job, "--fit-only", "--quiet").exit_code == 0
    saved = tmp_path / "influences.zarr.fit.pt"
    state = serialization.load(saved)["attributes"]["state_"]
    flip_a_byte_of(saved, state.matrices[0])
    result = invoke("run", job, "--resume")
    assert result.exit_code == 1 and "is damaged" in result.output and "--refit" in result.output
    assert len(fits) == 1  # nothing was fitted or computed with the damaged file
    result = invoke("run", job, "--resume", "--refit", "--quiet")
    assert result.exit_code == 0 and len(fits) == 2


def test_run_resume_refuses_a_crafted_fit_file_unrun(tmp_path, fits):
    job = write_job(tmp_path, 1e-3)
    assert invoke("run", job, "--fit-only", "--quiet").exit_code == 0
    saved, marker = tmp_path / "influences.zarr.fit.pt", tmp_path / "MARKER"
    craft("system", saved, marker)  # replaced by a file that runs code when unpickled
    result = invoke("run", job, "--resume")
    assert result.exit_code == 1 and not marker.exists()
    assert "Error:" in result.output and "influences.zarr.fit.pt" in result.output
    assert "refused without running anything" in result.output
    assert not (tmp_path / "influences.zarr").exists() or not zarr.open_group(
        str(tmp_path / "influences.zarr"), mode="r"
    ).attrs.get("complete", False)
