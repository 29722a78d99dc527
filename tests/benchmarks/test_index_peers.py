"""The index comparison benchmark (``python -m benchmarks.index_peers --tiny``, ours only) in
seconds: every row measured, the default index more accurate than the empirical Fisher's at
the largest k, the LM's default GGN sampled, and the table and JSON written."""

from __future__ import annotations

import json

import pytest

from benchmarks import index_peers as bench

pytestmark = [pytest.mark.slow]
pytest.importorskip("transformers")


def test_tiny_run_measures_every_row_and_writes_its_table(tmp_path, capsys):
    result = bench.main(["--tiny", "--out", str(tmp_path), "--peers", ""])
    stored = json.loads((tmp_path / "index_peers-tiny.json").read_text())
    assert set(stored["problems"]) == {"mlp", "gpt2"}
    for name, problem in result["problems"].items():
        ref = problem["reference"]
        assert ref["num_params"] == {"mlp": 682, "gpt2": 552}[name]
        rows = problem["rows"]
        # k = 8: the default index alone, below the shared k (Plan.ours_ks)
        assert [(r["method"], r["k"]) for r in rows] == [
            ("ours", 8), ("ours", 16), ("ours-fisher", 16), ("ours", 64), ("ours-fisher", 64),
        ]  # fmt: skip
        for r in rows:
            assert r["build_s"] > 0 and r["query_s"] > 0 and r["bytes"] > 0
            assert -1 <= r["pearson"] <= 1 and 0 <= r["top_overlap"] <= 1
            assert r["dtype"] == "float16"
        default, fisher = rows[3], rows[4]
        assert default["pearson"] > fisher["pearson"] + 0.05, (default, fisher)  # measured 0.907/0.768, 0.961/0.810
        assert default["pearson"] > 0.85
        # the LM samples its GGN; the 10-class MLP sums its leading output roots (ggn_draws="auto", 05ae181)
        leading = {"kind": "leading", "trace": 0.95}
        assert default["ggn"] == ({"kind": "sampled", "draws": 8, "seed": 0} if name == "gpt2" else leading)
    printed = capsys.readouterr().out
    assert "| ours (sampled, 8 draws) | 64 |" in printed and "| ours-fisher | 16 |" in printed
