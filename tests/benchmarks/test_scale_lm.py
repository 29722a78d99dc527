"""The scale benchmark (``python -m benchmarks.scale_lm``) on its ``--tiny`` configuration: every path on
LocalClusters of 1 and 2 workers (started and stopped by the benchmark on 127.0.0.1), the table's columns,
positive floors, times at or above their floors, the per-worker RSS, and a refusal from the estimate."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")

from benchmarks import scale_lm  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

STEPS = ["EK-FAC fit", "EK-FAC factors", "EK-FAC scoring", "index build", "index query", "CG", "Arnoldi"]


def test_tiny_run_writes_every_path_with_floors_below_times(tmp_path):
    result = scale_lm.main(["--tiny", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "scale_lm_tiny.json").read_text())
    assert saved["rows"] == result["rows"] and saved["columns"] == list(scale_lm.COLUMNS)
    assert saved["model"]["num_params"] == 4592 and saved["model"]["vocab_size"] == 64
    rows = result["rows"]
    assert [(r["path"], r["workers"]) for r in rows] == [(s, w) for w in (1, 2) for s in STEPS]
    for r in rows:
        assert list(r) == list(scale_lm.COLUMNS), r
        assert r["status"] == "ok" and r["floor_s"] > 0 and r["time_s"] >= r["floor_s"], r
        assert r["tokens_per_s"] > 0 and r["estimate_per_worker_mb"] > 0, r
        client_side = r["path"] == "EK-FAC factors"
        assert len(r["peak_rss_per_worker_mb"]) == (1 if client_side else r["workers"]), r
        assert all(peak > 50 for peak in r["peak_rss_per_worker_mb"]), r  # a torch process is > 50 MB
    two = {r["path"]: r["floor_s"] for r in rows if r["workers"] == 2}
    one = {r["path"]: r["floor_s"] for r in rows if r["workers"] == 1}
    assert two["EK-FAC fit"] == pytest.approx(one["EK-FAC fit"] / 2, rel=0.01)  # the same passes, split in two
    table = (tmp_path / "scale_lm_tiny.md").read_text()
    assert "| path | workers | time (s) | floor (s) | time / floor | tokens/s | peak RSS per worker (MB) |" in table
    assert table.count("| EK-FAC fit |") == 2


def test_a_path_estimated_beyond_the_memory_per_worker_is_refused_in_one_line(tmp_path, capsys):
    result = scale_lm.main(
        ["--tiny", "--workers", "1", "--paths", "cg", "--memory-per-worker", "1000", "--out-dir", str(tmp_path)]
    )
    (row,) = result["rows"]
    assert row["path"] == "CG" and row["time_s"] is None and row["floor_s"] > 0
    assert re.fullmatch(
        r"refused: needs about \d+\.\d GB per worker \(estimated before the start\), more than "
        r"--memory-per-worker 0\.0 GB",
        row["status"],
    ), row["status"]
    assert row["estimate_per_worker_mb"] > 100  # an idle worker's resident set (Python, torch, Dask) is part of it
    out = capsys.readouterr().out
    assert "tiny CG on 1 worker(s) refused: needs about" in out
