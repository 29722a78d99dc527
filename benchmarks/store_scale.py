"""Time and peak memory of `inspect` and `run --resume` on stores of many chunks.

    python -m benchmarks.store_scale [--sizes 1000 10000 100000] [--workdir DIR] [--json OUT]

For each size, a store of that many chunks is built fast: the example batch job's linear
model (21 parameters) with test and train blocks of ONE point, so ``n_test x n_train`` chunks
(1,000 = 10 x 100, 10,000 = 100 x 100, 100,000 = 100 x 1,000). The job runs in this process
(``[cluster] sequential = true``): what is measured is the store, not a cluster's start. The
fit comes from ``run --fit-only``; the influences are computed in memory and written to a
store created by the library with the job's exact configuration, then flagged done and
marked complete, so that ``run --resume`` accepts it. Each command then runs alone in a
fresh process (wall time, and the child's peak RSS from ``getrusage``):

- ``inspect`` (with statistics, which stream every chunk) and ``inspect --no-stats``;
- ``run --resume`` of the complete store;
- ``run --resume`` with 10 chunks missing, as a killed driver leaves them (their data and
  flag files deleted, the manifest not marking them done), and the same without a manifest
  (a store of the previous version: every flag is read);
- ``inspect --verify --no-stats`` (reads every flag and chunk);
- the fixed costs, for reference: ``dask-influence --help`` (starting the command line, which
  imports no subcommand's module), ``import torch`` (paid by every ``run``: the job's
  factory builds a torch model) and torch's first ``torch.func.grad`` (it imports
  ``torch._dynamo``: paid by every ``run`` that computes a chunk).

The issue's target: under 5 s and 500 MB for 100,000 chunks, growing no faster than the
number of missing chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "batch_job"
CLI = [sys.executable, "-c", "from dask_influence.cli.main import main; main()"]
SHAPES = {1_000: (10, 100), 10_000: (100, 100), 100_000: (100, 1_000)}
MISSING = 10
FIRST_GRAD = "import torch; torch.func.grad(lambda x: (x * x).sum())(torch.ones(3))"

# runs one command and reports its wall time and its peak RSS (its own, not this process's)
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
out = (done.stdout + done.stderr)[-400:]
print(json.dumps({"seconds": seconds, "peak_mb": peak, "rc": done.returncode, "out": out}))
"""


def shape_of(size: int) -> tuple[int, int]:
    if size in SHAPES:
        return SHAPES[size]
    n_test = max(1, int(round(size**0.5 / 10)) * 10) if size >= 100 else 1
    return n_test, size // n_test


def write_job(where: Path, n_test: int, n_train: int) -> Path:
    job = where / "job.toml"
    job.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "factory:make_problem"
        path = "{EXAMPLE}"
        options = {{ n_train = {n_train}, n_test = {n_test} }}

        [solver]
        method = "direct"
        regularization = 1e-3

        [blocks]
        test = 1
        train = 1

        [output]
        store = "{where / "store.zarr"}"

        [cluster]
        sequential = true
        """)
    )
    return job


def build(where: Path, n_test: int, n_train: int) -> tuple[Path, float]:
    """A complete store of ``n_test x n_train`` chunks for the job in ``where``; returns its job file."""
    import zarr
    from torch.utils.data import DataLoader

    import dask_influence as di
    from dask_influence.job import load_job, load_problem, make_solver
    from dask_influence.mapping.fitting import fit_path_for
    from dask_influence.storage import store as zstore

    start = time.perf_counter()
    job_file = write_job(where, n_test, n_train)
    done = subprocess.run([*CLI, "run", str(job_file), "--fit-only", "--quiet"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout + done.stderr)
    job = load_job(job_file)
    problem = load_problem(job)
    solver = make_solver(job, problem.model, problem.loss)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    train = DataLoader(problem.train, batch_size=1, shuffle=False)
    test = DataLoader(problem.test, batch_size=1, shuffle=False)
    calc.fit(train, path=fit_path_for(job.output.store))
    graph = calc._graph(test, train, "up", None, None, record_solves=False, all_tasks=False)
    layout = zstore.StoreLayout(graph.plan.test_sizes, graph.plan.train_sizes, None, graph.dtype, None, False)
    config = calc._config(graph, layout)
    path = job.output.store
    group = zstore.prepare_store(
        path, config=config, layout=layout, resume=False, overwrite=True, fit=calc._fit_identity(config, None)
    )
    x, y = problem.train.tensors
    xt, yt = problem.test.tensors
    values = solver.influences(xt, yt, x, y).numpy().astype(graph.dtype)
    with zarr.config.set({"async.concurrency": 64}):
        group["influences"][...] = values
        group["influences_done"][...] = np.ones((n_test, n_train), dtype="int8")
    state = zstore.CompletionState(current=1, generation=1, values={"influences": np.ones((n_test, n_train), np.uint8)})
    zstore.CompletionRecorder(group, state).flush(final=True)
    zstore.mark_complete(group, {"test_groups": [list(g) for g in graph.plan.test_groups]}, state)
    return job_file, time.perf_counter() - start


def measure(*command: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"]:
        raise RuntimeError(f"{' '.join(command[-4:])} failed: {result['out']}")
    return result


def lose(store: Path, n_test: int, n_train: int, k: int, *, keep_manifest: bool) -> None:
    """``k`` chunks lost as a killed driver leaves them: data and flags gone, not in the manifest."""
    import zarr

    from dask_influence.storage import completion, manifest
    from dask_influence.storage.layout import ATTR

    rng = np.random.default_rng(k)
    picks = rng.choice(n_test * n_train, size=k, replace=False)
    group = zarr.open_group(str(store), mode="r+")
    found, _ = manifest.read_manifest(group)
    for flat in picks:
        i, j = divmod(int(flat), n_train)
        for name in ("influences", "influences_done"):
            (store / name / "c" / str(i) / str(j)).unlink(missing_ok=True)
        if found is not None:
            found.values["influences"][i, j] = 0
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}
    if keep_manifest and found is not None:
        found.final = False
        manifest.write_manifest(group, found)
    elif not keep_manifest:
        shutil.rmtree(store / manifest.GROUP, ignore_errors=True)
    assert completion.load_state(group).counts()["influences"][0] == n_test * n_train - k


def bench(size: int, workdir: Path) -> dict:
    n_test, n_train = shape_of(size)
    where = workdir / f"chunks-{size}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    job, build_s = build(where, n_test, n_train)
    store = where / "store.zarr"
    out: dict = {"chunks": n_test * n_train, "grid": [n_test, n_train], "build_s": round(build_s, 1)}
    out["startup"] = measure(*CLI, "--help")  # the command line alone: not the store's cost
    out["import_torch"] = measure(sys.executable, "-c", "import torch")  # every run's fixed cost
    out["torch_first_grad"] = measure(sys.executable, "-c", FIRST_GRAD)  # every computing run's
    out["inspect"] = measure(*CLI, "inspect", str(store))
    out["inspect_no_stats"] = measure(*CLI, "inspect", str(store), "--no-stats")
    out["resume_complete"] = measure(*CLI, "run", str(job), "--resume", "--quiet")
    lose(store, n_test, n_train, MISSING, keep_manifest=True)
    out["resume_10_missing"] = measure(*CLI, "run", str(job), "--resume", "--quiet")
    lose(store, n_test, n_train, MISSING, keep_manifest=False)
    out["resume_10_missing_no_manifest"] = measure(*CLI, "run", str(job), "--resume", "--quiet")
    out["inspect_verify"] = measure(*CLI, "inspect", str(store), "--verify", "--no-stats")
    for value in out.values():
        if isinstance(value, dict):
            value.pop("out", None)
            value.pop("rc", None)
            value["seconds"] = round(value["seconds"], 2)
            value["peak_mb"] = round(value["peak_mb"])
    shutil.rmtree(where, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the stores (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="store-scale-"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    try:
        for size in args.sizes:
            results[size] = bench(size, workdir)
            r = results[size]
            print(
                f"{r['chunks']:>8,} chunks ({r['grid'][0]} x {r['grid'][1]}, built in {r['build_s']} s): "
                + "; ".join(f"{k} {v['seconds']} s {v['peak_mb']} MB" for k, v in r.items() if isinstance(v, dict)),
                flush=True,
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
