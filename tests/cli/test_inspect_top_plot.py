"""`inspect`, `top` and `plot` on complete, incomplete and perturbation stores."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

import dask_influence as di
from dask_influence.cli.inspect import mean_influence
from dask_influence.mapping.store import ATTR
from jobs import invoke, load_example_factory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "batch_job"
N_TRAIN, N_TEST, TEST_BLOCK, TRAIN_BLOCK, K = 90, 14, 5, 32, 4


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A complete store (top-k and self-influences), an incomplete copy and a perturbation store."""
    factory = load_example_factory(EXAMPLE)
    problem = factory.make_problem(n_train=N_TRAIN, n_test=N_TEST)
    solver = di.DirectInfluence(problem["model"], problem["loss"], regularization=1e-3)
    train = DataLoader(problem["train"], batch_size=TRAIN_BLOCK)
    test = DataLoader(problem["test"], batch_size=TEST_BLOCK)
    solver.fit(train)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    root = tmp_path_factory.mktemp("stores")
    complete = root / "complete.zarr"
    calc.influences_to_zarr(test, train, complete, top_k=K, self_influences=True)
    values = zarr.open_group(str(complete), mode="r")["influences"][...]

    incomplete = root / "incomplete.zarr"
    shutil.copytree(complete, incomplete)
    group = zarr.open_group(str(incomplete), mode="r+")
    for i, j in [(1, 0), (1, 2)]:  # test block 1 (rows 5..9) misses train blocks 0 and 2
        group["influences"][5:10, j * TRAIN_BLOCK : (j + 1) * TRAIN_BLOCK] = np.nan
        group["influences_done"][i, j] = 0
    group["topk_done"][1] = 0
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}

    perturbation = root / "perturbation.zarr"
    calc.influences_to_zarr(test, train, perturbation, mode="perturbation")
    return {
        "complete": complete,
        "incomplete": incomplete,
        "perturbation": perturbation,
        "values": values,
        "self": solver.self_influences(*problem["train"].tensors).numpy(),
        "root": root,
    }


def test_inspect_complete_store(stores):
    values = stores["values"]
    result = invoke("inspect", stores["complete"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Status: complete (9/9 chunks)" in out
    assert "Method: DirectInfluence, mode 'up', dtype float64, 21 parameters" in out
    assert "regularization=0.001" in out and "curvature=hessian" in out
    assert "Influences: 14 test x 90 train points" in out
    assert "Blocks: test 3 of 5 (last 4), train 3 of 32 (last 26)" in out
    assert "top_k (k=4)" in out and "self_influences" in out
    assert f"min {values.min():.4g}  max {values.max():.4g}" in out

    d = json.loads(invoke("inspect", stores["complete"], "--json").output)
    assert d["complete"] is True and d["method"] == "DirectInfluence" and d["mode"] == "up"
    assert d["completion"] == {
        "influences": {"done": 9, "total": 9},
        "self_influences": {"done": 3, "total": 3},
        "top_k": {"done": 3, "total": 3},
    }
    assert d["shape"] == [14, 90] and d["arrays"]["influences"]["chunks"] == [5, 32]
    s = d["statistics"]["influences"]
    assert s["count"] == values.size and s["non_finite"] == 0
    np.testing.assert_allclose(
        [s["min"], s["max"], s["mean"], s["std"]], [values.min(), values.max(), values.mean(), values.std()], rtol=1e-9
    )
    np.testing.assert_allclose(d["statistics"]["self_influences"]["max"], stores["self"].max(), rtol=1e-12)
    assert "statistics" not in json.loads(invoke("inspect", stores["complete"], "--json", "--no-stats").output)


def test_inspect_incomplete_store(stores):
    result = invoke("inspect", stores["incomplete"])
    assert result.exit_code == 0, result.output
    assert "Status: INCOMPLETE (7/9 chunks done); run the job again with --resume" in result.output
    d = json.loads(invoke("inspect", stores["incomplete"], "--json").output)
    assert d["complete"] is False
    assert d["completion"]["influences"] == {"done": 7, "total": 9}
    assert d["completion"]["top_k"] == {"done": 2, "total": 3}
    # statistics cover the computed chunks only (no NaN from the missing ones)
    assert d["statistics"]["influences"]["count"] == 14 * 90 - 5 * (32 + 26)
    assert d["statistics"]["influences"]["non_finite"] == 0


def test_inspect_rejects_what_is_not_a_store(stores, tmp_path):
    result = invoke("inspect", tmp_path / "missing.zarr")
    assert result.exit_code == 1 and result.output.startswith("Error: No store at")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    result = invoke("inspect", tmp_path / "plain.zarr")
    assert result.exit_code == 1 and "not a dask-influence store" in result.output


def ranked(row, k):
    return (np.argsort(-row, kind="stable")[:k], np.argsort(row, kind="stable")[:k])


def test_top_from_stored_arrays_and_from_the_row(stores):
    row = stores["values"][6]
    helpful, harmful = ranked(row, 6)
    d = json.loads(invoke("top", stores["complete"], "--test", 6, "-k", 3, "--json").output)
    assert d["source"] == "stored top-k (k=4)" and d["missing_train_blocks"] == 0
    assert [e["index"] for e in d["helpful"]] == list(helpful[:3])
    assert [e["index"] for e in d["harmful"]] == list(harmful[:3])
    np.testing.assert_allclose([e["influence"] for e in d["harmful"]], row[harmful[:3]], rtol=1e-12)
    # more than the stored k: ranked from the influence row, in the same order
    d = json.loads(invoke("top", stores["complete"], "--test", 6, "-k", 6, "--json").output)
    assert d["source"] == "influence row"
    assert [e["index"] for e in d["helpful"]] == list(helpful)
    assert [e["index"] for e in d["harmful"]] == list(harmful)

    text = invoke("top", stores["complete"], "--test", 6, "-k", 3)
    assert text.exit_code == 0
    assert "Test point 6 of 14; 90 training points; from the stored top-k (k=4)." in text.output
    assert "Most helpful (highest influence):" in text.output and "Most harmful (lowest influence):" in text.output
    lines = text.output.splitlines()
    first_harmful = lines[lines.index("Most harmful (lowest influence):") + 2].split()
    assert first_harmful[:2] == ["1", str(harmful[0])]


def test_top_on_an_incomplete_row_and_bad_indices(stores):
    result = invoke("top", stores["incomplete"], "--test", 7, "-k", 3)
    assert result.exit_code == 0, result.output
    assert "from the influence row" in result.output
    assert "Warning: 2 train block(s) of this row are not computed yet" in result.output
    # only the computed train block (columns 32..63) is ranked
    harmful = np.argsort(stores["values"][7, 32:64], kind="stable")[:3] + 32
    assert [int(line.split()[1]) for line in result.output.splitlines()[-3:]] == list(harmful)

    result = invoke("top", stores["complete"], "--test", 14)
    assert result.exit_code == 1 and "Error: --test must be a test index from 0 to 13; got 14." in result.output
    assert invoke("top", stores["complete"]).exit_code == 2  # --test is required
    result = invoke("top", stores["perturbation"], "--test", 0)
    assert result.exit_code == 1 and "needs a store in mode 'up'" in result.output


def test_plot_writes_a_histogram_with_suspects_marked(stores, tmp_path):
    mean, count = mean_influence(zarr.open_group(str(stores["complete"]), mode="r"))
    np.testing.assert_allclose(mean, stores["values"].mean(axis=0), rtol=1e-12)
    assert (count == N_TEST).all()
    suspects = np.argsort(mean, kind="stable")[:3]

    out = tmp_path / "mean.png"
    result = invoke("plot", stores["complete"], "-o", out, "--suspects", ",".join(map(str, suspects)))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert f"Wrote {out}: mean influence of 90 training points over 14 test points." in result.output
    assert "Suspects: 3 marked" in result.output and "3 of them are among the 3 most harmful" in result.output

    listed = tmp_path / "suspects.txt"
    listed.write_text("# corrupted points\n" + "\n".join(map(str, suspects)) + "\n")
    result = invoke("plot", stores["complete"], "-o", tmp_path / "b.png", "--suspects", listed, "--bins", 10)
    assert result.exit_code == 0 and "Suspects: 3 marked" in result.output

    result = invoke("plot", stores["incomplete"], "-o", tmp_path / "c.png")
    assert result.exit_code == 0 and "Warning: the store is incomplete" in result.output


def test_plot_errors(stores, tmp_path):
    result = invoke("plot", stores["complete"], "-o", tmp_path / "x.png", "--suspects", "1,x")
    assert result.exit_code == 1 and "'x' is not an integer" in result.output
    result = invoke("plot", stores["complete"], "-o", tmp_path / "x.png", "--suspects", "3,90")
    assert result.exit_code == 1 and "outside 0..89: 90" in result.output
    result = invoke("plot", stores["complete"], "-o", tmp_path / "x.png", "--suspects", str(tmp_path / "no.txt"))
    assert result.exit_code == 1 and "does not exist" in result.output
    result = invoke("plot", stores["perturbation"], "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "needs a store in mode 'up'" in result.output
    assert invoke("plot", stores["complete"]).exit_code == 2  # -o is required
    assert not (tmp_path / "x.png").exists()


def test_rank_by_mean_min_max_in_every_format(stores, tmp_path):
    values = stores["values"]
    result = invoke("rank", stores["complete"], "-n", 5)
    assert result.exit_code == 0, result.output
    expected = np.argsort(values.mean(axis=0), kind="stable")[:5]
    listed = [int(line.split()[1]) for line in result.output.splitlines()[2:]]
    assert listed == list(expected)
    result = invoke("rank", stores["complete"], "--by", "max", "--order", "helpful", "--format", "json", "-n", 3)
    rows = json.loads(result.output)["rows"]
    assert [r["index"] for r in rows] == list(np.argsort(-values.max(axis=0), kind="stable")[:3])
    assert rows[0]["max"] == pytest.approx(float(values.max()), rel=1e-12) and rows[0]["test_points"] == N_TEST
    out = tmp_path / "ranked.csv"
    result = invoke("rank", stores["complete"], "--by", "min", "--all", "--format", "csv", "-o", out)
    assert result.exit_code == 0 and f"Wrote {N_TRAIN} rows" in result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "rank,index,mean,min,max,test_points" and len(lines) == N_TRAIN + 1
    assert int(lines[1].split(",")[1]) == int(np.argmin(values.min(axis=0)))


def test_rank_on_an_incomplete_store_and_a_perturbation_store(stores):
    result = invoke("rank", stores["incomplete"], "-n", 3)
    assert result.exit_code == 0
    assert "Warning: 58 training point(s) have chunks not computed yet" in result.output  # blocks 0 and 2: 32 + 26
    result = invoke("rank", stores["perturbation"])
    assert result.exit_code == 1 and "needs a store in mode 'up'" in result.output


def test_plot_title_names_the_store_method_and_mode(stores):
    from dask_influence.cli.plot import default_title

    group = zarr.open_group(str(stores["complete"]), mode="r")
    title = default_title(str(stores["complete"]), group)
    assert title == "complete.zarr: mean influence per training point (DirectInfluence, regularization 0.001, mode up)"
