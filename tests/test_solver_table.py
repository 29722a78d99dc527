"""The solver table of docs/solvers.md is the one docs/gen_solver_table.py renders from the registry,
and the how-to-add-a-solver example of docs/architecture.md runs as documented."""

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLVERS_MD = ROOT / "docs" / "solvers.md"
ARCHITECTURE_MD = ROOT / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_solver_table", ROOT / "docs" / "gen_solver_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_solvers_md_holds_the_generated_table(gen):
    documented = gen.region(SOLVERS_MD.read_text(encoding="utf-8"))
    assert documented == gen.render_table(), (
        "docs/solvers.md's solver table differs from the code; run: .venv/bin/python docs/gen_solver_table.py"
    )
    assert gen.main(["--check"]) == 0


def test_every_registered_solver_is_in_the_table(gen):
    from dask_influence.core.solvers import SOLVERS

    # solvers registered by other code (a test's toy solver) are not part of the docs
    builtin = {name: cls for name, cls in SOLVERS.items() if cls.__module__.startswith("dask_influence.")}
    assert gen.builtin_solvers() == builtin
    assert {"direct", "cg", "lissa", "arnoldi", "nystroem", "ekfac"} <= set(builtin)
    text = SOLVERS_MD.read_text(encoding="utf-8")
    table = gen.region(text)
    listed = re.findall(r"^\*\*`([^`]+)`\*\*: ", table, flags=re.MULTILINE)
    assert listed == list(builtin)
    for name, cls in builtin.items():
        section = table.split(f"**`{name}`**: ", 1)[1].split("\n**`", 1)[0]
        assert f"[`{cls.__name__}`](#{cls.__name__.lower()})" in section
        for field in cls.config_class.field_names():
            assert f"| `{field}` |" in section, (name, field)
        # the table links the solver's own section of the page
        assert re.search(rf"^## {cls.__name__}$", text, flags=re.MULTILINE), f"docs/solvers.md lacks ## {cls.__name__}"


def test_hand_written_solver_lists_name_every_registered_solver(gen):
    """The places that list the solvers in prose (not generated) name every built-in one, so that a
    new solver cannot leave them stale without this test failing."""
    builtin = gen.builtin_solvers()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cli_md = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    method_row = next(line for line in cli_md.splitlines() if line.startswith("| `method` |"))
    jobfile_doc = (ROOT / "src" / "dask_influence" / "job" / "__init__.py").read_text(encoding="utf-8")
    method_comment = next(line for line in jobfile_doc.splitlines() if line.strip().startswith('method = "cg"'))
    for name, cls in builtin.items():
        assert f"| `{cls.__name__}` |" in readme, f"README.md's solver table lacks {cls.__name__}"
        assert f"`{name}` (`{cls.__name__}`)" in method_row, f"docs/cli.md's [solver] method row lacks {name}"
        assert re.search(rf"\b{name}\b", method_comment), f"job/__init__.py's example job lacks {name}"


def test_rendering_of_types_and_defaults(gen):
    from typing import Any

    from dask_influence.core.solvers.config import REQUIRED

    assert gen.format_type(int | None) == "int or None"
    assert gen.format_type(tuple[str, ...] | None) == "tuple of str or None"
    assert gen.format_type(Any) == "any"
    assert gen.format_default(REQUIRED) == "required"
    assert gen.format_default("full") == '`"full"`'
    assert gen.format_default(None) == "`None`"
    assert gen.escape("a | b * c_d") == "a \\| b \\* c\\_d"


DRIVER = textwrap.dedent(
    """\
    import sys

    import pytest
    import torch
    from torch import nn

    import dask_influence as di
    from dask_influence.core.solvers.base import InfluenceModel
    from dask_influence.core.solvers.registry import SOLVERS
    from dask_influence.errors import JobFileError
    from dask_influence.job import parse_job

    from diagonal_solver import DiagonalInfluence

    assert SOLVERS["diagonal"] is DiagonalInfluence and DiagonalInfluence.method == "diagonal"
    torch.manual_seed(0)
    x = torch.randn(30, 3, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(30, dtype=torch.float64)
    model = nn.Linear(3, 1).double().eval()


    def loss(outputs, targets):
        return nn.functional.mse_loss(outputs.squeeze(-1), targets)


    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    solver = DiagonalInfluence(model, loss, regularization=0.1, num_probes=2000).fit(loader)
    exact = torch.diagonal(di.DirectInfluence(model, loss).fit((x, y)).hessian)
    assert float((solver.state_.diagonal - exact).abs().max()) < 0.05 * float(exact.abs().max())

    # influences are those of the diagonal curvature
    g_test, g = solver.per_sample_grads(x[:4], y[:4]), solver.per_sample_grads(x, y)
    expected = (g_test / (solver.state_.diagonal + 0.1)) @ g.T
    influences = solver.influences(x[:4], y[:4], x, y)
    assert torch.allclose(influences, expected, rtol=1e-12, atol=1e-14)

    # saved fits load, by the class or by the registered name in the file
    solver.save(sys.argv[1])
    for cls in (DiagonalInfluence, InfluenceModel):
        loaded = cls.load(sys.argv[1], model, loss)
        assert type(loaded) is DiagonalInfluence and loaded.config == solver.config
        assert torch.equal(loaded.influences(x[:4], y[:4], x, y), influences)

    # solve-time hyperparameters change without a refit, the others need one
    solver.regularization = 0.5
    with pytest.raises(ValueError, match="num_probes.*needs a new fit"):
        solver.num_probes = 3

    # the calculators' fitting path gives the same state
    blockwise = DiagonalInfluence(model, loss, regularization=0.1, num_probes=2000)
    di.SequentialInfluenceCalculator(blockwise, progress=False).fit((x.numpy(), y.numpy()), train_block_size=7)
    assert torch.allclose(blockwise.state_.diagonal, solver.state_.diagonal, rtol=1e-12, atol=1e-14)

    # job files take the method and the config's fields
    table = {"model": {"factory": "factory:make"}, "output": {"store": "out.zarr"}}
    job = parse_job({**table, "solver": {"method": "diagonal", "num_probes": 16}}, base_dir=".")
    assert job.solver.solver_class is DiagonalInfluence and job.solver.params == {"num_probes": 16}
    with pytest.raises(JobFileError, match="num_probes must be an integer"):
        parse_job({**table, "solver": {"method": "diagonal", "num_probes": "many"}}, base_dir=".")
    print("example ok")
    """
)


def test_the_how_to_add_a_solver_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", ARCHITECTURE_MD.read_text(encoding="utf-8"), flags=re.DOTALL)
    examples = [block for block in blocks if '@register("diagonal")' in block]
    assert len(examples) == 1, "docs/architecture.md should hold one example solver registered as 'diagonal'"
    (tmp_path / "diagonal_solver.py").write_text(examples[0], encoding="utf-8")
    (tmp_path / "drive.py").write_text(DRIVER, encoding="utf-8")
    # a fresh interpreter: the example's registry entry and state class stay out of this session
    result = subprocess.run(
        [sys.executable, str(tmp_path / "drive.py"), str(tmp_path / "fit.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "example ok" in result.stdout
