"""`rank --by self` and `plot --by self`: the stored self-influences, highest first, against
the in-memory solver's; refusals for stores without them; the text example's measured claim."""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.mapping.store import ATTR
from jobs import invoke, load_example_factory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "batch_job"
N_TRAIN, N_TEST, TEST_BLOCK, TRAIN_BLOCK = 90, 14, 7, 30
NO_SELF = (
    "Error: `{command}` needs self-influences and this store has none; set `self_influences = true` under "
    "[output] in the job file and run it again with --overwrite."
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A store with self-influences, a copy whose middle train block's are not done, one without."""
    factory = load_example_factory(EXAMPLE)
    problem = factory.make_problem(n_train=N_TRAIN, n_test=N_TEST)
    solver = di.DirectInfluence(problem["model"], problem["loss"], regularization=1e-3)
    train = DataLoader(problem["train"], batch_size=TRAIN_BLOCK)
    test = DataLoader(problem["test"], batch_size=TEST_BLOCK)
    solver.fit(train)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    root = tmp_path_factory.mktemp("self_stores")
    with_self = root / "self.zarr"
    calc.influences_to_zarr(test, train, with_self, self_influences=True)
    partial = root / "partial.zarr"
    shutil.copytree(with_self, partial)
    group = zarr.open_group(str(partial), mode="r+")
    group["self_influences_done"][1] = 0  # train block 1 (points 30..59) not done
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}
    without = root / "plain.zarr"
    calc.influences_to_zarr(test, train, without)
    return {
        "self": with_self,
        "partial": partial,
        "plain": without,
        "expected": solver.self_influences(*problem["train"].tensors).numpy().astype(np.float64),
        "influences": zarr.open_group(str(with_self), mode="r")["influences"][...].astype(np.float64),
    }


def test_rank_by_self_lists_the_highest_self_influences_of_the_solver(stores):
    expected = stores["expected"]
    order = np.argsort(-expected, kind="stable")
    result = invoke("rank", stores["self"], "--by", "self", "-n", 7, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["by"] == "self" and data["order"] == "highest"
    assert [row["index"] for row in data["rows"]] == order[:7].tolist()
    np.testing.assert_allclose([row["self_influence"] for row in data["rows"]], expected[order[:7]], rtol=1e-5)
    mean = stores["influences"].mean(axis=0)
    np.testing.assert_allclose([row["mean"] for row in data["rows"]], mean[order[:7]], rtol=1e-5, atol=1e-9)

    text = invoke("rank", stores["self"], "--by", "self", "-n", 3).output.splitlines()
    assert text[0] == (
        "3 highest self-influences (suspects of mislabeling) of 90 training points (mean influence over 14 test "
        "points alongside):"
    )
    assert text[1].split() == ["rank", "index", "self", "mean", "min", "max"]
    assert [int(line.split()[1]) for line in text[2:]] == order[:3].tolist()
    assert float(text[2].split()[2]) == pytest.approx(expected[order[0]], rel=1e-5)

    csv = invoke("rank", stores["self"], "--by", "self", "--all", "--format", "csv").output.splitlines()
    assert csv[0] == "rank,index,self_influence,mean,min,max,test_points"
    assert [int(line.split(",")[1]) for line in csv[1:]] == order.tolist()


def test_rank_by_mean_is_still_the_default_and_unchanged(stores):
    mean = stores["influences"].mean(axis=0)
    data = json.loads(invoke("rank", stores["self"], "-n", 5, "--format", "json").output)
    assert data["by"] == "mean" and data["order"] == "harmful"
    assert [row["index"] for row in data["rows"]] == np.argsort(mean, kind="stable")[:5].tolist()
    assert "self_influence" not in data["rows"][0]


def test_rank_and_plot_by_self_refuse_a_store_without_self_influences(stores, tmp_path):
    result = invoke("rank", stores["plain"], "--by", "self")
    assert result.exit_code == 1
    assert result.output.strip() == NO_SELF.format(command="rank --by self")
    result = invoke("plot", stores["plain"], "--by", "self", "-o", tmp_path / "s.png")
    assert result.exit_code == 1
    assert result.output.strip() == NO_SELF.format(command="plot --by self")
    assert not (tmp_path / "s.png").exists()


def test_rank_by_self_refuses_order(stores):
    result = invoke("rank", stores["self"], "--by", "self", "--order", "helpful")
    assert result.exit_code == 2
    assert (
        "Error: --by self lists the highest self-influence first (the suspects); drop --order, which ranks by "
        "influence on the test points (--by mean|min|max)." in result.output
    )


def test_rank_by_self_on_an_incomplete_store_leaves_out_the_blocks_not_done(stores):
    expected = stores["expected"].copy()
    expected[30:60] = -np.inf  # not done: left out
    result = CliRunner().invoke(cli, ["rank", str(stores["partial"]), "--by", "self", "--all", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["index"] for row in data["rows"]] == np.argsort(-expected, kind="stable")[:60].tolist()
    assert (
        "Warning: 30 training point(s) have no self-influence computed yet (their train blocks are not done); "
        "rerun the job with --resume." in result.stderr
    )


def test_plot_by_self_draws_the_self_influences_and_counts_the_suspects(stores, tmp_path):
    expected = stores["expected"]
    top = np.argsort(-expected, kind="stable")[:4]
    suspects = sorted(top[:3].tolist() + [int(np.argmin(expected))])  # 3 of the 4 highest, and the lowest
    out = tmp_path / "self.png"
    result = invoke("plot", stores["self"], "--by", "self", "-o", out, "--suspects", ",".join(map(str, suspects)))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"Wrote {out}: self-influence of 90 training points."
    others = np.delete(expected, suspects).mean()
    assert lines[1] == (
        f"Suspects: 4 marked; self-influence {expected[suspects].mean():.4g} (others {others:.4g}); 3 of them are "
        "among the 4 highest self-influence training points."
    )
    with Image.open(out) as image:
        assert image.size == (900, 504)  # 7.5 x 4.2 inches at 120 dpi
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # the bars' colors over white: #4C72B0 at alpha 0.85, #DD4444 at alpha 0.9
    blue = (np.abs(pixels - [103, 135, 188]).sum(axis=1) < 12).sum()
    red = (np.abs(pixels - [224, 87, 87]).sum(axis=1) < 12).sum()
    assert red > 100 and blue > 1000  # the suspects' bars and the others'


def test_plot_by_self_with_evaluation_is_refused(stores, tmp_path):
    result = invoke("plot", stores["self"], "--by", "self", "--evaluation", "lds", "-o", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "--suspects and --by draw the histogram; drop them with --evaluation." in result.output


@pytest.mark.slow
def test_the_text_example_finds_its_flipped_labels_by_self_influence_not_by_mean(tmp_path):
    """The claim of examples/transformers/factory.py, measured on the job as shipped (run in this
    process instead of on two workers: the same numbers)."""
    pytest.importorskip("transformers")
    source = Path(__file__).resolve().parents[2] / "examples" / "transformers"
    shutil.copy(source / "factory.py", tmp_path / "factory.py")
    text = (source / "text_job.toml").read_text()
    text = re.sub(r"\[cluster\]\n(.*\n)*", "[cluster]\nsequential = true\n", text)
    (tmp_path / "text_job.toml").write_text(text)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "text_job.toml"), "--quiet"])
    assert result.exit_code == 0, result.output
    sys.path.insert(0, str(tmp_path))
    import factory

    flipped = set(factory.flipped_indices().tolist())
    assert len(flipped) == 10
    store = tmp_path / "text.zarr"
    by_self = json.loads(invoke("rank", store, "--by", "self", "--all", "--format", "json").output)["rows"]
    by_mean = json.loads(invoke("rank", store, "--all", "--format", "json").output)["rows"]
    assert len(flipped & {row["index"] for row in by_self[:10]}) == 5
    assert len(flipped & {row["index"] for row in by_mean[:10]}) == 0

    def auc(rows):  # the share of (flipped, clean) pairs that the ranking puts in that order
        is_flipped = np.array([row["index"] in flipped for row in rows])
        clean_after = np.cumsum((~is_flipped)[::-1])[::-1]  # clean points at or after each rank
        return float(clean_after[is_flipped].sum() / (is_flipped.sum() * (~is_flipped).sum()))

    assert auc(by_self) == pytest.approx(0.871, abs=0.0006)
    assert auc(by_mean) == pytest.approx(0.137, abs=0.0006)
