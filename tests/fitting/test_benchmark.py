"""benchmarks/distributed_fit.py keeps working: its tiny configuration on 1 and 2 workers."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_distributed_fit_benchmark_tiny(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.distributed_fit import main

    result = main(["--tiny"])
    assert set(result["speedup"]) == {"CG fit", "CG solve", "CG fit + solve", "EK-FAC fit"}
    assert all(t > 0 for w in (1, 2) for t in result["seconds"][w].values())
    out = capsys.readouterr().out
    assert "| EK-FAC fit |" in out and "2 workers than on 1" in out
    sys.modules.pop("benchmarks.distributed_fit", None)
