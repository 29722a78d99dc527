"""The peer benchmark's pure parts (``benchmarks/peers.py``), without the peers' environments.

The run itself (``python -m benchmarks.peers --tiny``) needs the peers' virtual environments
(``make bench-env-kronfluence`` etc.) and minutes; here: the report's table and plot from a
fixed small report, the rows of a peer whose environment is missing, and the accuracy measures.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import peers

LB = {"total_s": 0.5, "test_grads_s": 0.1, "scoring_s": 0.4, "median_total_s": 0.6, "runs": [{}, {}, {}]}


def row(method: str, library: str, seconds: float, pearson: float, **extra) -> dict:
    return {
        "method": method,
        "library": library,
        "status": "ok",
        "fit_s": seconds / 2,
        "factors_s": None if library != "ours" else seconds / 4,
        "scoring_s": seconds / 4,
        "end_to_end_s": seconds,
        "end_to_end_runs_s": [seconds] * 3,
        "pearson": pearson,
        "spearman": pearson - 0.01,
        "vs_lower_bound": seconds / LB["total_s"],
        **extra,
    }


REPORT = {
    "machine": "x86_64, 2 cores, Python 3.11",
    "torch": "2.13.0",
    "threads": 2,
    "config": "tiny",
    "repeats": 3,
    "date": "2026-12-01",
    "peers": {
        "pyDVL": {"status": None, "versions": {"pydvl": "0.10.0"}},
        "Kronfluence": {"status": None, "versions": {"kronfluence": "1.0.1"}},
        "dattri": {"status": "not installed: make bench-env-dattri"},
        "captum": {"status": None, "versions": {"captum": "0.9.0"}},
    },
    "problems": [
        {
            "key": "mlp-1e4",
            "arch": "mlp-1e4",
            "params": 10230,
            "n_train": 2000,
            "n_test": 100,
            "regularization": 0.1,
            "reference": {"method": "CG", "dtype": "float64", "seconds": 12.0, "rtol": 1e-8, "iterations": 40},
            "lower_bound": LB,
            "rows": [
                row("Arnoldi", "ours", 2.0, 0.95),
                row("Arnoldi", "pyDVL", 8.0, 0.95, agreement_with_ours=0.999),
                row("Arnoldi", "captum", 4.0, 0.94, agreement_with_ours=0.99),
                {"method": "Arnoldi", "library": "dattri", "status": "not installed: make bench-env-dattri"},
                row("EK-FAC", "ours", 1.0, 0.9),
                row("EK-FAC", "Kronfluence", 3.0, 0.89, agreement_with_ours=0.98),
                {"method": "EK-FAC", "library": "pyDVL", "status": "timeout: over 900 s (killed)"},
                row("CG", "ours", 5.0, float("nan")),
            ],
        },
        {
            "key": "gpt2-tiny",
            "arch": "gpt2-tiny",
            "params": 3696,
            "n_train": 256,
            "n_test": 16,
            "regularization": 0.1,
            "reference": {"method": "Direct", "dtype": "float64", "seconds": 3.0},
            "lower_bound": LB,
            "rows": [
                row("EK-FAC", "ours", 1.5, 0.8),
                {"method": "EK-FAC", "library": "pyDVL", "status": "n/a: the driver loads MLP and CNN only"},
            ],
        },
    ],
}


def test_markdown_tables_from_a_fixed_report():
    md = peers.markdown(REPORT)
    assert "### mlp-1e4: 10,230 parameters, n_train = 2,000, n_test = 100" in md
    assert "| Arnoldi | ours | **2.000** | 1.000 | 0.500 | 0.500 | 0.9500 | 0.9400 | - | 4.0x |" in md
    assert "| Arnoldi | captum | **4.000** | 2.000 | - | 1.000 | 0.9400 | 0.9300 | 0.9900 | 8.0x |" in md
    assert "| Arnoldi | dattri | not installed: make bench-env-dattri |" in md
    assert "| EK-FAC | pyDVL | timeout: over 900 s (killed) |" in md
    assert "| EK-FAC | pyDVL | n/a: the driver loads MLP and CNN only |" in md
    assert "our CG in float64 at rtol 1e-08" in md and "our Direct in float64" in md
    assert "- dattri: not installed: make bench-env-dattri" in md
    assert "- Kronfluence: kronfluence 1.0.1" in md
    # ours against the fastest peer: Arnoldi (captum 4 s), EK-FAC (Kronfluence 3 s); CG has no peer row
    assert "| mlp-1e4 | Arnoldi | 2.000 (0.9500) | captum: 4.000 (0.9400) | 0.50x |" in md
    assert "| mlp-1e4 | EK-FAC | 1.000 (0.9000) | Kronfluence: 3.000 (0.8900) | 0.33x |" in md
    assert "| mlp-1e4 | CG |" not in md
    assert "| CG | ours | **5.000** |" in md and "| - | 0.0" not in md  # NaN Pearson shown as "-"


def test_plot_from_a_fixed_report(tmp_path):
    path = tmp_path / "img" / "time_to_accuracy.png"
    peers.plot(REPORT, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_environment_gives_not_installed_rows(tmp_path):
    dattri = next(p for p in peers.PEERS if p.name == "dattri")
    assert peers.peer_status(dattri, tmp_path / "no-venv" / "bin" / "python") == "not installed: make bench-env-dattri"
    statuses = {p.name: f"not installed: make {p.make_target}" for p in peers.PEERS}
    spec = peers.tiny_specs()[0]
    plan, rows = peers.plan_runs(spec, statuses)
    assert plan == {m: ["ours"] for m in spec.methods}  # ours still runs every method
    assert rows[("Arnoldi", "captum")] == {"status": "not installed: make bench-env-captum"}
    assert rows[("EK-FAC", "Kronfluence")] == {"status": "not installed: make bench-env-kronfluence"}
    assert rows[("CG", "pyDVL")] == {"status": "not installed: make bench-env"}
    assert ("CG", "captum") not in rows  # captum has no CG: no row at all


def test_plan_with_peers_installed_and_na_reasons():
    statuses = {p.name: None for p in peers.PEERS}
    gpt2 = next(s for s in peers.full_specs() if s.key == "gpt2-tiny")
    plan, rows = peers.plan_runs(gpt2, statuses, load_errors={"captum": "failed to load: boom"})
    assert plan["EK-FAC"] == ["ours", "Kronfluence"]
    assert rows[("EK-FAC", "pyDVL")]["status"].startswith("n/a: ")
    assert rows[("EK-FAC", "dattri")]["status"].startswith("n/a: ")
    assert rows[("Arnoldi", "captum")] == {"status": "failed to load: boom"}
    assert plan["Arnoldi"] == ["ours", "dattri"]


def test_accuracy_measures():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 40))
    assert peers.pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert peers.pearson(a, -a) == pytest.approx(-1.0)
    assert peers.spearman(a, np.exp(a)) == pytest.approx(1.0)  # monotone: ranks agree
    assert np.isnan(peers.pearson(a, np.full_like(a, np.nan)))
    runs = [
        {"fit_s": 1.0, "factors_s": None, "scoring_s": 1.0},
        {"fit_s": 3.0, "factors_s": None, "scoring_s": 1.0},
        {"fit_s": 2.0, "factors_s": None, "scoring_s": 1.0},
    ]
    summary = peers.summarize_runs(runs)
    assert summary["end_to_end_s"] == 3.0 and summary["fit_s"] == 2.0 and summary["factors_s"] is None


def test_direct_preconditioned_cg_reference_is_the_float64_direct_solution():
    """The CNN's reference: float64 CG preconditioned by a float32 Direct fit's Cholesky factor
    converges in a few sweeps to what a float64 Direct fit gives."""
    spec = peers.Spec("t", "mlp-tiny", 120, 4, reference="Direct+CG", regularization=0.5)
    pb = peers.load_problem(spec)
    info, values = peers.reference(spec, pb, 64, print)
    spec.reference = "Direct"
    _, exact = peers.reference(spec, pb, 64, print)
    assert info["iterations"] <= 4  # plain CG needs tens of sweeps here
    np.testing.assert_allclose(values, exact, rtol=0, atol=1e-10 * np.abs(exact).max())
    assert "Cholesky factor of our float32 Direct fit" in peers.reference_text(info)


def test_lissa_curve_in_tables_and_plot_and_merge(tmp_path):
    import copy
    import json

    rep = copy.deepcopy(REPORT)
    mlp = rep["problems"][0]
    mlp["rows"] += [row("LiSSA", "ours", 10.0, 0.999), row("LiSSA", "pyDVL", 6.0, 0.90)]
    mlp["lissa_steps"] = [
        {"steps": 10, "end_to_end_s": 3.0, "pearson": 0.97},
        {"steps": 25, "end_to_end_s": 5.0, "pearson": 0.99},
        {"steps": 100, "end_to_end_s": 10.0, "pearson": 0.999},
    ]
    md = peers.markdown(rep)
    assert "10 steps: 0.9700 in 3.00 s; 25 steps: 0.9900 in 5.00 s; 100 steps: 0.9990 in 10.00 s" in md
    assert "| mlp-1e4 | LiSSA | 10.000 (0.9990) | pyDVL: 6.000 (0.9000) | 1.67x |" in md
    # the fewest steps that reach pyDVL's 0.90: 10 steps, in half its time
    assert "| mlp-1e4 | LiSSA, 10 steps (equal accuracy) | 3.000 (0.9700) | pyDVL: 6.000 (0.9000) | 0.50x |" in md
    peers.plot(rep, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0

    # merging two runs: the later run's problem replaces the earlier one of the same key
    first, second = copy.deepcopy(REPORT), copy.deepcopy(rep)
    second["problems"] = [mlp]
    second["date"] = "2026-12-02"
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged = peers.main(
        [
            "--merge",
            str(tmp_path / "a.json"),
            str(tmp_path / "b.json"),
            "--out",
            str(tmp_path / "out"),
            "--plot",
            str(tmp_path / "out" / "plot.png"),
        ]
    )
    assert [p["key"] for p in merged["problems"]] == ["mlp-1e4", "gpt2-tiny"]
    assert merged["problems"][0]["lissa_steps"] == mlp["lissa_steps"]
    assert merged["problems"][0]["date"] == "2026-12-02" and merged["problems"][1]["date"] == "2026-12-01"
    assert "LiSSA, 10 steps (equal accuracy)" in (tmp_path / "out" / "peers.md").read_text()
    # a later run of some methods replaces those rows only
    third = copy.deepcopy(REPORT)
    third["problems"] = [{**copy.deepcopy(mlp), "rows": [row("EK-FAC", "ours", 0.5, 0.91)]}]
    third["problems"][0].pop("lissa_steps")
    third["date"] = "2026-12-03"
    (tmp_path / "c.json").write_text(json.dumps(third))
    merged = peers.merge([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"])
    rows = {(r["method"], r["library"]): r for r in merged["problems"][0]["rows"]}
    assert rows[("EK-FAC", "ours")]["end_to_end_s"] == 0.5 and rows[("EK-FAC", "ours")]["date"] == "2026-12-03"
    assert ("EK-FAC", "Kronfluence") not in rows  # the later run's rows of EK-FAC replace all of them
    assert rows[("LiSSA", "pyDVL")]["date"] == "2026-12-02" and rows[("Arnoldi", "ours")]["end_to_end_s"] == 2.0
    assert merged["problems"][0]["lissa_steps"] == mlp["lissa_steps"]
    assert [r["method"] for r in merged["problems"][0]["rows"]][:2] == ["CG", "LiSSA"]
