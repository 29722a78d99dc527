"""DirectInfluence end to end against the lower bound, for models of a few thousand parameters.

    python -m benchmarks.direct_bound                 # MLPs of 1,066 / 2,535 / 4,650 parameters and the digits CNN
    python -m benchmarks.direct_bound --tiny          # a smoke run
    python -m benchmarks.direct_bound --out direct.json

Per model (trained once with AdamW, float32; 2,000 training and 100 test points, the CNN
1,597): the **lower bound** (per-sample gradients of all test and train points plus one
product, fastest of 3) and DirectInfluence with the GGN (formed from per-sample output
Jacobians) and with the exact Hessian (``p`` Hessian-vector products, 64 per sweep; skipped
above ``--hessian-max`` parameters), each timed by phase: fit (forming ``H`` and the checked
Cholesky factorization), factors (the 100 test points) and scoring. The factorization is also
timed alone, next to the float64 ``eigh`` that Direct used before (same matrix), so the table
says where the fit's time goes. The **dense bound** of the GGN is the arithmetic that any dense
exact method must do: one product ``A^T A`` of ``A`` ``(n c, p)`` (``c`` outputs per sample,
``n c p^2`` multiply-adds in one GEMM of the model's dtype, random numbers, fastest of 2) plus
the Cholesky factorization. One torch thread per process unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import torch

import dask_influence as di

from .models import loss_fn, num_params
from .problems import lower_bound, make_problem

MODELS = ("mlp-1k", "mlp-2.5k", "mlp-5k", "cnn-digits")


def measure(name: str, n_train: int, n_test: int, hessian_max: int, regularization: float) -> dict:
    pb = make_problem(name, n_train, n_test)
    p = num_params(pb.model)
    lbs = [lower_bound(pb.model, pb.x_train, pb.y_train, pb.x_test, pb.y_test, chunk=2048)[0] for _ in range(3)]
    row: dict = {"model": name, "params": p, "n_train": len(pb.x_train), "n_test": len(pb.x_test)}
    row["lower_bound_s"] = min(lb["total_s"] for lb in lbs)
    train = (torch.from_numpy(pb.x_train), torch.from_numpy(pb.y_train))
    test = (torch.from_numpy(pb.x_test), torch.from_numpy(pb.y_test))
    c = int(pb.model(test[0][:1]).numel())
    a = torch.randn(len(pb.x_train) * c, p)
    gemm = []
    for _ in range(2):
        g0 = time.perf_counter()
        a.T @ a
        gemm.append(time.perf_counter() - g0)
    row["gemm_s"] = min(gemm)
    del a
    for curvature in ("ggn", "hessian"):
        if curvature == "hessian" and p > hessian_max:
            row[curvature] = {"skipped": f"p = {p:,} > --hessian-max {hessian_max:,}"}
            continue
        solver = di.DirectInfluence(
            pb.model, loss_fn(), regularization=regularization, curvature=curvature, chunk_size=2048
        )
        warm = di.DirectInfluence(pb.model, loss_fn(), regularization=1e3, curvature=curvature, chunk_size=2048)
        warm.fit((train[0][:64], train[1][:64]))  # untimed: torch.func's first calls
        lam, note = regularization, None
        t0 = time.perf_counter()
        try:
            solver.fit(train)
        except di.NotPositiveDefiniteError as err:  # the fit is kept: solve at the suggested value
            lam = solver.regularization = err.suggested_regularization
            note = f"H indefinite: regularization {lam:g}"
        t1 = time.perf_counter()
        factors = solver.influence_factors(*test)
        t2 = time.perf_counter()
        solver.influences_from_factors(factors, *train)
        t3 = time.perf_counter()
        h = solver.hessian.double()
        eye = torch.eye(p, dtype=h.dtype)
        s0 = time.perf_counter()
        torch.linalg.cholesky(h + lam * eye)
        s1 = time.perf_counter()
        torch.linalg.eigh(h)
        s2 = time.perf_counter()
        total = t3 - t0
        row[curvature] = {
            "fit_s": t1 - t0,
            "factors_s": t2 - t1,
            "scoring_s": t3 - t2,
            "end_to_end_s": total,
            "vs_lower_bound": total / row["lower_bound_s"],
            "cholesky_s": s1 - s0,
            "eigh_s": s2 - s1,
            "forming_s": (t1 - t0) - (s1 - s0),
            "note": note,
        }
        if curvature == "ggn":
            row[curvature]["dense_bound_s"] = row["gemm_s"] + (s1 - s0)
            row[curvature]["vs_dense_bound"] = total / row[curvature]["dense_bound_s"]
    return row


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} thread(s); "
        f"regularization {report['regularization']}.",
        "",
        "| model | p | n_train | lower bound (s) | curvature | end to end (s) | / lower bound | forming H (s) | "
        "Cholesky (s) | eigh, before (s) | factors + scoring (s) | dense bound (s) | / dense bound |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        for curvature in ("ggn", "hessian"):
            r = row[curvature]
            head = (
                f"| {row['model']} | {row['params']:,} | {row['n_train']:,} | {row['lower_bound_s']:.3f} | "
                f"{curvature}{' (' + r['note'] + ')' if r.get('note') else ''} |"
            )
            if "end_to_end_s" not in r:
                lines.append(head + f" {r.get('skipped') or r.get('error')} | | | | | | | |")
                continue
            dense = f" {r['dense_bound_s']:.2f} | {r['vs_dense_bound']:.1f}x |" if "dense_bound_s" in r else " - | - |"
            lines.append(
                head + f" {r['end_to_end_s']:.2f} | {r['vs_lower_bound']:.0f}x | {r['forming_s']:.2f} | "
                f"{r['cholesky_s']:.2f} | {r['eigh_s']:.2f} | {r['factors_s'] + r['scoring_s']:.2f} |" + dense
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: one small MLP, 300 training points")
    parser.add_argument("--models", default=None, help="comma-separated, from " + ", ".join(MODELS))
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--hessian-max", type=int, default=3000, help="skip the Hessian above this many parameters")
    parser.add_argument("--regularization", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = ["mlp-1k"] if args.tiny else (args.models.split(",") if args.models else list(MODELS))
    n_train, n_test = (300, 20) if args.tiny else (args.n_train, args.n_test)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in models:
            rows.append(measure(name, n_train, n_test, args.hessian_max, args.regularization))
            print(f"{name}: done", flush=True)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "regularization": args.regularization,
        "rows": rows,
    }
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
