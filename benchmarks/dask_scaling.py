"""Dask calculator scaling on the embedded LocalCluster, measured side by side in one run.

    python -m benchmarks.dask_scaling [--n-train 200000] [--n-test 512] [--repeats 2] [--top-k 10]

Times ``influences_to_zarr`` (cluster already started, so start-up is not counted) for
1 worker vs 2 workers (the speed-up target is >= 1.8x on a 2-core machine), for the
test set in 1 block vs 8 blocks on 2 workers (target: 8 blocks cost <= 1.2x of 1 block,
since train gradients are computed once per train block whatever the number of test
blocks), and for the job with ``top_k`` vs without on 2 workers (target: <= 1.2x; the
top-k candidates of each chunk are selected where the chunk is computed and merged per
test block). Prints a markdown table with the ratios.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import dask_influence as di


def problem(
    n_train: int, n_test: int, solver_name: str, d: int = 32, hidden: int = 32, classes: int = 10, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, d, generator=g)
    y = torch.randint(0, classes, (n_train,), generator=g)
    xt = torch.randn(n_test, d, generator=g)
    yt = torch.randint(0, classes, (n_test,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).eval()
    loss = nn.CrossEntropyLoss()
    if solver_name == "direct":
        solver = di.DirectInfluence(model, loss, regularization=1e-2, curvature="ggn")
    else:
        solver = di.CgInfluence(model, loss, regularization=1e-2, curvature="ggn", rtol=1e-4)
    solver.fit((x[:2000], y[:2000]))
    return solver, (x.numpy(), y.numpy()), (xt.numpy(), yt.numpy())


def timed_job(
    solver, client, test, train, test_block: int, train_block: int, out: Path, top_k: int | None = None
) -> float:
    calc = di.DaskInfluenceCalculator(solver, client, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    calc.influences_to_zarr(test, train, out, test_block_size=test_block, train_block_size=train_block, top_k=top_k)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-test", type=int, default=512)
    parser.add_argument("--train-block", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=10, help="k of the top-k job (0: no top-k job)")
    parser.add_argument("--one-worker", action=argparse.BooleanOptionalAction, default=True, help="time 1 worker")
    parser.add_argument(
        "--solver",
        choices=["direct", "cg"],
        default="direct",
        help="direct isolates the mapping layer (cheap factors); with cg the factor phase is a CG solve per test block",
    )
    args = parser.parse_args(argv)
    solver, train, test = problem(args.n_train, args.n_test, args.solver)
    tmp = Path(tempfile.mkdtemp())
    top = f"2 workers, top-{args.top_k}"
    times: dict[str, list[float]] = {"1 worker": [], "2 workers": [], "2 workers, 8 test blocks": [], top: []}
    try:
        with (
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            for _ in range(args.repeats):
                times["2 workers"].append(
                    timed_job(solver, client, test, train, args.n_test, args.train_block, tmp / "a.zarr")
                )
                times["2 workers, 8 test blocks"].append(
                    timed_job(solver, client, test, train, args.n_test // 8, args.train_block, tmp / "b.zarr")
                )
                if args.top_k:
                    times[top].append(
                        timed_job(
                            solver, client, test, train, args.n_test, args.train_block, tmp / "t.zarr", args.top_k
                        )
                    )
        if not args.one_worker:
            return _report(args, solver, {k: v for k, v in times.items() if v})
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            for _ in range(args.repeats):
                times["1 worker"].append(
                    timed_job(solver, client, test, train, args.n_test, args.train_block, tmp / "c.zarr")
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(args, solver, {k: v for k, v in times.items() if v})


def _report(args: argparse.Namespace, solver, times: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    top = f"2 workers, top-{args.top_k}"
    result = {
        "seconds": med,
        "speedup_2_vs_1_worker": med["1 worker"] / med["2 workers"] if "1 worker" in med else None,
        "cost_8_vs_1_test_blocks": med["2 workers, 8 test blocks"] / med["2 workers"],
        "cost_top_k": med[top] / med["2 workers"] if top in med else None,
        "solver": type(solver).__name__,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "params": solver.num_params,
    }
    print(f"n_train={args.n_train}, n_test={args.n_test}, p={solver.num_params}, {type(solver).__name__}")
    print("| configuration | seconds (median) |\n| --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    if result["speedup_2_vs_1_worker"] is not None:
        print(f"\n2 workers vs 1: {result['speedup_2_vs_1_worker']:.2f}x faster (target >= 1.8x)")
    print(f"8 test blocks vs 1: {result['cost_8_vs_1_test_blocks']:.2f}x the time (target <= 1.2x)")
    if result["cost_top_k"] is not None:
        print(f"top-{args.top_k} vs none: {result['cost_top_k']:.2f}x the time (target <= 1.2x)")
    return result


if __name__ == "__main__":
    main()
