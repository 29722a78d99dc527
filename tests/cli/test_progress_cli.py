"""Progress of every CLI command (``run``, ``index``, ``query``, ``evaluate``): every pass with
counts, rate and ETA on stderr, nothing with ``--quiet``; an embedded cluster closes without
killing its workers."""

from __future__ import annotations

import logging
import re
import shutil
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dask_influence import progress
from dask_influence.cli.main import cli
from jobs import CLASSIFIER_FACTORY

HERE = Path(__file__).parent


JOB = textwrap.dedent(
    """
    [model]
    factory = "progress_factory:make"

    [solver]
    method = "ekfac"
    regularization = 0.5

    [index]
    store = "index.zarr"
    projection_dim = 16
    dtype = "float64"
    regularization = 0.5

    [blocks]
    train = 10
    test = 5

    [output]
    store = "scores.zarr"
    top_k = 3

    [cluster]
    sequential = true
    """
)

RATE_ETA = r"\(\d+%\), [\d.,]+ {unit}/s, ETA [\d.]+ s"


@pytest.fixture
def job(tmp_path, monkeypatch):
    (tmp_path / "progress_factory.py").write_text(CLASSIFIER_FACTORY)
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    monkeypatch.chdir(tmp_path)
    return path


def err_lines(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [line.strip() for line in result.stderr.splitlines() if line.strip()]


def has(lines: list[str], pattern: str) -> bool:
    return any(re.fullmatch(pattern, line) for line in lines)


def test_run_index_and_query_show_every_pass_with_counts_rate_and_eta(job):
    runner = CliRunner()
    said = err_lines(runner.invoke(cli, ["run", str(job)]))
    # the fit: both passes of EK-FAC, each from 0 to 48 samples, the first count with its rate and ETA
    assert "EK-FAC fit: pass 1 of 2 (Kronecker factors): 0 of 48 samples" in said
    assert has(
        said, r"EK-FAC fit: pass 1 of 2 \(Kronecker factors\): 10 of 48 samples " + RATE_ETA.format(unit="samples")
    )
    assert has(said, r"EK-FAC fit: pass 1 of 2 \(Kronecker factors\): 48 of 48 samples in [\d.]+ s \(.+ samples/s\)")
    assert "EK-FAC fit: pass 2 of 2 (eigenvalue correction): 0 of 48 samples" in said
    assert has(said, r"EK-FAC fit: done, 2 passes over 48 samples in [\d.]+ s")
    # the job's chunks: 3 test blocks x 5 train blocks
    assert "Influences: chunks of 12 test x 48 training points: 0 of 15 chunks" in said
    assert has(
        said, r"Influences: chunks of 12 test x 48 training points: \d+ of 15 chunks " + RATE_ETA.format(unit="chunks")
    )
    assert has(said, r"Influences: chunks of 12 test x 48 training points: 15 of 15 chunks in [\d.]+ s \(.+\)")
    assert not any("influence factors" in line for line in said)  # the block tasks' own calls stay quiet

    said = err_lines(runner.invoke(cli, ["index", str(job)]))
    line = "Index build: one pass (projected gradients, dim 16, and the GGN)"  # the default GGN: one pass
    assert f"{line}: 0 of 48 samples" in said
    assert has(said, re.escape(line) + r": \d+ of 48 samples " + RATE_ETA.format(unit="samples"))
    assert has(said, re.escape(line) + r": 48 of 48 samples in [\d.]+ s \(.+\)")
    assert not any("pass 2 of 2" in x for x in said)

    said = err_lines(runner.invoke(cli, ["query", str(job), "--overwrite"]))
    assert "Index query: influence chunks (12 test x 48 indexed points): 0 of 15 chunks" in said
    assert has(
        said,
        r"Index query: influence chunks \(12 test x 48 indexed points\): \d+ of 15 chunks "
        + RATE_ETA.format(unit="chunks"),
    )
    assert has(said, r"Index query: influence chunks \(12 test x 48 indexed points\): 15 of 15 chunks in .+")

    # --quiet: no progress at all, and the process's default is back to automatic afterwards
    quiet = runner.invoke(cli, ["run", str(job), "--overwrite", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    assert runner.invoke(cli, ["index", str(job), "--quiet"]).stderr == ""
    assert progress._DEFAULT["value"] is None
    assert not [h for h in logging.getLogger("dask_influence").handlers if type(h).__name__ == "_Progress"]


def test_evaluate_shows_the_retraining_runs(tmp_path, monkeypatch):
    shutil.copy(HERE.parent / "evaluate" / "evaljob.py", tmp_path / "evaljob.py")
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # every run's line
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(
            """
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
            [cluster]
            sequential = true
            [evaluate]
            retrain = "evaljob:train"
            methods = ["lds", "loo"]
            n_subsets = 4
            points = 2
            """
        )
    )
    runner = CliRunner()
    assert runner.invoke(cli, ["run", str(job), "--quiet"]).exit_code == 0
    said = err_lines(runner.invoke(cli, ["evaluate", str(job)]))
    assert "LDS: retraining on subsets: 0 of 4 runs" in said
    assert has(said, r"LDS: retraining on subsets: 1 of 4 runs " + RATE_ETA.format(unit="runs"))
    assert has(said, r"LDS: retraining on subsets: 4 of 4 runs in [\d.]+ s \(.+ runs/s\)")
    assert "LOO: retraining without points: 0 of 3 runs" in said  # the base run and one per left-out point
    assert has(said, r"LOO: retraining without points: 3 of 3 runs in .+")
    again = err_lines(runner.invoke(cli, ["evaluate", str(job)]))  # all recorded: nothing to run, nothing said
    assert not any("retraining" in line for line in again)
    assert runner.invoke(cli, ["evaluate", str(job), "--quiet", "--overwrite"]).stderr == ""


@pytest.mark.cluster
@pytest.mark.subprocess
@pytest.mark.slow
def test_embedded_cluster_waits_for_slow_worker_exits_instead_of_killing(caplog):
    """A worker process that takes 6 s to exit (as one that imported torch can take on a loaded
    machine) is waited for: no "Worker process still alive after 4.0 seconds, killing" (Dask's
    nanny kills after 4 s by default; this failed before the fix with one warning per worker)."""
    from dask_influence.mapping.clients import local_cluster

    def slow_exit() -> None:  # a finalizer of the worker process, run as it exits
        import multiprocessing.util

        multiprocessing.util.Finalize(None, time.sleep, args=(6,), exitpriority=0)

    caplog.set_level(logging.WARNING, logger="distributed")
    start = time.perf_counter()
    with local_cluster(2) as client:
        client.run(slow_exit)
        assert client.submit(sum, [1, 2]).result() == 3
    elapsed = time.perf_counter() - start
    killed = [r.getMessage() for r in caplog.records if "still alive" in r.getMessage()]
    assert killed == []
    assert elapsed >= 6  # the exits were waited for


@pytest.mark.parametrize("scale, shift", [(1e-6, 1.5e-4), (1e-5, 0.0), (0.02, -0.0731), (0.3, 5.0)])
def test_loo_plot_tick_labels_do_not_overlap(tmp_path, monkeypatch, scale, shift):
    """Issue 27 item 5: leave-one-out changes of 1e-4 got 11 x-tick labels of 8 characters
    ('0.00002' ... '0.00018'), overlapping; now at most 6 ticks, the power of ten in the label."""
    import matplotlib.figure
    import numpy as np
    import zarr

    from dask_influence.cli.plot import evaluation_plot
    from dask_influence.evaluate.records import ATTR, GROUP

    group = zarr.open_group(str(tmp_path / "scores.zarr"), mode="w")
    sub = group.require_group(GROUP).require_group("loo")
    predicted = np.random.default_rng(0).normal(0, scale, (6, 8)) + shift
    sub.create_array("predicted", data=predicted)
    sub.create_array("actual", data=1.05 * predicted)
    sub.attrs[ATTR] = {"kind": "loo", "result": {"pearson": 0.9931}}
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: drawn.append(self))
    assert evaluation_plot(group, "loo", str(tmp_path / "loo.png")) == (
        "loo (loo): 48 predicted vs actual pairs, Pearson 0.9931"
    )
    (fig,) = drawn
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
        assert 3 <= len(boxes) <= 8
        assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]
    label = ax.xaxis.get_label()
    for tick in ax.xaxis.get_ticklabels():  # nor does a tick label run into the axis label
        assert not tick.get_window_extent(renderer).overlaps(label.get_window_extent(renderer))
    if scale < 1e-3:
        assert "10^{" in ax.get_xlabel() and not ax.xaxis.offsetText.get_visible()
