"""The gradient-index benchmark (``python -m benchmarks.index``) on its smallest problem, in seconds.

Runs the ``--tiny`` accuracy part of the smallest problem (a 682-parameter MLP on digits,
64 training and 8 test points) in this process (``client="sync"``). The row with
``k = p`` and an orthogonal projection is a rotation of the exact problem: its influences
must match the direct solver's, so a broken projection, preconditioner or query fails here.
"""

from __future__ import annotations

from benchmarks import index as bench


def test_tiny_accuracy_exact_row_matches_direct(tmp_path):
    plan = bench.ACCURACY_TINY[0]
    result = bench.accuracy_problem(plan, tmp_path, client="sync", log=lambda line: None)
    p = result["num_params"]
    assert max(plan.ks) >= p  # the plan reaches k = p
    exact = [
        row
        for row in result["rows"]
        if row["projection"] == "orthogonal" and row["k"] == p and row["preconditioner"] == "curvature"
    ]
    assert len(exact) == 1, result["rows"]
    assert exact[0]["pearson"] > 0.999, exact[0]
    assert exact[0]["top10_overlap"] > 0.9, exact[0]
    assert result["top_k_matches_influences"] is True
    for row in result["rows"]:
        assert -1 <= row["pearson"] <= 1 and 0 <= row["top10_overlap"] <= 1, row
    assert "| orthogonal |" in bench.accuracy_table(result)
