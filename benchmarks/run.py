"""Speed, memory and accuracy of every solver against the lower bound and against pyDVL, in one run.

    python -m benchmarks.run [--config full|tiny] [--out benchmarks/results] [--no-pydvl] [--no-dask]

For each configuration (model, n_train; n_test test points) one process run measures, with
the implementations alternating solver by solver:

- the LOWER BOUND of the influence phase: per-sample gradients of all test and train
  points with torch.func plus the product ``test_grads @ train_grads.T``, no Hessian work
  (:func:`benchmarks.problems.lower_bound`; median of runs before and after the solvers);
- each solver of dask-influence: fit, factors (inverse curvature applied to the test
  gradients), scoring (train gradients against the factors), peak memory of fit and of
  the influence phase, and accuracy (Pearson correlation and relative error of the whole
  influence matrix) against DirectInfluence, or against CG with a tight tolerance where
  Direct does not fit the budget;
- pyDVL 0.10.0's same solver with the same hyperparameters, driven in its own virtual
  environment (``make bench-env``) through :mod:`benchmarks.pydvl_driver`: the same three
  times, memory, accuracy against the same reference, and agreement with ours;
- optionally the Dask calculators on a LocalCluster: ours with 1 and 2 workers and 1 and
  8 test blocks, pyDVL's with 2 workers and 8 test blocks, on the same fitted solver type.

Writes ``results.json``, ``results.md`` (with the targets as ratios) and
``time_vs_n_train.png`` into ``--out``. Combinations that are skipped are recorded with the
reason. The full configuration takes about 30 minutes on 2 cores; ``--config tiny`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .models import PeakMemory, loss_fn, num_params
from .problems import Problem, lower_bound, make_problem

ROOT = Path(__file__).resolve().parents[1]
# pyDVL's interpreter (`make bench-env` creates it); BENCH_PYDVL_PYTHON points elsewhere
PYDVL_PYTHON = Path(os.environ.get("BENCH_PYDVL_PYTHON", ROOT / "benchmarks" / ".venv-pydvl" / "bin" / "python"))
SOLVERS = ("Direct", "CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC")


@dataclass
class Config:
    """One process run: a model, a training-set size and which solvers to run where."""

    model: str
    n_train: int
    n_test: int = 200
    ours: tuple[str, ...] = SOLVERS
    pydvl: tuple[str, ...] = SOLVERS
    reference: str = "Direct"  # "Direct", or "CG" (then CG runs with the reference tolerance)
    skipped: dict[str, str] = field(default_factory=dict)  # solver -> reason (ours and pyDVL)
    params: dict[str, dict] = field(default_factory=dict)  # per-solver overrides
    dask: bool = False
    epochs: int | None = None
    regularization: float = 0.1

    @property
    def key(self) -> str:
        return f"{self.model}/n{self.n_train}"


# Hyperparameters shared by both libraries (each names them its own way).
DEFAULTS = {
    "CG": {"rtol": 1e-4, "maxiter": 100},
    "CG-reference": {"rtol": 1e-5, "maxiter": 300},  # float32: the tightest tolerance CG reaches reliably
    "LiSSA": {"maxiter": 100, "rtol": 1e-4, "batch_size": 256},
    "Arnoldi": {"rank": 20, "krylov_dimension": 40},
    "Nystroem": {"rank": 20},
}

_DIRECT_BIG = (
    "DirectInfluence forms the p x p curvature with p curvature-vector sweeps over the training set; "
    "over the time budget here"
)
_PYDVL_BUDGET = "pyDVL run skipped to keep the full run within its time budget"
_PYDVL_CONV = "pyDVL's EkfacInfluence supports only Linear layers"


def full_configs() -> list[Config]:
    big = "over the time budget at this size (each iteration is a curvature sweep with 200 right-hand sides)"
    return [
        Config("mlp-1e4", 2000),
        Config(
            "mlp-1e4",
            20000,
            ours=("CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC"),
            reference="CG",
            pydvl=("CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC"),
            skipped={"Direct": _DIRECT_BIG},
            dask=True,
        ),
        Config(
            "cnn-digits",
            2000,
            pydvl=("Direct", "CG", "LiSSA", "Arnoldi", "Nystroem"),
            skipped={"EK-FAC (pyDVL)": _PYDVL_CONV},
        ),
        Config(
            "mlp-1e5",
            2000,
            ours=("CG", "Arnoldi", "Nystroem", "EK-FAC"),
            pydvl=("Arnoldi", "Nystroem", "EK-FAC"),
            reference="CG",
            skipped={"Direct": _DIRECT_BIG, "LiSSA": big, "CG (pyDVL)": _PYDVL_BUDGET},
        ),
        Config(
            "mlp-1e6",
            2000,
            ours=("Arnoldi", "Nystroem", "EK-FAC"),
            pydvl=("Nystroem", "EK-FAC"),
            reference="none",
            skipped={"Direct": _DIRECT_BIG, "CG": big, "LiSSA": big, "Arnoldi (pyDVL)": _PYDVL_BUDGET},
            params={"Arnoldi": {"rank": 10, "krylov_dimension": 20}, "Nystroem": {"rank": 10}},
        ),
    ]


def tiny_configs() -> list[Config]:
    return [
        Config(
            "mlp-tiny",
            300,
            n_test=20,
            regularization=0.5,
            params={
                "Arnoldi": {"rank": 10, "krylov_dimension": 20},
                "Nystroem": {"rank": 10},
                "LiSSA": {"maxiter": 30, "rtol": 1e-4, "batch_size": 100},
            },
        )
    ]


# -- our solvers --------------------------------------------------------------------------------
def score_chunk(p: int) -> int:
    """Samples per vmapped gradient call: as many as fit in about 256 MiB of gradients, 64..2048."""
    return int(max(64, min(2048, (256 << 20) // (4 * p))))


def solver_params(cfg: Config, name: str) -> dict:
    base = {"regularization": cfg.regularization}
    key = "CG-reference" if name == "CG" and cfg.reference == "CG" else name
    base.update(DEFAULTS.get(key, {}))
    base.update(cfg.params.get(name, {}))
    return base


def make_ours(name: str, model: torch.nn.Module, p: dict, chunk: int):
    import dask_influence as di

    loss, lam = loss_fn(), p["regularization"]
    if name == "Direct":
        return di.DirectInfluence(model, loss, regularization=lam, chunk_size=chunk)
    if name == "CG":
        return di.CgInfluence(model, loss, regularization=lam, rtol=p["rtol"], maxiter=p["maxiter"], chunk_size=chunk)
    if name == "LiSSA":
        return di.LissaInfluence(
            model,
            loss,
            regularization=lam,
            maxiter=p["maxiter"],
            rtol=p["rtol"],
            scale=p.get("scale"),
            batch_size=p["batch_size"],
            chunk_size=chunk,
        )
    if name == "Arnoldi":
        return di.ArnoldiInfluence(
            model, loss, regularization=lam, rank=p["rank"], krylov_dimension=p["krylov_dimension"], chunk_size=chunk
        )
    if name == "Nystroem":
        return di.NystroemSketchInfluence(model, loss, regularization=lam, rank=p["rank"], chunk_size=chunk)
    if name == "EK-FAC":
        return di.EkfacInfluence(model, loss, regularization=lam, update_diagonal=True, chunk_size=chunk)
    raise ValueError(name)


def run_ours(name: str, pb: Problem, p: dict, chunk: int) -> tuple[dict, np.ndarray]:
    import dask_influence as di

    solver = make_ours(name, pb.model, p, chunk)
    out: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", di.ConvergenceWarning)
        with PeakMemory() as mem_fit:
            t0 = time.perf_counter()
            solver.fit((pb.x_train, pb.y_train))
            out["fit_s"] = time.perf_counter() - t0
        with PeakMemory() as mem_infl:
            t0 = time.perf_counter()
            factors = solver.influence_factors(pb.x_test, pb.y_test)
            t1 = time.perf_counter()
            values = solver.influences_from_factors(factors, pb.x_train, pb.y_train)
            t2 = time.perf_counter()
    out.update(
        factors_s=t1 - t0,
        scoring_s=t2 - t1,
        peak_fit_bytes=mem_fit.peak_bytes,
        peak_influence_bytes=mem_infl.peak_bytes,
    )
    if name == "LiSSA":
        out["scale"] = solver.scale_
        out["iterations"] = solver.info_.iterations
    if name == "CG":
        out["iterations"] = solver.info_.iterations
    return out, values.numpy()


# -- pyDVL in its own environment ---------------------------------------------------------------
class PydvlProcess:
    """pyDVL's driver in its virtual environment, one command and one answer at a time."""

    def __init__(self, python: Path):
        self.proc = subprocess.Popen(
            [str(python), "-m", "benchmarks.pydvl_driver"],
            cwd=ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def ask(self, **msg) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        code = self.proc.wait()
        why = " (killed by SIGKILL: out of memory)" if code == -9 else ""
        return {"ok": False, "died": True, "error": f"pyDVL's process died with exit code {code}{why}"}

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def pydvl_status(python: Path | None = None) -> str | None:
    """``None`` if pyDVL's environment is usable, else why not."""
    python = python or PYDVL_PYTHON
    if not python.exists():
        return f"pyDVL's environment {python.parent.parent} is absent; create it with `make bench-env`"
    check = subprocess.run([str(python), "-c", "import pydvl.influence.torch"], capture_output=True, text=True)
    if check.returncode != 0:
        return f"pyDVL is not importable in {python.parent.parent}: {check.stderr.strip()[-300:]}"
    return None


# -- accuracy -------------------------------------------------------------------------------------
def compare(values: np.ndarray, reference: np.ndarray | None) -> dict:
    if reference is None:
        return {"pearson": None, "rel_error": None}
    a, b = values.ravel().astype(np.float64), reference.ravel().astype(np.float64)
    pearson = float(np.corrcoef(a, b)[0, 1])
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
    return {"pearson": pearson, "rel_error": rel}


# -- Dask ----------------------------------------------------------------------------------------
def run_dask(
    pb: Problem, solver_name: str, p: dict, chunk: int, train_block: int, pydvl: PydvlProcess | None, tmp: Path
) -> dict:
    from distributed import Client, LocalCluster

    import dask_influence as di

    solver = make_ours(solver_name, pb.model, p, chunk).fit((pb.x_train, pb.y_train))
    test, train = (pb.x_test, pb.y_test), (pb.x_train, pb.y_train)
    n_test = len(pb.x_test)
    out: dict = {
        "solver": solver_name,
        "n_train": pb.n_train,
        "n_test": n_test,
        "train_block": train_block,
        "seconds": {},
    }

    def job(client, blocks: int) -> float:
        calc = di.DaskInfluenceCalculator(solver, client, progress=False)
        t0 = time.perf_counter()
        calc.influences(test, train, test_block_size=-(-n_test // blocks), train_block_size=train_block).compute()
        return time.perf_counter() - t0

    for workers in (2, 1):
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            job(client, 1)  # warm-up: workers import torch and receive the solver once
            for blocks in (1, 8) if workers == 2 else (1,):
                out["seconds"][
                    f"ours, {workers} worker{'s' * (workers > 1)}, {blocks} test block{'s' * (blocks > 1)}"
                ] = job(client, blocks)
    if pydvl is not None:
        reply = pydvl.ask(
            cmd="dask",
            name=solver_name,
            test_blocks=8,
            train_block=train_block,
            workers=2,
            out=str(tmp / "pydvl_dask.npy"),
        )
        if reply["ok"]:
            out["seconds"]["pyDVL, 2 workers, 8 test blocks"] = reply["seconds"]
        else:
            out["pydvl_error"] = reply["error"]
    s = out["seconds"]
    ours8 = s.get("ours, 2 workers, 8 test blocks")
    if "pyDVL, 2 workers, 8 test blocks" in s and ours8:
        out["speedup_vs_pydvl_8_blocks"] = s["pyDVL, 2 workers, 8 test blocks"] / ours8
    out["speedup_2_vs_1_worker"] = s["ours, 1 worker, 1 test block"] / s["ours, 2 workers, 1 test block"]
    out["cost_8_vs_1_test_blocks"] = ours8 / s["ours, 2 workers, 1 test block"]
    return out


# -- one configuration ------------------------------------------------------------------------------
def run_config(cfg: Config, use_pydvl: bool, use_dask: bool, log) -> dict:
    t_start = time.perf_counter()
    pb = make_problem(cfg.model, cfg.n_train, cfg.n_test, epochs=cfg.epochs)
    p_count = num_params(pb.model)
    chunk = score_chunk(p_count)
    log(
        f"== {cfg.key}: p={p_count}, n_train={pb.n_train}, n_test={cfg.n_test}, chunk={chunk}, "
        f"train acc {pb.train_accuracy:.3f}, test acc {pb.test_accuracy:.3f}"
    )
    result: dict = {
        "model": cfg.model,
        "params": p_count,
        "model_bytes": 4 * p_count,
        "n_train": pb.n_train,
        "n_test": cfg.n_test,
        "chunk": chunk,
        "train_accuracy": pb.train_accuracy,
        "test_accuracy": pb.test_accuracy,
        "reference": cfg.reference,
        "skipped": dict(cfg.skipped),
        "solvers": {},
        "pydvl": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    pydvl = None
    try:

        def measure_lower_bound() -> None:
            lbs.append(lower_bound(pb.model, pb.x_train, pb.y_train, pb.x_test, pb.y_test, chunk=chunk)[0])

        lbs: list[dict] = []
        measure_lower_bound()
        measure_lower_bound()
        if use_pydvl and cfg.pydvl:
            torch.save(pb.model.state_dict(), tmp / "model.pt")
            for k in ("x_train", "y_train", "x_test", "y_test"):
                np.save(tmp / f"{k}.npy", getattr(pb, k))
            load = dict(
                cmd="load",
                model=cfg.model,
                state=str(tmp / "model.pt"),
                threads=torch.get_num_threads(),
                batch_size=chunk,
                score_chunk=chunk,
                **{k: str(tmp / f"{k}.npy") for k in ("x_train", "y_train", "x_test", "y_test")},
            )

            def start_pydvl() -> PydvlProcess:
                proc = PydvlProcess(PYDVL_PYTHON)  # the module global, read at call time
                result["pydvl_versions"] = proc.ask(**load)
                return proc

            pydvl = start_pydvl()
        order = [s for s in SOLVERS if s in cfg.ours or s in cfg.pydvl]
        if cfg.reference == "CG" and "CG" in order:
            order.remove("CG")
            order.insert(0, "CG")
        reference = None
        ours_values: dict[str, np.ndarray] = {}
        for i, name in enumerate(order):
            if i % 2:
                measure_lower_bound()  # interleaved with the solvers: the same machine load
            params = solver_params(cfg, name)
            runs = [("ours", name in cfg.ours), ("pyDVL", pydvl is not None and name in cfg.pydvl)]
            if i % 2:
                runs.reverse()  # alternate which implementation goes first
            for impl, wanted in runs:
                if not wanted:
                    continue
                log(f"   {impl} {name} {params}")
                if impl == "ours":
                    try:
                        row, values = run_ours(name, pb, params, chunk)
                    except Exception as err:  # recorded, and the run goes on
                        result["solvers"][name] = {"error": f"{type(err).__name__}: {err}"}
                        log(f"   ours {name} failed: {err}")
                        continue
                    if name == "LiSSA":
                        params = {**params, "scale": row["scale"]}  # pyDVL gets the same scale
                    row["params"] = params
                    ours_values[name] = values
                    if name == cfg.reference:
                        reference = values
                    result["solvers"][name] = row
                else:
                    if name == "LiSSA" and "scale" not in params:
                        params = {**params, "scale": _lissa_scale(pb, params, chunk)}
                    reply = pydvl.ask(cmd="solver", name=name, params=params, out=str(tmp / f"pydvl_{name}.npy"))
                    if reply.pop("ok"):
                        reply["values_file"] = str(tmp / f"pydvl_{name}.npy")
                        reply["params"] = params
                        result["pydvl"][name] = reply
                    else:
                        result["pydvl"][name] = {"error": reply["error"]}
                        log(f"   pyDVL {name} failed: {reply['error']}")
                        if reply.get("died"):
                            pydvl.close()
                            pydvl = start_pydvl()
        measure_lower_bound()
        # the bound is the fastest run (the first includes warm-up; the machine is shared)
        best = min(lbs, key=lambda lb: lb["total_s"])
        result["lower_bound"] = {**best, "median_total_s": float(np.median([lb["total_s"] for lb in lbs])), "runs": lbs}
        lb_total = result["lower_bound"]["total_s"]
        for name, row in result["solvers"].items():
            if "error" in row:
                continue
            row.update(compare(ours_values[name], reference))
            row["influence_s"] = row["factors_s"] + row["scoring_s"]
            row["end_to_end_s"] = row["fit_s"] + row["influence_s"]
            row["scoring_vs_lower_bound"] = row["scoring_s"] / lb_total
            row["influence_vs_lower_bound"] = row["influence_s"] / lb_total
            if name == cfg.reference:
                row["is_reference"] = True
        for name, row in result["pydvl"].items():
            if "error" in row:
                continue
            theirs = np.load(row.pop("values_file"))
            row.update(compare(theirs, reference))
            if name in ours_values:
                row["agreement_with_ours"] = compare(theirs, ours_values[name])["pearson"]
            row["influence_s"] = row["factors_s"] + row["scoring_s"]
            row["end_to_end_s"] = row["fit_s"] + row["influence_s"]
            row["scoring_vs_lower_bound"] = row["scoring_s"] / lb_total
            if "end_to_end_s" in result["solvers"].get(name, {}):
                result["solvers"][name]["speedup_vs_pydvl"] = (
                    row["end_to_end_s"] / result["solvers"][name]["end_to_end_s"]
                )
        if "fit_s" in result["solvers"].get("EK-FAC", {}):
            from .memory import fresh_process_peak

            log("   EK-FAC fit memory in a fresh process")
            result["ekfac_fit_memory"] = fresh_process_peak(
                cfg.model, pb.model, pb.x_train, pb.y_train, regularization=cfg.regularization, chunk=chunk
            )
        if use_dask and cfg.dask:
            log("   Dask calculators")
            result["dask"] = run_dask(
                pb,
                "Arnoldi",
                solver_params(cfg, "Arnoldi"),
                chunk,
                max(250, pb.n_train // 8),
                pydvl if pydvl is not None and "Arnoldi" in result["pydvl"] else None,
                tmp,
            )
    finally:
        if pydvl is not None:
            pydvl.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _lissa_scale(pb: Problem, params: dict, chunk: int) -> float:
    solver = make_ours("LiSSA", pb.model, {**params, "maxiter": 1}, chunk)
    return float(solver.fit((pb.x_train, pb.y_train)).scale_)


# -- reports ---------------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} threads; "
        f"pyDVL: {report.get('pydvl_note') or report.get('pydvl_versions', {}).get('pydvl', '-')}.",
        "",
    ]
    for res in report["configs"]:
        lb = res["lower_bound"]
        ref = {
            "Direct": "DirectInfluence",
            "CG": "CG with rtol 1e-5 (the CG rows)",
            "none": "none (nothing exact fits the budget)",
        }[res["reference"]]
        lines += [
            f"### {res['model']}, {res['params']:,} parameters, n_train = {res['n_train']:,}, n_test = {res['n_test']}",
            "",
            f"Lower bound (gradients + one product, fastest of {len(lb['runs'])} runs interleaved with the solvers): "
            f"**{lb['total_s']:.3f} s** (test gradients {lb['test_grads_s']:.3f} s, train gradients and product "
            f"{lb['scoring_s']:.3f} s; median {lb['median_total_s']:.3f} s). Accuracy reference: {ref}. "
            f"Times in seconds, memory in MiB above the process's baseline.",
            "",
            "| solver | impl | fit | factors | scoring | scoring / LB | end to end | peak fit | peak infl. "
            "| Pearson vs ref | rel. error | ours / pyDVL agree | speed-up vs pyDVL |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in SOLVERS:
            for impl, row in (("ours", res["solvers"].get(name)), ("pyDVL", res["pydvl"].get(name))):
                if row is None:
                    continue
                if "error" in row:
                    lines.append(f"| {name} | {impl} | failed: {row['error'][:120]} |" + " |" * 11)
                    continue
                ref_mark = " (ref)" if row.get("is_reference") else ""
                lines.append(
                    f"| {name}{ref_mark} | {impl} | {_f(row['fit_s'])} | {_f(row['factors_s'])} | "
                    f"{_f(row['scoring_s'])} | {_f(row['scoring_vs_lower_bound'], '{:.2f}x')} | "
                    f"{_f(row['end_to_end_s'])} | {_mib(row['peak_fit_bytes'])} | "
                    f"{_mib(row['peak_influence_bytes'])} | {_f(row.get('pearson'), '{:.4f}')} | "
                    f"{_f(row.get('rel_error'), '{:.3g}')} | "
                    f"{_f(row.get('agreement_with_ours'), '{:.4f}')} | {_f(row.get('speedup_vs_pydvl'), '{:.1f}x')} |"
                )
        if res["skipped"]:
            lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()) + "."]
        if "dask" in res:
            d = res["dask"]
            lines += [
                "",
                f"Dask calculators ({d['solver']}, {d['n_test']} x {d['n_train']:,}, "
                f"train blocks of {d['train_block']:,}, clusters started before timing):",
                "",
                "| configuration | seconds |",
                "| --- | --- |",
            ]
            lines += [f"| {k} | {v:.2f} |" for k, v in d["seconds"].items()]
            extra = [
                f"2 vs 1 worker: {d['speedup_2_vs_1_worker']:.2f}x faster",
                f"8 vs 1 test blocks: {d['cost_8_vs_1_test_blocks']:.2f}x the time",
            ]
            if "speedup_vs_pydvl_8_blocks" in d:
                extra.append(f"ours vs pyDVL with 8 test blocks: {d['speedup_vs_pydvl_8_blocks']:.1f}x faster")
            if "pydvl_error" in d:
                extra.append(f"pyDVL failed: {d['pydvl_error'][:200]}")
            lines += ["", "; ".join(extra) + "."]
        lines.append("")
    return "\n".join(lines)


def targets(report: dict) -> str:
    """The issue's targets as ratios, per configuration and solver, from one run's report."""
    lines = [
        "| configuration | solver | scoring / LB (fastest LB) | scoring / LB (median LB) | factors + scoring / LB | "
        "speed-up vs pyDVL, end to end | accuracy vs ref: ours / pyDVL (Pearson) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in report["configs"]:
        lb, lb_med = res["lower_bound"]["total_s"], res["lower_bound"]["median_total_s"]
        for name in SOLVERS:
            row = res["solvers"].get(name)
            if row is None or "error" in row:
                continue
            theirs = res["pydvl"].get(name, {})
            if "error" in theirs:
                speed = "pyDVL failed"
            elif "speedup_vs_pydvl" in row:
                speed = f"{row['speedup_vs_pydvl']:.1f}x"
            else:
                speed = "-"
            acc = f"{_f(row.get('pearson'), '{:.4f}')} / {_f(theirs.get('pearson'), '{:.4f}')}"
            lines.append(
                f"| {res['model']}, n={res['n_train']:,} | {name} | {row['scoring_s'] / lb:.2f}x | "
                f"{row['scoring_s'] / lb_med:.2f}x | {row['influence_s'] / lb:.1f}x | {speed} | {acc} |"
            )
    for res in report["configs"]:
        mem = res.get("ekfac_fit_memory") or {}
        if mem.get("peak_fit_bytes") is not None:
            peak = mem["peak_fit_bytes"]
            lines.append("")
            lines.append(
                f"EK-FAC fit peak memory (fresh process) on {res['model']}, n={res['n_train']:,}: "
                f"{peak / 2**20:.1f} MiB = {peak / res['model_bytes']:.1f}x the model's "
                f"{res['model_bytes'] / 2**20:.2f} MiB (fitted state {mem.get('state_bytes', 0) / 2**20:.1f} MiB)."
            )
        if "dask" in res and "speedup_vs_pydvl_8_blocks" in res["dask"]:
            lines.append("")
            lines.append(
                f"Dask calculator vs pyDVL's, 8 test blocks ({res['model']}, n={res['n_train']:,}): "
                f"{res['dask']['speedup_vs_pydvl_8_blocks']:.1f}x faster."
            )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_model: dict[str, list[dict]] = {}
    for res in report["configs"]:
        by_model.setdefault(res["model"], []).append(res)
    model = max(by_model, key=lambda m: len(by_model[m]))  # the model measured at most sizes
    runs = sorted(by_model[model], key=lambda r: r["n_train"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(SOLVERS):
        for impl, style in (("solvers", "-o"), ("pydvl", "--x")):
            pts = [
                (r["n_train"], r[impl][name]["end_to_end_s"])
                for r in runs
                if name in r[impl] and "end_to_end_s" in r[impl][name]
            ]
            if pts:
                ax.plot(
                    *zip(*pts),
                    style,
                    color=colors[i % len(colors)],
                    label=f"{name} ({'ours' if impl == 'solvers' else 'pyDVL'})",
                )
    ax.plot([r["n_train"] for r in runs], [r["lower_bound"]["total_s"] for r in runs], "k-s", lw=2, label="lower bound")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="n_train",
        ylabel="seconds, end to end (fit + factors + scoring)",
        title=f"{model}: time vs n_train (n_test = {runs[0]['n_test']})",
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["full", "tiny"], default="full")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", default=None, help="comma-separated config keys to run, e.g. mlp-1e4/n2000")
    parser.add_argument("--no-pydvl", action="store_true", help="skip pyDVL even if its environment exists")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask calculators")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    configs = full_configs() if args.config == "full" else tiny_configs()
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in configs if c.key in keep]
    note = "skipped (--no-pydvl)" if args.no_pydvl else pydvl_status()
    if note:
        log(f"pyDVL: {note}")
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": args.config,
        "date": time.strftime("%Y-%m-%d"),
        "pydvl_note": note,
        "configs": [],
    }
    for cfg in configs:
        res = run_config(cfg, use_pydvl=note is None, use_dask=not args.no_dask, log=log)
        if "pydvl_versions" in res:
            report["pydvl_versions"] = res.pop("pydvl_versions")
        report["configs"].append(res)
        (out / "results.json").write_text(json.dumps(report, indent=2))  # after each config: partial results survive
    (out / "results.md").write_text(markdown(report) + "\n### Targets\n\n" + targets(report) + "\n")
    if not args.no_plot:
        plot(report, out / "time_vs_n_train.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
