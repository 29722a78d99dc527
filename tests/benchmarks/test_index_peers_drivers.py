"""The peer side of ``benchmarks/index_peers.py``: the equal-accuracy comparison, the plot,
LoGra's rank choice, a missing environment reported as such, and (where a peer's own
environment ``benchmarks/.venv-<name>`` is installed; skipped otherwise, as in CI) each
driver run end to end on the smoke sizes against the exact reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.peer_logra_index import rank_for

from benchmarks import index_peers as bench


def _row(method: str, k: int, build: float, query: float, size: int, r: float) -> dict:
    return {"method": method, "k": k, "build_s": build, "query_s": query, "bytes": size, "pearson": r}


RESULT = {
    "problems": {
        "mlp": {
            "reference": {"num_params": 100, "plain_dot": {"pearson": 0.5}},
            "rows": [
                _row("ours", 256, 1.0, 0.5, 1000, 0.80),
                _row("ours", 1024, 3.0, 1.0, 4000, 0.95),
                _row("ours-fisher", 256, 0.5, 0.5, 1000, 0.70),
                _row("trak 0.3.2", 256, 2.0, 1.0, 3000, 0.70),
                _row("trak 0.3.2", 1024, 6.0, 2.0, 8000, 0.90),
                _row("logra (logix-ai) 0.1.1", 243, 0.1, 0.1, 500, 0.97),
            ],
        }
    }
}


def test_each_peer_row_meets_the_cheapest_default_row_at_least_as_accurate():
    lines = bench.at_equal_accuracy(RESULT)["mlp"]
    assert [(e["peer"], e["k"], e["ours_k"]) for e in lines] == [
        ("trak 0.3.2", 256, 256), ("trak 0.3.2", 1024, 1024), ("logra (logix-ai) 0.1.1", 243, None),
    ]  # fmt: skip
    first, second, third = lines
    assert first["time_ratio"] == pytest.approx(1.5 / 3.0) and first["bytes_ratio"] == pytest.approx(1000 / 3000)
    assert first["build_ratio"] == pytest.approx(0.5) and first["query_ratio"] == pytest.approx(0.5)
    assert second["time_ratio"] == pytest.approx(4.0 / 8.0) and second["bytes_ratio"] == pytest.approx(0.5)
    assert third["time_ratio"] is None and third["bytes_ratio"] is None  # no default row reaches 0.97


def test_plot_writes_one_panel_per_problem(tmp_path):
    out = tmp_path / "plot.png"
    bench.plot(RESULT, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_logra_rank_gives_the_nearest_k_its_layer_widths_allow():
    mlp = [(64, 64), (64, 32), (32, 10)]  # the benchmark's MLP: r is capped by each layer's smaller width
    assert [rank_for(k, mlp) for k in (256, 1024, 4096)] == [(9, 243), (21, 982), (55, 4149)]
    gpt2 = [(16, 64), (64, 16)] * 2  # width 16: at most 4 x 16^2 = 1,024
    assert [rank_for(k, gpt2) for k in (256, 1024, 4096)] == [(8, 256), (16, 1024), (16, 1024)]


def test_a_missing_environment_is_reported_not_run(monkeypatch, tmp_path):
    monkeypatch.setitem(bench.PEERS, "trak", (".venv-none-here", "benchmarks.peer_trak_index", "trak"))
    problem = bench.mlp_problem(bench.TINY)
    rows, note = bench.measure_peer("trak", problem, {"lam": 0.1}, bench.TINY, (16,), tmp_path)
    assert rows == [] and note == "not installed (benchmarks/.venv-none-here/bin/python missing)"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("peer", "problem", "floor"),
    [("trak", "mlp", 0.6), ("logra", "mlp", 0.6), ("dattri", "mlp", 0.6), ("trak", "gpt2", 0.6),
     ("bergson", "gpt2", 0.6), ("logra", "gpt2", 0.4), ("dattri", "gpt2", 0.6)],
)  # fmt: skip
def test_installed_peer_driver_scores_the_smoke_problem(peer, problem, floor, tmp_path):
    env = Path(bench.__file__).resolve().parent / bench.PEERS[peer][0]
    if not (env / "bin" / "python").exists():
        pytest.skip(f"{peer}: {env.name} not installed (see benchmarks/peer_{peer}_index.py)")
    pytest.importorskip("transformers")
    made = bench.mlp_problem(bench.TINY) if problem == "mlp" else bench.gpt2_problem(bench.TINY)
    ref = bench.reference(made)
    rows, note = bench.measure_peer(peer, made, ref, bench.TINY, (64,), tmp_path)
    assert note is None and len(rows) == 1, note
    row = rows[0]
    assert row["build_s"] > 0 and row["query_s"] > 0 and row["bytes"] > 0
    # measured (tiny sizes, k ~ 64): trak 0.78 / 0.83, logra 0.79 / 0.56, dattri 0.85 / 0.85, bergson 0.84
    assert row["pearson"] > floor, row
