"""``python -m benchmarks.evaluation --tiny`` runs end to end: every solver gets an LDS and a LOO Pearson."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_reports_every_solver(tmp_path):
    out = tmp_path / "evaluation.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.evaluation", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (problem,) = report["problems"]
    index_rows = {f"Index k={k} ({p})" for k in (16, 64) for p in ("curvature", "fisher")}
    assert set(problem["solvers"]) == {"Direct", "CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC"} | index_rows
    for name, row in problem["solvers"].items():
        assert "error" not in row, (name, row)
        assert -1.0 <= row["lds"] <= 1.0 and -1.0 <= row["loo_pearson"] <= 1.0
    # CG solves the same system as Direct: the same rankings; the exact solver's warm-started
    # leave-one-out predictions follow retraining within each test point even on this tiny MLP
    direct, cg = problem["solvers"]["Direct"], problem["solvers"]["CG"]
    assert abs(direct["lds"] - cg["lds"]) < 0.05 and abs(direct["loo_pearson"] - cg["loo_pearson"]) < 0.05
    assert direct["loo_pearson_per_test"] >= 0.8
    assert problem["lds_runs"] == 6 and problem["loo_runs"] == 5  # retrained once, then resumed
    scaling = problem["scaling"]
    assert scaling["runs"] == 8 and scaling["speedup"] > 0
    assert "| Direct |" in proc.stdout and "speed-up" in proc.stdout
