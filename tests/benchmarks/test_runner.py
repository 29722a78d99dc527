"""The benchmark runner (``python -m benchmarks.run``) works end to end on its tiny configuration.

The full run takes most of an hour (docs/benchmarks.md); this keeps the runner working in
CI in seconds. pyDVL lives in its own environment (``make bench-env``), absent in CI: its
part must then be skipped with the reason recorded, and run when the environment exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYDVL_PYTHON = ROOT / "benchmarks" / ".venv-pydvl" / "bin" / "python"


def run_tiny(out: Path, pydvl_python: Path) -> dict:
    env = {**os.environ, "BENCH_PYDVL_PYTHON": str(pydvl_python), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--config", "tiny", "--out", str(out), "--no-dask"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a pyDVL environment that exists runs here too (88 s alone on 2 loaded cores)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "results.md").is_file() and (out / "time_vs_n_train.png").stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def check_ours(report: dict) -> dict:
    (res,) = report["configs"]
    assert res["params"] > 0 and res["n_train"] > 0 and res["n_test"] > 0
    lb = res["lower_bound"]
    assert lb["total_s"] > 0 and lb["scoring_s"] > 0
    solvers = res["solvers"]
    assert set(solvers) == {"Direct", "CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC"}
    for name, row in solvers.items():
        assert "error" not in row, (name, row)
        for key in ("fit_s", "factors_s", "scoring_s", "end_to_end_s", "scoring_vs_lower_bound"):
            assert row[key] >= 0, (name, key)
        assert -1 <= row["pearson"] <= 1
    assert solvers["Direct"]["is_reference"] and solvers["Direct"]["pearson"] == pytest.approx(1.0)
    assert solvers["CG"]["pearson"] > 0.99
    assert solvers["EK-FAC"]["pearson"] > 0.9
    assert res["ekfac_fit_memory"]["peak_fit_bytes"] is None or res["ekfac_fit_memory"]["peak_fit_bytes"] >= 0
    return res


def test_tiny_run_without_pydvl_records_why(tmp_path):
    report = run_tiny(tmp_path, tmp_path / "no-such-env" / "bin" / "python")
    assert "make bench-env" in report["pydvl_note"]
    res = check_ours(report)
    assert res["pydvl"] == {}
    md = (tmp_path / "results.md").read_text()
    assert "| CG | ours |" in md and "Lower bound" in md


@pytest.mark.skipif(not PYDVL_PYTHON.exists(), reason="pyDVL's environment is absent (create it with `make bench-env`)")
def test_tiny_run_with_pydvl(tmp_path):
    report = run_tiny(tmp_path, PYDVL_PYTHON)
    assert report["pydvl_note"] is None and report["pydvl_versions"]["pydvl"] == "0.10.0"
    res = check_ours(report)
    for name in ("Direct", "CG", "Nystroem", "EK-FAC"):
        row = res["pydvl"][name]
        assert "error" not in row, row
        assert row["agreement_with_ours"] > 0.95, (name, row)
        assert res["solvers"][name]["speedup_vs_pydvl"] > 0
