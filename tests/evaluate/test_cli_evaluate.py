"""`dask-influence evaluate JOB.toml`: the [evaluate] section, results in the store, inspect and plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from dask_influence.cli.main import cli
from dask_influence.errors import JobFileError
from dask_influence.job import EvaluateSection, parse_job

HERE = Path(__file__).parent

JOB = """
[model]
factory = "evaljob:make_problem"

[solver]
method = "direct"
regularization = 0.05

[blocks]
test = 4
train = 16

[output]
store = "scores.zarr"
self_influences = true

[cluster]
sequential = true

[evaluate]
retrain = "evaljob:train"
options = { steps = 60 }
methods = ["lds", "loo", "mislabel"]
n_subsets = 12
points = 6
corrupted = [0, 15, 30, 45]
"""


@pytest.fixture
def job(tmp_path):
    shutil.copy(HERE / "evaljob.py", tmp_path / "evaljob.py")
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    result = CliRunner().invoke(cli, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    return path


def test_evaluate_writes_results_that_inspect_and_plot_show(job, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", str(job), "--quiet"])
    assert result.exit_code == 0, result.output
    print(result.output)
    lines = result.output.strip().splitlines()
    assert (
        lines[0].startswith("LDS: mean ")
        and "(12 subsets of 0.5 x 1 seed(s); 12 retrained, 0 already done)" in lines[0]
    )
    assert lines[1].startswith("LOO: Pearson ") and "7 retrained" in lines[1]
    assert lines[2].startswith("Mislabel detection AUC: mean influence ") and "self influence" in lines[2]
    group = zarr.open_group(str(tmp_path / "scores.zarr"), mode="r")
    results = {k: group[f"evaluation/{k}"].attrs["dask_influence_evaluation"]["result"] for k in ("lds", "loo")}
    assert results["lds"]["lds_mean"] >= 0.9
    assert results["loo"]["pearson"] >= 0.99

    again = runner.invoke(cli, ["evaluate", str(job), "--quiet"])
    assert again.exit_code == 0, again.output
    assert "0 retrained, 12 already done" in again.output and "0 retrained, 7 already done" in again.output

    shown = runner.invoke(cli, ["inspect", str(tmp_path / "scores.zarr"), "--no-stats"])
    assert shown.exit_code == 0, shown.output
    assert "Evaluation (dask-influence evaluate" in shown.output
    assert "lds        12/12 retrainings" in shown.output and "LDS mean" in shown.output
    assert "LOO Pearson" in shown.output and "AUC mean influence" in shown.output
    as_json = json.loads(runner.invoke(cli, ["inspect", str(tmp_path / "scores.zarr"), "--json", "--no-stats"]).output)
    assert as_json["evaluation"]["lds"]["runs_done"] == 12

    for name in ("lds", "loo"):
        out = tmp_path / f"{name}.png"
        drawn = runner.invoke(cli, ["plot", str(tmp_path / "scores.zarr"), "-o", str(out), "--evaluation", name])
        assert drawn.exit_code == 0, drawn.output
        assert out.stat().st_size > 1000 and f"Wrote {out}: {name} ({name})" in drawn.output
    missing = runner.invoke(cli, ["plot", str(tmp_path / "scores.zarr"), "-o", "x.png", "--evaluation", "nope"])
    assert missing.exit_code == 1 and "has no evaluation 'nope' (it has lds, loo, mislabel)" in missing.output


def test_evaluate_needs_a_complete_store_and_the_section(tmp_path):
    shutil.copy(HERE / "evaljob.py", tmp_path / "evaljob.py")
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    result = CliRunner().invoke(cli, ["evaluate", str(path)])
    assert result.exit_code == 1 and "No store at" in result.output
    path.write_text(JOB.split("[evaluate]")[0])
    result = CliRunner().invoke(cli, ["evaluate", str(path)])
    assert result.exit_code == 1 and "no [evaluate] section; add one" in result.output


def test_evaluate_section_is_validated_all_at_once(tmp_path):
    base = {"model": {"factory": "f:g"}, "solver": {"method": "direct"}, "output": {"store": "s.zarr"}}
    job = parse_job(
        {**base, "evaluate": {"retrain": "retrain:train", "store": "other.zarr", "points": [1, 2]}}, base_dir=tmp_path
    )
    assert job.evaluate == EvaluateSection(retrain="retrain:train", store=str(tmp_path / "other.zarr"), points=(1, 2))
    bad = {
        "retrain": "not a function",
        "methods": ["lds", "shapley"],
        "n_subsets": 1,
        "fraction": 1.0,
        "points": "all",
        "warm_start": "yes",
        "n_subset": 3,
    }
    with pytest.raises(JobFileError) as info:
        parse_job({**base, "evaluate": bad}, base_dir=tmp_path)
    problems = info.value.problems
    assert len(problems) == 7, problems
    assert "[evaluate] unknown key 'n_subset'; did you mean 'n_subsets'?" in problems
    assert any(p.startswith('[evaluate] retrain must be "module:function"') for p in problems)
    assert any(p.startswith("[evaluate] methods must be a list of 'lds', 'loo', 'mislabel'") for p in problems)
    assert "[evaluate] n_subsets must be an integer of at least 2; got 1." in problems
    assert any(p.startswith("[evaluate] fraction must be a number between 0 and 1") for p in problems)
    with pytest.raises(JobFileError, match="needs corrupted"):
        parse_job({**base, "evaluate": {"retrain": "a:b", "methods": ["mislabel"]}}, base_dir=tmp_path)


def test_old_spellings_of_evaluate_keys_warn_and_name_the_new_ones(tmp_path):
    """[evaluate] train, loo_points and bootstrap (before session 9) still parse, each with a
    RenamedWarning naming the key of di.evaluate it became; both spellings at once are refused."""
    from dask_influence.errors import RenamedWarning

    base = {"model": {"factory": "f:g"}, "solver": {"method": "direct"}, "output": {"store": "s.zarr"}}
    old = {"train": "retrain:train", "loo_points": [1, 2], "bootstrap": 200}
    with pytest.warns(RenamedWarning) as caught:
        job = parse_job({**base, "evaluate": old}, base_dir=tmp_path)
    assert job.evaluate == EvaluateSection(retrain="retrain:train", points=(1, 2), n_bootstrap=200)
    assert sorted(str(w.message).split(";")[0] for w in caught) == [
        "[evaluate] bootstrap is now spelled n_bootstrap",
        "[evaluate] loo_points is now spelled points",
        "[evaluate] train is now spelled retrain",
    ]
    with pytest.raises(JobFileError) as info:
        parse_job({**base, "evaluate": {"train": "a:b", "retrain": "a:b"}}, base_dir=tmp_path)
    assert info.value.problems == ["[evaluate] pass retrain only (train is its old spelling)."]


def test_evaluate_refuses_a_degenerate_fraction_and_repairs_a_damaged_run(job, tmp_path):
    """Issue 31 items 9 and the evaluation store's verification, through the command line."""
    import os

    runner = CliRunner()
    job.write_text(JOB.replace("n_subsets = 12", "n_subsets = 12\nfraction = 0.995"))
    refused = runner.invoke(cli, ["evaluate", str(job), "--quiet"])
    assert refused.exit_code == 1
    errors = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: fraction=0.995 keeps round(0.995 * 60) = 60 of the 60 training points (all 60 training points): "
        "every subset would be the whole training set and the LDS undefined. Pass a fraction from 0.01667 to "
        "0.9833 (e.g. 0.5)."
    ], refused.output
    job.write_text(JOB)
    assert runner.invoke(cli, ["evaluate", str(job), "--quiet"]).exit_code == 0
    os.remove(tmp_path / "scores.zarr" / "evaluation" / "lds" / "measurements" / "c" / "4" / "0")
    with pytest.warns(RuntimeWarning, match=r"had 1 recorded run\(s\) that cannot be read, retrained now: subset 4"):
        again = runner.invoke(cli, ["evaluate", str(job), "--quiet"])
    assert again.exit_code == 0, again.output
    assert "1 retrained, 11 already done" in again.output and "0 retrained, 7 already done" in again.output
