"""The job file: a good file parses; each kind of mistake gives its stated message, all at once."""

import textwrap
from pathlib import Path

import pytest

import dask_influence as di
from dask_influence.errors import JobFileError
from dask_influence.job import (
    SOLVER_METHODS,
    Job,
    load_job,
    load_problem,
    make_solver,
    parse_job,
    solver_parameters,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "batch_job"

GOOD = """
[model]
factory = "factory:make_problem"
path = "src"
options = { n_train = 30, n_test = 4 }

[solver]
method = "cg"
regularization = 1e-3
rtol = 1e-8
maxiter = 200
preconditioner = "jacobi"

[blocks]
test = 4
train = 16

[output]
store = "out/influences.zarr"
mode = "up"
top_k = 5
self_influences = true

[cluster]
workers = 2
threads = 1
memory_limit = "1GiB"
"""


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path, text):
    with pytest.raises(JobFileError) as info:
        load_job(write(tmp_path, text))
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err).count("\n") == max(len(err.problems) - 1, 0) + (1 if len(err.problems) > 1 else 0)
    return err.problems


def test_good_file_parses(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    assert isinstance(job, Job) and job.path == tmp_path / "job.toml"
    assert job.model.factory == "factory:make_problem"
    assert job.model.module == "factory" and job.model.function == "make_problem"
    assert job.model.path == (str((tmp_path / "src").resolve()),)
    assert job.model.options == {"n_train": 30, "n_test": 4}
    assert job.solver.method == "cg" and job.solver.solver_class is di.CgInfluence
    assert job.solver.params == {"regularization": 1e-3, "rtol": 1e-8, "maxiter": 200, "preconditioner": "jacobi"}
    assert (job.blocks.test, job.blocks.train) == (4, 16)
    # relative store paths are relative to the job file
    assert job.output.store == str(tmp_path.resolve() / "out" / "influences.zarr")
    assert (job.output.mode, job.output.top_k, job.output.self_influences) == ("up", 5, True)
    c = job.cluster
    assert (c.scheduler, c.workers, c.threads, c.memory_limit, c.gpu, c.sequential) == (
        None,
        2,
        1,
        "1GiB",
        False,
        False,
    )


def test_minimal_file_gets_defaults(tmp_path):
    job = load_job(
        write(
            tmp_path,
            """
        [model]
        factory = "pkg.mod:build"
        [solver]
        method = "Direct"
        [output]
        store = "s3://bucket/influences.zarr"
        [cluster]
        scheduler = "tcp://scheduler:8786"
    """,
        )
    )
    assert job.solver.method == "direct" and job.solver.params == {}
    assert job.model.path == (str(tmp_path.resolve()),)  # default: the job file's directory
    assert (job.blocks.test, job.blocks.train) == (256, 256)
    assert job.output.store == "s3://bucket/influences.zarr"  # URLs are kept as they are
    assert (job.output.mode, job.output.top_k, job.output.self_influences) == ("up", None, False)
    assert job.cluster.scheduler == "tcp://scheduler:8786"


def test_the_example_job_parses():
    job = load_job(EXAMPLE / "job.toml")
    assert job.model.factory == "factory:make_problem" and job.model.path == (str(EXAMPLE.resolve()),)
    assert job.output.store == str(EXAMPLE.resolve() / "influences.zarr")


def test_unknown_keys_get_the_closest_valid_one(tmp_path):
    found = problems(
        tmp_path,
        GOOD.replace("regularization =", "regularisation =")
        .replace("self_influences =", "self_influence =")
        .replace("[cluster]\nworkers", "[cluster]\nworker"),
    )
    assert found == [
        "[solver] unknown key 'regularisation'; did you mean 'regularization'?",
        "[output] unknown key 'self_influence'; did you mean 'self_influences'?",
        "[cluster] unknown key 'worker'; did you mean 'workers'?",
    ]


def test_unknown_key_without_a_close_one_lists_the_valid_keys(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace("\ntest = 4", "\ntest = 4\nzzz = 1"))
    assert msg == "[blocks] unknown key 'zzz'; valid keys: test, train."


def test_unknown_section_and_missing_sections(tmp_path):
    found = problems(
        tmp_path,
        """
        [modle]
        factory = "f:g"
        [solver]
        method = "direct"
    """,
    )
    assert found[0] == "unknown section [modle]; did you mean [model]?"
    assert any(p.startswith("[model] section is missing") for p in found)
    assert any(p.startswith("[output] section is missing") for p in found)


def test_wrong_types_name_the_section_key_and_value(tmp_path):
    text = (
        GOOD.replace("train = 16", 'train = "big"')
        .replace("test = 4", "test = 0")
        .replace("top_k = 5", "top_k = 2.5")
        .replace("self_influences = true", 'self_influences = "yes"')
        .replace("threads = 1", "threads = -1")
        .replace('memory_limit = "1GiB"', 'memory_limit = "lots"')
        .replace('mode = "up"', 'mode = "down"')
        .replace("maxiter = 200", 'maxiter = "many"')
    )
    found = problems(tmp_path, text)
    assert found == [
        "[solver] maxiter must be an integer; got 'many'.",
        "[blocks] test must be a positive integer; got 0.",
        "[blocks] train must be a positive integer; got 'big'.",
        '[output] mode must be "up" or "perturbation"; got \'down\'.',
        "[output] top_k must be a positive integer; got 2.5.",
        "[output] self_influences must be true or false; got 'yes'.",
        "[cluster] threads must be a positive integer; got -1.",
        '[cluster] memory_limit must be a number of bytes, a size such as "4GiB", or "auto"; got \'lots\'.',
    ]


def test_solver_method_and_parameters(tmp_path):
    (msg,) = problems(tmp_path, GOOD.replace('method = "cg"', 'method = "cgg"'))
    from dask_influence.core.solvers import SOLVERS

    # the names come from the registry (a solver added there is listed without editing this test)
    assert msg == f"[solver] unknown method 'cgg'; choose one of {', '.join(SOLVERS)}; did you mean 'cg'?"
    found = problems(
        tmp_path,
        """
        [model]
        factory = "f:g"
        [solver]
        method = "nystroem"
        rank = 1.5
        curvature = 2
        [output]
        store = "x.zarr"
    """,
    )
    assert found == [
        "[solver] rank must be an integer or a string; got 1.5.",
        "[solver] curvature must be a string; got 2.",
        "[solver] regularization is required for method 'nystroem'.",
    ]
    # a parameter valid for one method is unknown for another, and Python objects cannot be given
    found = problems(tmp_path, GOOD.replace('preconditioner = "jacobi"', 'preconditioner = "jacobi"\nh0 = 1.0'))
    assert found[0].startswith("[solver] unknown key 'h0'; valid keys for method 'cg': method, regularization")
    (msg,) = problems(
        tmp_path,
        GOOD.replace('method = "cg"', 'method = "lissa"')
        .replace('preconditioner = "jacobi"', "h0 = 1.0")
        .replace("rtol = 1e-8\n", ""),
    )
    assert msg == "[solver] h0 cannot be set in a job file (it needs a Python object); got 1.0."


def test_solver_values_are_checked_when_the_file_loads(tmp_path):
    """A value of the right type that the solver's configuration refuses fails at load time, in one
    line naming the file, the key, the value and what is accepted."""
    arnoldi = GOOD.replace('method = "cg"', 'method = "arnoldi"').replace(
        'rtol = 1e-8\nmaxiter = 200\npreconditioner = "jacobi"\n', 'rank = "ten"\n'
    )
    path = write(tmp_path, arnoldi)
    with pytest.raises(JobFileError) as info:
        load_job(path)
    assert str(info.value) == f"{path}: [solver] rank must be a positive int or 'auto'; got 'ten'."
    path = write(tmp_path, GOOD.replace("rtol = 1e-8", 'rtol = 1e-8\ncurvature = "hesian"'), name="cg.toml")
    with pytest.raises(JobFileError) as info:
        load_job(path)
    assert str(info.value) == f"{path}: [solver] curvature must be one of ['hessian', 'ggn']; got 'hesian'."
    assert load_job(write(tmp_path, arnoldi.replace('rank = "ten"', 'rank = "auto"'), name="auto.toml"))


def test_solver_parameters_follow_the_class_signatures():
    for method, name in SOLVER_METHODS.items():
        params = solver_parameters(method)
        assert "regularization" in params and "model" not in params and "loss" not in params, method
        assert getattr(di, name)
    assert "update_diagonal" in solver_parameters("ekfac") and "rank" in solver_parameters("arnoldi")


def test_model_output_and_cluster_rules(tmp_path):
    found = problems(
        tmp_path,
        """
        [model]
        factory = "factory.make_problem"
        path = 3
        options = "fast"
        [solver]
        method = "direct"
        [output]
        mode = "perturbation"
        top_k = 3
        [cluster]
        scheduler = "tcp://127.0.0.1:8786"
        workers = 2
        gpu = "yes"
    """,
    )
    assert found == [
        '[model] factory must be "module:function" (e.g. "factory:make_problem"); got \'factory.make_problem\'.',
        "[model] path must be a directory or a list of directories; got 3.",
        "[model] options must be a table of keyword arguments for the factory; got 'fast'.",
        '[output] store is required: the path or URL of the zarr store, e.g. "influences.zarr".',
        '[output] top_k needs mode = "up" (perturbation influences have one value per feature); '
        'remove top_k or set mode = "up".',
        "[cluster] gpu must be true or false; got 'yes'.",
        "[cluster] give either scheduler or local settings (workers), not both: a running scheduler has "
        "its own workers.",
    ]


def test_a_section_that_is_not_a_table(tmp_path):
    found = problems(
        tmp_path, 'solver = "cg"\n' + GOOD.split("[blocks]")[0].split("[solver]")[0] + '[output]\nstore = "x"\n'
    )
    assert found == ["[solver] must be a table (a [solver] section); got 'cg'."]


def test_message_lists_every_problem_one_per_line(tmp_path):
    path = write(tmp_path, GOOD.replace("train = 16", "train = 0").replace("rtol =", "rtl ="))
    with pytest.raises(JobFileError) as info:
        load_job(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 2 problems:"
    assert lines[1:] == [
        "[solver] unknown key 'rtl'; did you mean 'rtol'?",
        "[blocks] train must be a positive integer; got 0.",
    ]


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(JobFileError, match="does not exist"):
        load_job(tmp_path / "nope.toml")
    with pytest.raises(JobFileError, match=r"not valid TOML: .*line 2"):
        load_job(write(tmp_path, "[model]\nfactory = \n"))


def test_parse_job_from_a_dict(tmp_path):
    job = parse_job(
        {
            "model": {"factory": "m:f"},
            "solver": {"method": "ekfac", "update_diagonal": False},
            "output": {"store": "a.zarr"},
        },
        base_dir=tmp_path,
    )
    assert job.output.store == str(tmp_path / "a.zarr") and job.path is None


def test_factory_is_imported_from_the_search_path_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    (tmp_path / "jobfactory_ok.py").write_text(
        textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset

        def build(n=6):
            torch.manual_seed(0)
            x, y = torch.randn(n, 2, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64)
            return {"model": torch.nn.Linear(2, 1).double(), "loss": torch.nn.MSELoss(),
                    "train": TensorDataset(x, y), "test": TensorDataset(x[:2], y[:2])}

        def broken():
            return {"model": "not a model", "loss": 3, "train": 5, "test": iter([])}

        def partial():
            return {"model": torch.nn.Linear(2, 1)}
    """)
    )
    base = '[solver]\nmethod = "direct"\nregularization = 0.1\n[output]\nstore = "x.zarr"\n[model]\n'
    job = load_job(write(tmp_path, base + 'factory = "jobfactory_ok:build"\noptions = { n = 8 }\n'))
    problem = load_problem(job)
    assert len(problem.train) == 8 and len(problem.test) == 2
    solver = make_solver(job, problem.model, problem.loss)
    assert isinstance(solver, di.DirectInfluence) and solver.regularization == 0.1

    with pytest.raises(JobFileError) as info:
        load_problem(load_job(write(tmp_path, base + 'factory = "jobfactory_ok:broken"\n')))
    assert len(info.value.problems) == 4
    assert "returned a model of type str; return a torch.nn.Module" in str(info.value)
    assert "returned test of type list_iterator; return a map-style torch Dataset" in str(info.value)
    with pytest.raises(JobFileError, match="without loss, train, test; return a dict with model, loss, train"):
        load_problem(load_job(write(tmp_path, base + 'factory = "jobfactory_ok:partial"\n')))
    with pytest.raises(JobFileError, match=r"has no 'biuld'; did you mean 'build'\?"):
        load_problem(load_job(write(tmp_path, base + 'factory = "jobfactory_ok:biuld"\n')))
    with pytest.raises(JobFileError, match=r"cannot import module 'no_such_factory_mod'.*Set \[model\] path"):
        load_problem(load_job(write(tmp_path, base + 'factory = "no_such_factory_mod:build"\n')))


def test_two_jobs_with_factories_of_the_same_name(tmp_path, monkeypatch):
    """The second job imports its own factory.py, not the first one's from sys.modules."""
    import sys

    monkeypatch.setattr("sys.path", list(sys.path))
    monkeypatch.setattr("sys.modules", dict(sys.modules))
    jobs = []
    for n in (5, 7):
        directory = tmp_path / f"job{n}"
        directory.mkdir()
        (directory / "jobfac_same_name.py").write_text(
            textwrap.dedent(f"""
            import torch
            from torch.utils.data import TensorDataset

            def build():
                x, y = torch.zeros({n}, 2), torch.zeros({n}, 1)
                return {{"model": torch.nn.Linear(2, 1), "loss": torch.nn.MSELoss(),
                        "train": TensorDataset(x, y), "test": TensorDataset(x, y)}}
        """)
        )
        jobs.append(
            load_job(
                write(
                    directory,
                    '[model]\nfactory = "jobfac_same_name:build"\n'
                    '[solver]\nmethod = "direct"\n[output]\nstore = "x.zarr"\n',
                )
            )
        )
    assert [len(load_problem(job).train) for job in jobs] == [5, 7]


MINIMAL = """
[model]
factory = "factory:make_problem"
[solver]
method = "direct"
[output]
store = "x.zarr"
"""


def test_task_section_names_a_ready_made_task_or_a_factory(tmp_path):
    job = load_job(write(tmp_path, MINIMAL + '[task]\nname = "causal_lm"\noptions = { measurement = "log_prob" }\n'))
    assert job.task.name == "causal_lm" and job.task.options == {"measurement": "log_prob"}
    found = problems(tmp_path, MINIMAL + '[task]\nname = "clasification"\nfactory = "a:b"\n')
    assert found == [
        '[task] needs either name (a ready-made task: "classification", "regression", "causal_lm") '
        'or factory ("module:function" returning a dask_influence.Task), not both.'
    ]
    found = problems(tmp_path, MINIMAL + '[task]\nname = "clasification"\n')
    assert found[0].startswith("[task] name must be one of classification, regression, causal_lm; got 'clasification'")
    assert "classification" in found[0].split(";")[-1]
    found = problems(tmp_path, MINIMAL + '[task]\nfactory = "no colon"\nopts = 1\n')
    assert any("unknown key 'opts'" in p for p in found) and any(
        'factory must be "module:function"' in p for p in found
    )


def test_task_factory_must_return_a_task(tmp_path):
    (tmp_path / "mytasks.py").write_text(
        "import dask_influence as di\n"
        "def good(scale=1.0):\n"
        "    return di.tasks.regression()\n"
        "def bad():\n"
        "    return 3\n"
    )
    (tmp_path / "factory.py").write_text(
        "import torch\n"
        "def make_problem():\n"
        "    x, y = torch.randn(8, 2), torch.randn(8, 1)\n"
        "    data = [{'x': x[i], 'labels': y[i]} for i in range(8)]\n"
        "    return {'model': torch.nn.Linear(2, 1), 'train': data, 'test': data}\n"
    )
    from dask_influence.job import load_task

    job = load_job(write(tmp_path, MINIMAL + '[task]\nfactory = "mytasks:good"\noptions = { scale = 2.0 }\n'))
    assert isinstance(load_task(job), di.Task)
    problem = load_problem(job)  # the factory need not return a loss with [task]
    assert isinstance(problem.loss, di.Task)
    job = load_job(write(tmp_path, MINIMAL + '[task]\nfactory = "mytasks:bad"\n'))
    with pytest.raises(
        JobFileError, match=r"\[task\] factory 'mytasks:bad' returned a int; return a dask_influence.Task"
    ):
        load_task(job)
    job = load_job(write(tmp_path, MINIMAL + '[task]\nname = "regression"\noptions = { nope = 1 }\n'))
    with pytest.raises(JobFileError, match=r"\[task\] name 'regression' does not take options"):
        load_task(job)


def test_every_path_key_follows_one_rule(tmp_path, monkeypatch):
    """~ expanded, relative paths taken from the job file's directory (normalized), URLs kept,
    for every key that names a path (before session 9, [index] store = "~/idx.zarr" became
    <job dir>/~/idx.zarr and the security files kept a literal ~)."""
    from dask_influence.job import resolve_path

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    base = tmp_path / "jobdir"

    def job_with(value):
        return parse_job(
            {
                "model": {"factory": "f:g", "path": value},
                "solver": {"method": "direct", "fit_file": value},
                "output": {"store": value},
                "index": {"store": value},
                "evaluate": {"retrain": "a:b", "store": value},
                "cluster": {
                    "scheduler": "tls://127.0.0.1:8786",
                    "security": {"ca_file": value, "cert": value, "key": value},
                },
            },
            base_dir=base,
        )

    for value, expected in [
        ("~/idx.zarr", str(home / "idx.zarr")),
        ("out/../idx.zarr", str(base / "idx.zarr")),
        (str(tmp_path / "abs.zarr"), str(tmp_path / "abs.zarr")),
        ("memory://bucket/idx.zarr", "memory://bucket/idx.zarr"),
    ]:
        assert resolve_path(value, base) == expected
        if value.startswith("memory://"):
            continue  # a URL is no [model] path or certificate file
        job = job_with(value)
        found = {
            "[model] path": job.model.path[0],
            "[solver] fit_file": job.solver.fit_file,
            "[output] store": job.output.store,
            "[index] store": job.index.store,
            "[evaluate] store": job.evaluate.store,
            "[cluster] security ca_file": job.cluster.security.ca_file,
        }
        assert found == dict.fromkeys(found, expected), value


def _documented_defaults(section: str) -> dict[str, str]:
    """``key -> default`` as docs/cli.md's table of ``[section]`` writes it."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    table = text.split(f"### `[{section}]`", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| `")]
    return {row[1].strip().strip("`"): row[3].strip() for row in rows}


def test_index_and_evaluate_defaults_are_the_apis_and_the_docs_say_them():
    """[index] and [evaluate] take their defaults from GradientIndex.build and di.evaluate.lds/loo
    (one source of truth), and docs/cli.md's tables show the same values."""
    import inspect

    from dask_influence.job import EvaluateSection, IndexSection

    build = inspect.signature(di.GradientIndex.build).parameters
    index = IndexSection(store="x")
    lds = inspect.signature(di.evaluate.lds).parameters
    evaluate = EvaluateSection(retrain="a:b")
    for key in ("projection_dim", "projection", "seed", "dtype", "preconditioner", "curvature", "regularization"):
        assert getattr(index, key) == build[key].default, key
    for key in ("n_subsets", "fraction", "seeds", "seed", "confidence", "n_bootstrap"):
        assert getattr(evaluate, key) == lds[key].default, key

    def shown(value):
        return f'`"{value}"`' if isinstance(value, str) else str(value)

    for section, values in (("index", index), ("evaluate", evaluate)):
        documented = _documented_defaults(section)
        for key, text in documented.items():
            described = ("store", "layers", "factor_rank", "options", "methods", "corrupted", "retrain")  # in words
            if hasattr(values, key) and key not in described:
                value = getattr(values, key)
                if isinstance(value, bool):
                    assert text == f"`{str(value).lower()}`", (section, key, text)
                else:
                    assert text == shown(value), (section, key, text)


def test_loading_the_factory_leaves_sys_path_as_it_was(tmp_path):
    """The factory's directory is searched while its module is imported and its factory called,
    then taken off sys.path again (it stayed there for the rest of the process before session 9)."""
    import sys

    (tmp_path / "pathfactory.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    import pathhelper  # a neighbour imported when the factory is called\n"
        "    return pathhelper.problem()\n"
    )
    (tmp_path / "pathhelper.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "def problem():\n"
        "    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))\n"
        "    return {'model': nn.Linear(3, 2), 'loss': nn.CrossEntropyLoss(), 'train': TensorDataset(x, y),"
        " 'test': TensorDataset(x[:2], y[:2])}\n"
    )
    job = parse_job(
        {
            "model": {"factory": "pathfactory:make", "path": str(tmp_path)},
            "solver": {"method": "direct"},
            "output": {"store": "s.zarr"},
        },
        base_dir=tmp_path,
    )
    before = list(sys.path)
    try:
        problem = load_problem(job)
        assert len(problem.train) == 8
        assert sys.path == before
    finally:
        for name in ("pathfactory", "pathhelper"):
            sys.modules.pop(name, None)
