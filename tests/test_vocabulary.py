"""One API vocabulary (docs/api.md, "One vocabulary"; issue 30 step 3): the new names work and give
the same numbers as the old spellings, which keep working for one release with a
``di.RenamedWarning`` naming the new spelling; both spellings at once are refused in one line."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import dask_influence as di
from cases import trained_classification_problem
from dask_influence.core.solvers.registry import SOLVERS

LAM = 0.3


@pytest.fixture(scope="module")
def problem():
    """The 4-5-3 tanh MLP (43 parameters) near a minimum, float64: ``model, loss, (x, y), (xt, yt)``
    with 47 training and 6 test points."""
    model, loss, (x, y), (xt, yt) = trained_classification_problem()
    return model.double(), loss, (x.double().numpy(), y.numpy()), (xt.double().numpy(), yt.numpy())


@pytest.fixture(scope="module")
def index(problem, tmp_path_factory):
    model, loss, train, _ = problem
    path = tmp_path_factory.mktemp("vocabulary") / "ix.zarr"
    return di.GradientIndex.build(
        model, loss, train, path, projection_dim=12, dtype="float64", regularization=LAM, train_block_size=10,
        client="sync", progress=False,
    )  # fmt: skip


def _quiet(fn, *args, **kwargs):
    """``fn(...)``, failing on any RenamedWarning (the new spellings warn about nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", di.RenamedWarning)
        return fn(*args, **kwargs)


# -- 1. the objective is the task ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_names_its_objective_task(name):
    params = list(inspect.signature(SOLVERS[name].__init__).parameters)
    assert params[:3] == ["self", "model", "task"], params


def test_solver_task_is_a_task_and_loss_is_what_was_given(problem):
    model, loss, (x, y), (xt, yt) = problem
    by_loss = di.DirectInfluence(model, loss, regularization=LAM).fit((torch.from_numpy(x), torch.from_numpy(y)))
    assert isinstance(by_loss.task, di.Task) and by_loss.task.pairs and by_loss.loss is loss
    task = di.tasks.classification()
    by_task = di.DirectInfluence(model, task, regularization=LAM).fit((torch.from_numpy(x), torch.from_numpy(y)))
    assert by_task.task is task and by_task.loss is task
    np.testing.assert_allclose(
        by_task.influences((xt, yt), (x, y)).numpy(),
        by_loss.influences(xt, yt, x, y).numpy(),
        rtol=1e-10,
    )


def test_solver_load_takes_task_and_warns_for_loss(problem, tmp_path):
    model, loss, (x, y), (xt, yt) = problem
    solver = di.DirectInfluence(model, loss, regularization=LAM).fit((torch.from_numpy(x), torch.from_numpy(y)))
    solver.save(tmp_path / "fit.pt")
    expected = solver.influences(xt, yt, x, y).numpy()
    by_task = _quiet(di.DirectInfluence.load, tmp_path / "fit.pt", model, task=loss)
    np.testing.assert_array_equal(by_task.influences(xt, yt, x, y).numpy(), expected)
    with pytest.warns(di.RenamedWarning, match=r"^DirectInfluence\.load: loss= is now spelled task=; the old spelling"):
        by_loss = di.DirectInfluence.load(tmp_path / "fit.pt", model, loss=loss)
    np.testing.assert_array_equal(by_loss.influences(xt, yt, x, y).numpy(), expected)
    with pytest.raises(TypeError, match=r"DirectInfluence\.load: pass task= only \(loss= is its old spelling\)\."):
        di.DirectInfluence.load(tmp_path / "fit.pt", model, loss, loss=loss)


# -- 2. the index's projected influence factors ------------------------------------------------
def test_index_influence_factors_and_the_old_name(index, problem):
    _, _, (x, _), test = problem
    factors = _quiet(index.influence_factors, test)
    assert factors.shape == (6, 12) and factors.dtype == np.float64
    np.testing.assert_allclose(factors @ index.gradients().T, index.influences(test, progress=False), rtol=1e-10)
    with pytest.warns(
        di.RenamedWarning,
        match=r"^GradientIndex\.factors is now spelled GradientIndex\.influence_factors; the old spelling still "
        r"works in this release and will be removed in the next\.$",
    ):
        old = index.factors(test, regularization=LAM)
    np.testing.assert_array_equal(old, factors)


# -- 3. block sizes: train_block_size and test_block_size --------------------------------------
def test_index_build_takes_train_block_size_and_warns_for_block_size(problem, tmp_path, index):
    model, loss, train, _ = problem
    kw = dict(projection_dim=12, dtype="float64", regularization=LAM, client="sync", progress=False)
    with pytest.warns(di.RenamedWarning, match=r"^GradientIndex\.build: block_size= is now spelled train_block_size="):
        old = di.GradientIndex.build(model, loss, train, tmp_path / "old.zarr", block_size=10, **kw)
    assert old.attributes["block_sizes"] == index.attributes["block_sizes"] == [10, 10, 10, 10, 7]
    np.testing.assert_array_equal(old.gradients(), index.gradients())
    with pytest.raises(TypeError, match=r"GradientIndex\.build: pass train_block_size= only \(block_size= is its"):
        di.GradientIndex.build(model, loss, train, tmp_path / "both.zarr", block_size=10, train_block_size=10, **kw)


@pytest.mark.parametrize("method", ["influences", "top_k", "influence_factors", "scores", "influences_to_zarr"])
def test_index_queries_take_test_block_size_and_warn_for_block_size(index, problem, tmp_path, method):
    _, _, _, test = problem
    args = {"top_k": (test, 3), "influences_to_zarr": (test, tmp_path / "q.zarr")}.get(method, (test,))
    call = getattr(index, method)
    new = _quiet(call, *args, test_block_size=4)
    with pytest.warns(
        di.RenamedWarning, match=rf"^GradientIndex\.{method}: block_size= is now spelled test_block_size="
    ):
        old = call(*((test, tmp_path / "old.zarr") if method == "influences_to_zarr" else args), block_size=4)
    if method == "influences_to_zarr":
        assert new["influences"].chunks == old["influences"].chunks == (4, 10)
        new, old = new["influences"][:], old["influences"][:]
    elif method == "top_k":
        new, old = new.helpful_values, old.helpful_values
    elif method == "scores":
        new, old = new.factors, old.factors
    np.testing.assert_array_equal(old, new)
    with pytest.raises(TypeError, match=rf"GradientIndex\.{method}: pass test_block_size= only"):
        call(*args, block_size=4, test_block_size=4)


def test_calculator_fit_and_self_influences_take_train_block_size(problem):
    model, loss, (x, y), _ = problem
    train = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    calc = di.SequentialInfluenceCalculator(di.DirectInfluence(model, loss, regularization=LAM), progress=False)
    _quiet(calc.fit, train, train_block_size=10)
    new = _quiet(calc.self_influences, train, train_block_size=10)
    assert new.chunks == ((10, 10, 10, 10, 7),)
    with pytest.warns(
        di.RenamedWarning, match=r"^SequentialInfluenceCalculator\.fit: block_size= is now spelled train_block_size="
    ):
        calc.fit(train, block_size=10)
    with pytest.warns(
        di.RenamedWarning,
        match=r"^SequentialInfluenceCalculator\.self_influences: block_size= is now spelled train_block_size=",
    ):
        old = calc.self_influences(train, block_size=10)
    np.testing.assert_array_equal(old.compute(), new.compute())
    with pytest.raises(ValueError, match=r"^Pass train_block_size with a train Dataset \(the number of samples"):
        calc.self_influences(train)
    with pytest.raises(ValueError, match=r"^Pass test_block_size with a test Dataset \(the number of samples"):
        calc.influences(train, train, train_block_size=10)
    with pytest.raises(ValueError, match=r"^train_block_size must be a positive int; got 0\.$"):
        calc.influences((x, y), (x, y), train_block_size=0)
    with pytest.raises(TypeError, match=r"a map-style Dataset with test_block_size, or a pair"):
        calc.influences(object(), (x, y))


# -- 4. the curvature defaults the table documents ----------------------------------------------
def test_curvature_defaults_are_the_documented_ones():
    """Solvers default to the Hessian, the index to the GGN (docs/api.md: the GGN as the one
    default was measured 0.04 of leave-one-out Pearson worse on the digits MLP and kept out)."""
    from dask_influence.core.solvers.config import SolverConfig

    assert SolverConfig().curvature == "hessian"
    assert inspect.signature(di.GradientIndex.build).parameters["curvature"].default == "ggn"
    assert di.EkfacInfluence.config_class().curvature == "ggn"


# -- 5. EK-FAC's output_curvature (formerly task=) and CG's rhs_block_size (formerly block_size) -------
OLD_NEW = [("ekfac", "task", "output_curvature", "classification"), ("cg", "block_size", "rhs_block_size", 4)]


def _solver(name, model, loss, **kw):
    return SOLVERS[name](model, loss, regularization=LAM, **kw)


@pytest.mark.parametrize(("name", "old", "new", "value"), OLD_NEW, ids=["ekfac", "cg"])
def test_renamed_hyperparameters_warn_and_give_the_same_numbers(problem, name, old, new, value):
    model, loss, (x, y), (xt, yt) = problem
    cls = SOLVERS[name].__name__
    solver = _quiet(_solver, name, model, loss, **{new: value}).fit((x, y))
    assert getattr(solver.config, new) == value and getattr(solver, new) == value
    with pytest.warns(
        di.RenamedWarning,
        match=rf"^{cls}: {old}= is now spelled {new}=; the old spelling still works in this release and will be "
        r"removed in the next\.$",
    ) as caught:
        by_old = SOLVERS[name](model, loss, regularization=LAM, **{old: value}).fit((x, y))
    assert [w.filename for w in caught] == [__file__]  # the caller's line
    assert getattr(by_old.config, new) == value and not hasattr(type(by_old.config), old)
    np.testing.assert_array_equal(by_old.influences(xt, yt, x, y).numpy(), solver.influences(xt, yt, x, y).numpy())
    with pytest.raises(TypeError, match=rf"^{cls}: pass {new}= only \({old}= is its old spelling\)\.$"):
        _solver(name, model, loss, **{old: value, new: value})
    # the old attribute reads (and, where it is no other attribute, writes) the new one, warning
    with pytest.warns(di.RenamedWarning, match=rf"^{type(solver.config).__name__}\.{old} is now spelled "):
        assert getattr(solver.config, old) == value
    if name == "cg":  # solver.task is the objective on every solver; block_size has no other meaning
        with pytest.warns(di.RenamedWarning, match=r"^CgConfig\.block_size is now spelled CgConfig\.rhs_block_size"):
            assert solver.block_size == 4
        with pytest.warns(di.RenamedWarning, match=r"^CgInfluence: block_size= is now spelled rhs_block_size="):
            solver.block_size = 2  # solve-time: no refit needed
        assert solver.config.rhs_block_size == 2 and solver.is_fitted


def _as_written_before(record: dict, old: str, new: str) -> dict:
    """``record`` (``{name: value}``) with ``new`` spelled ``old``, as the version before the rename wrote it."""
    return {old if k == new else k: v for k, v in record.items()}


def _rewrite_fit_file(path, old: str, new: str) -> None:
    """A saved fit rewritten as the version before the rename wrote it (its hyperparameter ``old``)."""
    from dask_influence.core import serialization

    record = serialization.load(str(path))
    record["hyperparameters"] = _as_written_before(record["hyperparameters"], old, new)
    serialization.save({k: v for k, v in record.items() if k != "format"}, str(path))
    assert old in serialization.load(str(path))["hyperparameters"]


@pytest.mark.parametrize(("name", "old", "new", "value"), OLD_NEW, ids=["ekfac", "cg"])
def test_a_fit_saved_with_the_old_name_loads_with_the_same_fingerprint(problem, tmp_path, name, old, new, value):
    model, loss, (x, y), (xt, yt) = problem
    solver = _solver(name, model, loss, **{new: value}).fit((x, y))
    solver.save(tmp_path / "fit.pt")
    _rewrite_fit_file(tmp_path / "fit.pt", old, new)
    loaded = _quiet(SOLVERS[name].load, tmp_path / "fit.pt", model, loss, train=(x, y))
    assert getattr(loaded.config, new) == value
    assert loaded.fingerprint() == solver.fingerprint()
    np.testing.assert_array_equal(loaded.influences(xt, yt, x, y).numpy(), solver.influences(xt, yt, x, y).numpy())


def test_the_rename_keeps_the_fingerprints():
    """The fingerprints of unfitted EK-FAC solvers, as the code before the rename (commit 05ae181, when
    the hyperparameter was task=) computed them: a store records its solver's fingerprint, and a resume
    refuses another one."""

    def model():
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        with torch.no_grad():
            for i, p in enumerate(m.parameters()):
                p.copy_(torch.linspace(-1, 1, p.numel(), dtype=torch.float64).reshape(p.shape) * (i + 1) / 4)
        return m

    loss = torch.nn.CrossEntropyLoss()
    inferred = di.EkfacInfluence(model(), loss, regularization=0.1)  # output_curvature 'classification'
    autograd = di.EkfacInfluence(model(), loss, regularization=0.1, output_curvature="autograd")
    assert inferred.fingerprint() == "41341c7553dfa5827f3a0026c1aeabfc"
    assert autograd.fingerprint() == "98e94fbc52c5656954085122cae0d23d"


@pytest.mark.parametrize(("name", "old", "new", "value"), OLD_NEW, ids=["ekfac", "cg"])
def test_a_store_and_its_fit_written_before_the_rename_resume(problem, tmp_path, name, old, new, value):
    import zarr

    from dask_influence.mapping.fitting import fit_path_for

    model, loss, train, test = problem
    store = tmp_path / "out.zarr"

    def run(**kw):
        calc = di.SequentialInfluenceCalculator(_solver(name, model, loss, **{new: value}), progress=False)
        calc.fit(train, train_block_size=10, path=fit_path_for(store))
        calc.influences_to_zarr(test, train, store, test_block_size=3, train_block_size=10, **kw)
        return calc

    _quiet(run)
    group = zarr.open_group(str(store), mode="r+")
    expected = group["influences"][:]
    # as the version before the rename wrote them: the old name in the fit file and the store's parameters
    _rewrite_fit_file(fit_path_for(store), old, new)
    attrs = dict(group.attrs["dask_influence"])
    config = attrs["config"]
    attrs["config"] = {**config, "parameters": _as_written_before(config["parameters"], old, new)}
    group.attrs["dask_influence"] = attrs
    again = _quiet(run, resume=True)
    assert again.last_fit_["reused"]
    after = zarr.open_group(str(store), mode="r").attrs["dask_influence"]
    assert after["config"] == attrs["config"] and after["complete"]
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["influences"][:], expected)


@pytest.mark.parametrize(("name", "old", "new", "value"), OLD_NEW, ids=["ekfac", "cg"])
def test_the_job_file_takes_the_new_solver_key_and_warns_for_the_old(name, old, new, value):
    from dask_influence.errors import JobFileError
    from dask_influence.job import parse_job

    def job(**solver):
        return {"model": {"factory": "f:g"}, "solver": {"method": name, **solver}, "output": {"store": "s.zarr"}}

    assert _quiet(parse_job, job(**{new: value})).solver.params == {new: value}
    with pytest.warns(
        di.RenamedWarning,
        match=rf"^\[solver\] {old} is now spelled {new}; the old spelling still works in this release and will be "
        r"removed in the next\.$",
    ):
        assert parse_job(job(**{old: value})).solver.params == {new: value}
    with pytest.raises(JobFileError, match=rf"\[solver\] pass {new} only \({old} is its old spelling\)\."):
        parse_job(job(**{old: value, new: value}))
    with pytest.raises(JobFileError, match=rf"\[solver\] {new} must be"):  # checked under its new name
        _quiet(parse_job, job(**{new: "no"}))


# -- 6. the job file's keys are the section dataclasses' fields ----------------------------------------
def test_the_job_sections_keys_are_their_dataclasses_fields():
    import dataclasses

    from dask_influence.job import sections

    classes = {
        "model": sections.ModelSection,
        "task": sections.TaskSection,
        "solver": sections.SolverSection,
        "blocks": sections.BlocksSection,
        "output": sections.OutputSection,
        "cluster": sections.ClusterSection,
        "index": sections.IndexSection,
        "evaluate": sections.EvaluateSection,
    }
    assert list(sections.SECTIONS) == list(classes)  # the order "valid sections" lists them in
    for name, cls in classes.items():
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "params"]  # [solver]'s class keys: params
        assert list(sections.SECTIONS[name]) == fields, name
    # a field added to a section is a key at once
    Extra = dataclasses.make_dataclass(
        "Extra", [("new_key", int, dataclasses.field(default=1))], bases=(sections.BlocksSection,), frozen=True
    )
    assert sections.section_keys(Extra) == ("test", "train", "new_key")


def test_ekfac_solver_task_stays_the_objective(problem):
    """Only the keyword and the config's attribute are the old spelling: ``solver.task`` is the Task."""
    model, loss, _, _ = problem
    solver = _quiet(di.EkfacInfluence, model, loss, regularization=LAM, output_curvature="autograd")
    assert isinstance(_quiet(getattr, solver, "task"), di.Task)
    with pytest.raises(AttributeError):
        solver.task = "classification"
    assert solver.config.output_curvature == "autograd"
