"""Progress of the in-memory API (``dask_influence.progress``): a fit's passes, CG solves, the
gradient index's build and queries, evaluation runs; ``progress=False`` says nothing."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence import progress


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    return model, torch.nn.CrossEntropyLoss(), x, y, DataLoader(TensorDataset(x, y), batch_size=10)


@pytest.fixture
def every_line(monkeypatch):
    """No throttling: every line of a call is said."""
    monkeypatch.setattr(progress, "INTERVAL", 0.0)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_ekfac_fit_reports_each_pass_with_counts_rate_and_eta(problem, capsys, every_line):
    model, loss, x, y, loader = problem
    di.EkfacInfluence(model, loss, regularization=1.0).fit(loader, progress=True)
    out = capsys.readouterr()
    assert out.out == ""  # progress goes to stderr (no logging configured), never stdout
    said = lines(out.err)
    assert said[0] == "EK-FAC fit: pass 1 of 2 (Kronecker factors): 0 of 40 samples"
    # one line per block of 10: counts, percent, rate, ETA
    assert re.fullmatch(
        r"EK-FAC fit: pass 1 of 2 \(Kronecker factors\): 10 of 40 samples \(25%\), [\d.,]+ samples/s, ETA [\d.]+ s",
        said[1],
    ), said[1]
    assert any(
        re.fullmatch(r"EK-FAC fit: pass 1 of 2 \(Kronecker factors\): 40 of 40 samples in .+ samples/s\)", s)
        for s in said
    )
    assert "EK-FAC fit: pass 2 of 2 (eigenvalue correction): 0 of 40 samples" in said
    assert any(s.startswith("EK-FAC fit: pass 2 of 2 (eigenvalue correction): 30 of 40 samples (75%), ") for s in said)
    assert any(s.startswith("EK-FAC fit: eigendecompositions: 2 of 2 layers in ") for s in said)
    assert re.fullmatch(r"EK-FAC fit: done, 2 passes over 40 samples in [\d.]+ s", said[-1])


def test_throttled_fit_still_says_every_pass_of_a_known_count(problem, capsys):
    """With the default interval, a fast fit still names both passes and its end."""
    model, loss, x, y, loader = problem
    di.EkfacInfluence(model, loss, regularization=1.0).fit(loader, progress=True)
    said = lines(capsys.readouterr().err)
    assert said[0] == "EK-FAC fit: pass 1 of 2 (Kronecker factors): 0 of 40 samples"
    assert said[1].startswith("EK-FAC fit: pass 1 of 2 (Kronecker factors): 10 of 40 samples (25%), ")
    assert "ETA" in said[1]
    assert "EK-FAC fit: pass 2 of 2 (eigenvalue correction): 0 of 40 samples" in said
    assert said[-1].startswith("EK-FAC fit: done, 2 passes over 40 samples in ")


def test_progress_false_says_nothing_not_even_log_records(problem, capsys, caplog, every_line):
    model, loss, x, y, loader = problem
    caplog.set_level(logging.INFO, logger="dask_influence")
    solver = di.CgInfluence(model, loss, regularization=1.0).fit(loader, progress=False)
    solver.influence_factors(x, y, progress=False)
    solver.self_influences(x, y, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert [r for r in caplog.records if r.name == "dask_influence.progress"] == []


def test_default_is_silent_without_a_terminal_and_set_default_turns_it_on(problem, capsys, monkeypatch, every_line):
    model, loss, x, y, loader = problem
    monkeypatch.delenv(progress.ENV, raising=False)
    di.DirectInfluence(model, loss, regularization=0.5).fit(loader)  # stderr is pytest's capture: no terminal
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(progress.ENV, "1")
    di.DirectInfluence(model, loss, regularization=0.5).fit(loader)
    said = lines(capsys.readouterr().err)
    assert said[0] == "Direct fit: pass 1 (dense curvature): 0 of 40 samples"
    monkeypatch.setattr(progress, "_DEFAULT", {"value": False})  # what the CLI's --quiet sets
    di.DirectInfluence(model, loss, regularization=0.5).fit(loader)
    assert capsys.readouterr().err == ""


def test_lines_go_through_logging_when_the_application_shows_info(problem, capsys, caplog, every_line):
    """An application whose logging takes INFO records of dask_influence gets the lines as records
    (and nothing on stderr from the library itself); progress=None then reports."""
    model, loss, x, y, loader = problem
    caplog.set_level(logging.INFO, logger="dask_influence")
    di.DirectInfluence(model, loss, regularization=0.5).fit(loader)
    messages = [r.getMessage() for r in caplog.records if r.name == "dask_influence.progress"]
    assert messages[0] == "Direct fit: pass 1 (dense curvature): 0 of 40 samples"
    assert re.fullmatch(r"Direct fit: done, 1 pass over 40 samples in [\d.]+ s", messages[-1])
    assert capsys.readouterr().err == ""


def test_cg_solve_over_many_test_points_reports_right_hand_sides_and_iterations(problem, capsys, every_line):
    model, loss, x, y, loader = problem
    solver = di.CgInfluence(model, loss, regularization=1.0, rhs_block_size=16).fit(loader, progress=False)
    solver.influence_factors(x, y, progress=True)
    said = lines(capsys.readouterr().err)
    assert said[0] == "CG solve: 0 of 40 right-hand sides"
    assert said[1].startswith("CG solve (right-hand sides 1-16 of 40): 0 of at most ")
    assert any(
        re.match(r"CG solve \(right-hand sides 1-16 of 40\): 1 of at most \d+ iterations, .* ETA at most ", s)
        for s in said
    )
    assert any(
        re.match(r"CG solve: 16 of 40 right-hand sides \(40%\), [\d.,]+ right-hand sides/s, ETA ", s) for s in said
    )
    assert any(
        re.match(r"CG solve \(right-hand sides 33-40 of 40\): \d+ iterations in .*relative residual max ", s)
        for s in said
    )
    assert said[-1].startswith("CG solve: 40 of 40 right-hand sides in ")
    solver.self_influences(x, y, progress=True)
    said = lines(capsys.readouterr().err)
    assert said[0] == "CG self-influences: 0 of 40 points"
    assert said[-1].startswith("CG self-influences: 40 of 40 points in ")


def test_gradient_index_build_and_query_report_their_passes(problem, tmp_path, capsys, every_line):
    model, loss, x, y, loader = problem
    index = di.GradientIndex.build(
        model, loss, loader, tmp_path / "index.zarr", projection_dim=8, client="sync", progress=True
    )
    said = lines(capsys.readouterr().err)
    line = "Index build: one pass (projected gradients, dim 8, and the GGN)"  # the default GGN: one pass
    assert said[0] == f"{line}: 0 of 40 samples"
    assert said[1].startswith(f"{line}: 10 of 40 samples (25%), ")
    assert any(s.startswith(f"{line}: 20 of 40 samples (50%), ") for s in said)
    assert said[-1].startswith(f"{line}: 40 of 40 samples in ")
    di.GradientIndex.build(
        model,
        loss,
        loader,
        tmp_path / "fisher.zarr",
        projection_dim=8,
        preconditioner="fisher",
        client="sync",
        progress=True,
    )
    said = lines(capsys.readouterr().err)  # the empirical Fisher: the gradients squared as they are written
    line = "Index build: one pass (projected gradients, dim 8, and the empirical Fisher)"
    assert said[0] == f"{line}: 0 of 40 samples"
    assert said[-1].startswith(f"{line}: 40 of 40 samples in ")
    di.GradientIndex.build(
        model,
        loss,
        loader,
        tmp_path / "hessian.zarr",
        projection_dim=8,
        curvature="hessian",
        client="sync",
        progress=True,
    )
    said = lines(capsys.readouterr().err)  # the Hessian: products in a second pass
    assert said[0] == "Index build: pass 1 of 2 (projected gradients, dim 8): 0 of 40 samples"
    assert said[1].startswith("Index build: pass 1 of 2 (projected gradients, dim 8): 10 of 40 samples (25%), ")
    assert said[-1].startswith("Index build: pass 2 of 2 (hessian curvature): 40 of 40 samples in ")
    test = DataLoader(TensorDataset(x[:12], y[:12]), batch_size=4)
    index.influences_to_zarr(test, tmp_path / "scores.zarr", top_k=3, progress=True)
    said = lines(capsys.readouterr().err)
    assert said[0] == "Index query: influence chunks (12 test x 40 indexed points): 0 of 12 chunks"
    assert said[-1].startswith("Index query: influence chunks (12 test x 40 indexed points): 12 of 12 chunks in ")
    index.influences(test, progress=False)
    assert capsys.readouterr().err == ""


def test_meter_formats_counts_rate_and_eta_with_a_clock():
    now = [0.0]
    reporter = progress.Progress(True, interval=0.0, clock=lambda: now[0])
    said: list[str] = []
    reporter.say = lambda line, force=False: said.append(line) or True  # type: ignore[method-assign]
    meter = reporter.meter("Work", 1000, "points")
    now[0] = 10.0
    meter.advance(250)  # at t = 10 s: 25 points/s, 750 left: ETA 30 s
    now[0] = 40.0
    meter.advance(750)
    meter.finish()
    assert said == [
        "Work: 0 of 1,000 points",
        "Work: 250 of 1,000 points (25%), 25 points/s, ETA 30 s",
        "Work: 1,000 of 1,000 points in 40 s (25 points/s)",
    ]
    assert progress.duration(150) == "2 min 30 s" and progress.duration(3900) == "1 h 5 min"


def test_float_class_labels_name_the_fix(problem):
    """Issue 27 item 5: float labels for cross-entropy name the fix, y.long()."""
    model, loss, x, y, loader = problem
    with pytest.raises(ValueError) as caught:
        di.DirectInfluence(model, loss, regularization=1.0).fit((x, y.double()))
    message = str(caught.value)
    assert (
        "The loss takes class labels as integers (torch.long), but the targets are float64: convert them with y.long()"
        in message
    )
    assert "\n" not in message


@pytest.mark.slow
def test_fit_on_the_cluster_counts_each_group_of_blocks(problem, fit_client, capsys, monkeypatch, every_line):
    """calc.fit over the train blocks on the workers: each pass counts the samples of each worker's
    group as it finishes (the groups of the session cluster's workers, in blocks of 10 of 40)."""
    model, loss, x, y, loader = problem
    monkeypatch.setenv(progress.ENV, "1")
    calc = di.DaskInfluenceCalculator(di.EkfacInfluence(model, loss, regularization=1.0), fit_client)
    calc.fit(loader)
    said = lines(capsys.readouterr().err)
    assert said[0] == "EK-FAC fit: pass 1 of 2 (Kronecker factors): 0 of 40 samples"
    counts = [
        int(m.group(1))
        for s in said
        if (m := re.match(r"EK-FAC fit: pass 1 of 2 \(Kronecker factors\): (\d+) of 40 samples", s))
    ]
    assert counts[0] == 0 and counts[-1] == 40 and counts == sorted(counts) and len(counts) >= 3
    assert "EK-FAC fit: pass 2 of 2 (eigenvalue correction): 0 of 40 samples" in said
    assert re.fullmatch(r"EK-FAC fit: done, 2 passes over 40 samples in [\d.]+ s", said[-1])
    silent = di.DaskInfluenceCalculator(di.EkfacInfluence(model, loss, regularization=1.0), fit_client, progress=False)
    silent.fit(loader)
    assert capsys.readouterr().err == ""
