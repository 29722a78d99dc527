"""Distributed fitting: CG and EK-FAC fit time on 1 vs 2 workers of an embedded LocalCluster.

    python -m benchmarks.distributed_fit [--n-train 20000] [--block 2000] [--k 10] [--cg-iterations 1] [--repeats 1]
    python -m benchmarks.distributed_fit --tiny      # a seconds-long smoke run (the tests use it)

The problem: a float32 tanh MLP 256-1024-768-10 (1,058,058 parameters) and 20,000 random
training points in blocks of 2,000, GGN curvature. Measured with ``calc.fit(train)`` on
clusters of 1 and of 2 single-threaded workers. Only one cluster is alive at a time (on a
2-core machine an idle second cluster's processes measurably slow the busy one: 17.3 s
instead of 14.9 s for the 2-worker CG fit); each is started and warmed up (the same fits on
a small slice of the data) before timing, and each measurement on 2 workers is followed at
once by the same on 1 worker, so both see similar background load (the fastest of
``--repeats`` is kept):

- CG: the fit (its Nystroem preconditioner of rank ``k``: one sweep with ``k`` vectors) plus
  ``--cg-iterations`` block-CG iterations for ``k`` test gradients solved on the client
  (one sweep with at most ``k`` vectors each), i.e. the sweeps of a CG job's fit and solve;
- EK-FAC: the fit (the covariance pass, the eigendecompositions on the client, the
  corrected-eigenvalue pass).

Prints a markdown table and the 2-vs-1-worker speed-ups (target >= 1.7x).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from contextlib import ExitStack

import torch
from torch import nn

import dask_influence as di
from dask_influence.errors import NotPositiveDefiniteError
from dask_influence.mapping.fitting import solving_on_cluster
from dask_influence.mapping.sources import as_source

TINY = ["--n-train", "300", "--block", "100", "--k", "3", "--width", "8", "16", "12", "3"]


def problem(n_train: int, widths: list[int], k: int, seed: int = 0):
    """An MLP with ``widths`` (input, hidden..., classes), random data, and ``k`` test points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + k, widths[0], generator=g)
    y = torch.randint(0, widths[-1], (n_train + k,), generator=g)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).eval()
    return model, nn.CrossEntropyLoss(), (x[:n_train].numpy(), y[:n_train].numpy()), (x[n_train:], y[n_train:])


def time_cg(client, model, loss, train, test, block: int, k: int, iterations: int) -> dict[str, float]:
    solver = di.CgInfluence(
        model,
        loss,
        regularization=1e-3,
        curvature="ggn",
        preconditioner="nystroem",
        preconditioner_rank=k,
        maxiter=iterations,
        rtol=1e-12,
    )
    calc = di.DaskInfluenceCalculator(solver, client, progress=False)
    start = time.perf_counter()
    calc.fit(train, train_block_size=block)
    fitted = time.perf_counter()
    rhs = solver.per_sample_grads(*test)
    with warnings.catch_warnings(), solving_on_cluster(solver, client, as_source(train, block_size=block)) as cg:
        warnings.simplefilter("ignore")  # a few iterations do not reach rtol
        cg.apply_inverse(rhs)
    solved = time.perf_counter()
    return {"CG fit": fitted - start, "CG solve": solved - fitted, "CG fit + solve": solved - start}


def time_ekfac(client, model, loss, train, block: int) -> dict[str, float]:
    calc = di.DaskInfluenceCalculator(di.EkfacInfluence(model, loss, regularization=1e-2), client, progress=False)
    start = time.perf_counter()
    calc.fit(train, train_block_size=block)
    return {"EK-FAC fit": time.perf_counter() - start}


def cluster(stack: ExitStack, workers: int):
    from distributed import Client, LocalCluster

    local = stack.enter_context(
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    )
    client = stack.enter_context(Client(local))
    client.run(lambda: __import__("dask_influence.mapping.fitting"))  # imports before timing
    return client


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--block", type=int, default=2_000, help="training points per block")
    parser.add_argument("--k", type=int, default=10, help="right-hand sides and preconditioner rank")
    parser.add_argument("--cg-iterations", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="keep the fastest of this many runs")
    parser.add_argument(
        "--width", type=int, nargs="+", default=[256, 1024, 768, 10], help="input, hidden and output widths of the MLP"
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args((TINY if "--tiny" in argv else []) + argv)
    torch.set_num_threads(1)
    model, loss, train, test = problem(args.n_train, args.width, args.k)
    p = sum(t.numel() for t in model.parameters())
    seconds: dict[int, dict[str, float]] = {1: {}, 2: {}}
    warm = max(2, 2 * args.block // 8)  # a slice of the data: two blocks of a quarter size
    small = (train[0][:warm], train[1][:warm])
    phases = [
        lambda c, t, b: time_cg(c, model, loss, t, test, b, args.k, args.cg_iterations),
        lambda c, t, b: time_ekfac(c, model, loss, t, b),
    ]
    for _ in range(args.repeats):
        for phase in phases:
            for w in (2, 1):
                with ExitStack() as stack:  # one cluster alive at a time
                    client = cluster(stack, w)
                    try:  # warm-up, not timed: the same code paths on every worker
                        phase(client, small, max(1, warm // 2))
                    except NotPositiveDefiniteError:  # EK-FAC's check on so few points; the sweeps ran
                        pass
                    for name, value in phase(client, train, args.block).items():
                        seconds[w][name] = min(value, seconds[w].get(name, value))
    speedup = {name: seconds[1][name] / seconds[2][name] for name in seconds[1]}
    print(
        f"p={p:,}, n_train={args.n_train:,} in blocks of {args.block:,}, k={args.k}, "
        f"{args.cg_iterations} CG iterations, float32, GGN"
    )
    print("| fit | 1 worker (s) | 2 workers (s) | speed-up |\n| --- | --- | --- | --- |")
    for name in seconds[1]:
        print(f"| {name} | {seconds[1][name]:.1f} | {seconds[2][name]:.1f} | {speedup[name]:.2f}x |")
    print(
        f"\nCG fit + solve: {speedup['CG fit + solve']:.2f}x, EK-FAC fit: {speedup['EK-FAC fit']:.2f}x faster on "
        "2 workers than on 1 (target >= 1.7x)"
    )
    return {"params": p, "n_train": args.n_train, "seconds": seconds, "speedup": speedup}


if __name__ == "__main__":
    main()
