"""The gradient index (``di.GradientIndex``): accuracy against exact influences for several
``k``, build throughput against per-sample gradients, and a million training points on a
LocalCluster of 1 and of 2 workers.

    python -m benchmarks.index --tiny                        # smoke run of all three parts (minutes)
    python -m benchmarks.index --parts accuracy              # the accuracy tables (docs/benchmarks.md)
    python -m benchmarks.index --parts throughput,scale      # build speed, size, query time, 1e6 points
    python -m benchmarks.index --problems cnn-digits         # one accuracy problem only

Writes ``OUT/index.json`` (``OUT/index-tiny.json`` with ``--tiny``; a run of some parts
updates the file's other parts in place) and prints markdown tables.

1. **Accuracy vs k.** On the digits CNN, an MLP of ~1e5 parameters on digits and the tiny
   GPT-2 causal LM of :mod:`benchmarks.transformers` (trained on sequences of a random
   Markov chain; dict batches), all in float64: indexes for several ``k``, projections
   (``sjlt``, ``kronecker``, ``gaussian`` where ``p * k`` is small, ``orthogonal`` at
   ``k = p``) and both preconditioners (``"curvature"``: the projected GGN; ``"fisher"``:
   the projected empirical Fisher ``Phi^T Phi / n``), queried at the SAME ``lambda`` as the
   exact GGN influences they are compared with (DirectInfluence for ``p <= 5,000``, else CG
   at ``rtol=1e-8`` with a Nystroem preconditioner). ``lambda = 1e-3 * lambda_max(GGN)`` (the
   direct solver's eigenvalues, or subspace iteration through the CG solver's curvature
   operator), so ``G + lambda I`` has a condition number of about 1,000 at most. Reported:
   Pearson and Spearman of the index's influences against the exact ones, pooled over every
   test x train entry and as the mean over test rows, and the overlap of the top-10 most
   helpful training points per test point (mean ``|intersection| / 10``).
2. **Build throughput** (float32 MLP, one process, one torch thread): seconds per 1,000
   training points of the build against the lower bound (per-sample gradients alone,
   ``torch.func.vmap(grad)``), hence the projection overhead; index size per training point
   (float16 and float32, raw and on disk); query time for 1,000 test points on a 2-worker
   LocalCluster (``top_k`` and ``influences_to_zarr``).
3. **Scale**: a small MLP (64-32-10, 2,410 parameters) over generated data (a dask array
   from ``da.random``: the data is never in driver memory), ``n_train`` = 1e5 and 1e6 (2e4
   and 1e5 with ``--tiny``), indexed on a LocalCluster (127.0.0.1) of 1 and of 2 workers
   (one cluster alive at a time, warmed up): the time ratio, and the peak resident memory
   of every worker (psutil, sampled every 50 ms) and of the driver, which do not grow with
   ``n_train``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import dask_influence as di

from .models import N_CLASSES, N_FEATURES, build_model, loss_fn

LAMBDA_RELATIVE = 1e-3
"""``lambda = LAMBDA_RELATIVE * (the largest eigenvalue of the GGN)``: ``G + lambda I`` has a
condition number of at most about 1,000, whatever the number of parameters."""
CG_PRECONDITIONER_RANK = 256
LAMBDA_SWEEP = (0.1, 10.0)
"""Extra multiples of ``lambda`` at which the direct-solver problems are compared too (free:
the index and the direct solver change ``lambda`` without a refit)."""
DIRECT_MAX_PARAMS = 5_000
"""Exact reference by DirectInfluence up to this many parameters, else CG at ``rtol=1e-8``."""
GAUSSIAN_MAX_ENTRIES = 1 << 23
"""A Gaussian projection is measured only where ``p * k`` is at most this."""
ORTHOGONAL_MAX_ENTRIES = 1 << 26
"""The library's limit for a dense orthogonal projection (``k * p`` entries)."""
TOP = 10
SEED = 0


# -- problems -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccuracyPlan:
    """One accuracy problem: its name, sizes, the ``k`` asked for and the train block size."""

    problem: str
    n_train: int
    n_test: int
    ks: tuple[int, ...]
    block_size: int
    epochs: int


ACCURACY_FULL: tuple[AccuracyPlan, ...] = (
    AccuracyPlan("cnn-digits", 300, 50, (64, 256, 1024, 4096), 100, 30),
    AccuracyPlan("mlp-1e5-digits", 300, 50, (64, 256, 1024, 4096), 100, 15),
    AccuracyPlan("gpt2-tiny", 300, 50, (64, 256, 1024, 4096), 100, 30),
)
ACCURACY_TINY: tuple[AccuracyPlan, ...] = (
    AccuracyPlan("mlp-tiny-digits", 64, 8, (16, 64, 4096), 32, 30),  # smallest: the test runs it
    AccuracyPlan("cnn-digits", 48, 8, (64, 256), 24, 20),
    AccuracyPlan("gpt2-tiny", 32, 8, (64, 256), 16, 20),
)


@dataclass
class Problem:
    """A trained float64 model, its loss or task, and train and test data as the index takes them."""

    name: str
    model: nn.Module
    objective: Any  # a pair loss or a Task
    train: Any  # (x, y) numpy arrays or a dict of numpy arrays
    test: Any
    pairs: bool
    train_accuracy: float
    test_accuracy: float

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def solver_args(self, data: Any) -> tuple:
        return tuple(data) if self.pairs else (data,)


def _fit_adamw(model: nn.Module, loss: Callable[[Any], torch.Tensor], n: int, epochs: int, batch: int = 32) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            opt.zero_grad()
            loss(perm[s : s + batch]).backward()
            opt.step()
    model.eval()


def digits_problem(name: str, plan: AccuracyPlan) -> Problem:
    """The digits CNN (``cnn-digits``) or an MLP of :data:`~.models.MLP_WIDTHS` on flattened digits."""
    from .problems import digits

    x, y = digits(SEED)
    model_name = name if name == "cnn-digits" else name.removesuffix("-digits")
    if model_name != "cnn-digits":
        x = x.reshape(len(x), -1)
    x_train, y_train = x[: plan.n_train], y[: plan.n_train]
    x_test, y_test = x[plan.n_train : plan.n_train + plan.n_test], y[plan.n_train : plan.n_train + plan.n_test]
    torch.manual_seed(SEED)
    model = build_model(model_name)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    ce = loss_fn()
    _fit_adamw(model, lambda idx: ce(model(xt[idx]), yt[idx]), len(xt), plan.epochs)
    model = model.double()
    with torch.no_grad():
        train_acc = float((model(xt.double()).argmax(1) == yt).double().mean())
        test_pred = model(torch.from_numpy(x_test).double()).argmax(1)
        test_acc = float((test_pred == torch.from_numpy(y_test)).double().mean())
    return Problem(
        name,
        model,
        loss_fn(),
        (x_train.astype(np.float64), y_train),
        (x_test.astype(np.float64), y_test),
        True,
        train_acc,
        test_acc,
    )


def markov_sequences(n: int, vocab: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` sequences of a random sparse Markov chain over ``vocab`` tokens, every fifth padded."""
    rng = np.random.default_rng(seed)
    transitions = rng.dirichlet(np.full(vocab, 0.2), size=vocab)
    cumulative = np.cumsum(transitions, axis=1)
    ids = np.empty((n, length), np.int64)
    ids[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, length):
        u = rng.random(n)[:, None]
        ids[:, t] = np.minimum((cumulative[ids[:, t - 1]] < u).sum(1), vocab - 1)
    mask = np.ones_like(ids)
    mask[::5, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def gpt2_problem(plan: AccuracyPlan) -> Problem:
    """The tiny GPT-2 of :mod:`benchmarks.transformers` (eager attention) trained on Markov sequences."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .transformers import SIZES

    cfg: dict[str, Any] = dict(SIZES["tiny"])
    torch.manual_seed(SEED)
    config: dict[str, Any] = {**cfg, "bos_token_id": 0, "eos_token_id": 0, "attn_implementation": "eager"}
    model = GPT2LMHeadModel(GPT2Config(**config))
    data = markov_sequences(plan.n_train + plan.n_test, cfg["vocab_size"], cfg["n_positions"], SEED)
    train = {k: v[: plan.n_train] for k, v in data.items()}
    test = {k: v[plan.n_train :] for k, v in data.items()}
    task = di.tasks.causal_lm()
    tensors = {k: torch.from_numpy(v) for k, v in train.items()}
    _fit_adamw(model, lambda idx: task.loss(model, {k: v[idx] for k, v in tensors.items()}), plan.n_train, plan.epochs)
    model = model.double().eval()

    def accuracy(batch: dict[str, np.ndarray]) -> float:  # next-token accuracy on unpadded positions
        with torch.no_grad():
            ids = torch.from_numpy(batch["input_ids"])
            mask = torch.from_numpy(batch["attention_mask"])
            logits = model(input_ids=ids, attention_mask=mask).logits
        hit = (logits[:, :-1].argmax(-1) == ids[:, 1:]) & (mask[:, 1:] > 0)
        return float(hit.sum() / (mask[:, 1:] > 0).sum())

    return Problem("gpt2-tiny", model, task, train, test, False, accuracy(train), accuracy(test))


def make_accuracy_problem(plan: AccuracyPlan) -> Problem:
    if plan.problem == "gpt2-tiny":
        return gpt2_problem(plan)
    if plan.problem.endswith("-digits"):
        return digits_problem(plan.problem, plan)
    raise ValueError(f"unknown accuracy problem {plan.problem!r}")


# -- exact reference ----------------------------------------------------------------------------
def exact_reference(problem: Problem) -> tuple[Callable[[float], np.ndarray], dict]:
    """``(influences_at(lambda), info)``: exact GGN influences ``(n_test, n_train)`` at any
    ``lambda`` for direct-solver problems (at the chosen ``lambda`` only for CG), and the
    chosen ``lambda``, the largest eigenvalue and the trace of the GGN and the method."""
    p = problem.num_params
    train_args, test_args = problem.solver_args(problem.train), problem.solver_args(problem.test)
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if p <= DIRECT_MAX_PARAMS:
        solver: Any = di.DirectInfluence(problem.model, problem.objective, regularization=1.0, curvature="ggn")
        solver.fit(problem.train)
        eigenvalues = torch.linalg.eigvalsh(solver.hessian.double())  # once, for the chosen lambda
        lam = LAMBDA_RELATIVE * float(eigenvalues.max())
        positive = eigenvalues.clamp(min=0)
        info.update(
            method="DirectInfluence (float64)",
            effective_dim=float((positive / (positive + lam)).sum()),
            top_eigenvalue=float(eigenvalues.max()),
            trace_ggn=float(eigenvalues.sum()),
            regularization=lam,
            fit_s=time.perf_counter() - start,
        )

        def influences_at(value: float) -> np.ndarray:
            solver.regularization = value
            return solver.influences(*test_args, *train_args).numpy()

        return influences_at, info
    # CG: the top eigenvalue by subspace iteration through the solver's curvature operator, then a tight solve
    probe = di.CgInfluence(problem.model, problem.objective, regularization=1.0, curvature="ggn")
    probe.fit(problem.train)
    top = top_eigenvalue(probe._operator)
    lam = LAMBDA_RELATIVE * top
    solver = di.CgInfluence(
        problem.model,
        problem.objective,
        regularization=lam,
        curvature="ggn",
        rtol=1e-8,
        maxiter=2000,
        preconditioner="nystroem",
        preconditioner_rank=CG_PRECONDITIONER_RANK,
    )
    solver.fit(problem.train)
    info["fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", di.ConvergenceWarning)  # a reference that did not converge is no reference
        exact = solver.influences(*test_args, *train_args).numpy()
    info.update(
        method=f"CgInfluence (float64, rtol 1e-8, Nystroem rank-{CG_PRECONDITIONER_RANK} preconditioner)",
        top_eigenvalue=top,
        regularization=lam,
        effective_dim_top=effective_dim_top(solver, lam),
        solve_s=time.perf_counter() - start,
        cg_iterations=int(solver.info_.iterations),
        cg_max_relative_residual=float(solver.info_.relative_residuals.max()),
    )

    def cg_at(value: float) -> np.ndarray:
        if value != lam:
            raise ValueError("the CG reference is computed at the chosen lambda only")
        return exact

    return cg_at, info


def effective_dim_top(solver: Any, lam: float) -> float | None:
    """``sum s / (s + lambda)`` over the eigenvalues ``s`` of the CG solver's Nystroem
    preconditioner (the top ``CG_PRECONDITIONER_RANK`` of the GGN): a lower estimate of the
    effective dimension ``d_lambda = trace(G (G + lambda I)^-1)``."""
    factor = getattr(solver.preconditioner_, "factor", None)
    if factor is None:
        return None
    s = factor.eigenvalues.clamp(min=0)
    return float((s / (s + lam)).sum())


def top_eigenvalue(operator: Any, block: int = 4, iterations: int = 30) -> float:
    """The largest eigenvalue of a PSD operator: subspace iteration on ``block`` vectors, then Rayleigh-Ritz."""
    gen = torch.Generator().manual_seed(SEED)
    q = torch.linalg.qr(torch.randn(operator.size, block, generator=gen).to(operator.dtype))[0]
    for _ in range(iterations):
        q = torch.linalg.qr(operator.matmat(q))[0]
    return float(torch.linalg.eigvalsh(q.T @ operator.matmat(q)).max())


# -- metrics ------------------------------------------------------------------------------------
def compare(approx: np.ndarray, exact: np.ndarray, top: int = TOP) -> dict[str, float]:
    """Pearson and Spearman pooled and per test row (mean), and the mean top-``top`` overlap of
    the most helpful (largest) influences."""
    from scipy.stats import rankdata, spearmanr  # type: ignore[import-untyped]

    def row_pearson(a: np.ndarray, b: np.ndarray) -> float:
        a = a - a.mean(1, keepdims=True)
        b = b - b.mean(1, keepdims=True)
        denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
        return float(np.mean((a * b).sum(1) / np.where(denom > 0, denom, np.inf)))

    top = min(top, exact.shape[1])
    best_a = np.argsort(-approx, axis=1, kind="stable")[:, :top]
    best_e = np.argsort(-exact, axis=1, kind="stable")[:, :top]
    overlap = np.mean([len(set(a) & set(e)) / top for a, e in zip(best_a, best_e)])
    return {
        "pearson": float(np.corrcoef(approx.ravel(), exact.ravel())[0, 1]),
        "spearman": float(spearmanr(approx.ravel(), exact.ravel())[0]),
        "row_pearson": row_pearson(approx, exact),
        "row_spearman": row_pearson(rankdata(approx, axis=1), rankdata(exact, axis=1)),
        "top10_overlap": float(overlap),
    }


def configurations(p: int, ks: Sequence[int]) -> list[tuple[str, int]]:
    """``(projection, k)`` measured for ``p`` parameters: ``k`` capped at ``p``; at ``k = p`` the
    orthogonal projection (exact: a rotation) where it is allowed; below, sjlt, kronecker, and
    gaussian where ``p * k`` is small."""
    out = []
    for k in sorted({min(int(k), p) for k in ks}):
        if k >= p:
            if p * p <= ORTHOGONAL_MAX_ENTRIES:
                out.append(("orthogonal", p))
            continue
        out += [("sjlt", k), ("kronecker", k)]
        if p * k <= GAUSSIAN_MAX_ENTRIES:
            out.append(("gaussian", k))
    return out


# -- part 1: accuracy ---------------------------------------------------------------------------
def accuracy_problem(
    plan: AccuracyPlan, workdir: str | os.PathLike, *, client: Any = "sync", log: Callable[[str], None] = print
) -> dict:
    """Every configuration of one problem against its exact influences (see the module docstring)."""
    start = time.perf_counter()
    problem = make_accuracy_problem(plan)
    p = problem.num_params
    log(
        f"[accuracy] {plan.problem}: {p:,} parameters, n_train={plan.n_train}, n_test={plan.n_test}, "
        f"accuracy train {problem.train_accuracy:.2f} / test {problem.test_accuracy:.2f}"
    )
    exact_at, info = exact_reference(problem)
    lam = float(info["regularization"])
    exact = exact_at(lam)
    sweep = {f"{m:g}": exact_at(lam * m) for m in LAMBDA_SWEEP} if "trace_ggn" in info else {}
    log(f"  exact: {info['method']}, top eigenvalue of the GGN {info['top_eigenvalue']:.4g}, lambda {lam:.3g}")
    configs = configurations(p, plan.ks)
    largest_sjlt = max((k for proj, k in configs if proj == "sjlt"), default=None)
    rows = []
    checked_top_k: bool | None = None
    for projection, k in configs:
        variants = [("curvature", "float32"), ("fisher", "float32")]
        if projection == "sjlt" and k == largest_sjlt:
            variants.append(("curvature", "float16"))
        for preconditioner, dtype in variants:
            path = Path(workdir) / f"{plan.problem}-{projection}-{k}-{preconditioner}-{dtype}"
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # kronecker: parameters left out (recorded below)
                index = di.GradientIndex.build(
                    problem.model,
                    problem.objective,
                    problem.train,
                    path,
                    projection_dim=k,
                    projection=projection,
                    seed=SEED,
                    dtype=dtype,
                    preconditioner=preconditioner,
                    curvature="ggn",
                    ggn_draws=0,  # every output root: at k = p the index is then exactly Direct's GGN
                    regularization=lam,
                    train_block_size=plan.block_size,
                    overwrite=True,
                    client=client,
                )
            build_s = time.perf_counter() - t0
            approx = index.influences(problem.test, regularization=lam)
            row: dict[str, Any] = {
                "projection": projection,
                "k_requested": k,
                "k": index.dim,
                "preconditioner": preconditioner,
                "dtype": dtype,
                "build_s": build_s,
                "trace_c": float(np.trace(index.curvature_matrix())),
                **compare(approx, exact),
            }
            if projection == "kronecker":
                covered = sum(o * i for _, o, i in index.projector.projection.layers)  # type: ignore[attr-defined]
                row["kronecker_coverage"] = covered / p
            if sweep:
                row["pearson_by_lambda"] = {
                    m: compare(index.influences(problem.test, regularization=lam * float(m)), ex)["pearson"]
                    for m, ex in sweep.items()
                }
            if checked_top_k is None and projection == "sjlt" and preconditioner == "curvature":
                found = index.top_k(problem.test, TOP, regularization=lam)
                expected = np.argsort(-approx, axis=1, kind="stable")[:, :TOP]
                checked_top_k = bool(np.array_equal(np.sort(found.helpful_indices, 1), np.sort(expected, 1)))
            rows.append(row)
            log(
                f"  {projection:>10} k={index.dim:<5} {preconditioner:>9} {dtype}: Pearson {row['pearson']:.4f} "
                f"Spearman {row['spearman']:.4f} top-10 {row['top10_overlap']:.2f} (build {build_s:.1f} s)"
            )
            shutil.rmtree(path, ignore_errors=True)
    return {
        "plan": asdict(plan),
        "problem": plan.problem,
        "num_params": p,
        "train_accuracy": problem.train_accuracy,
        "test_accuracy": problem.test_accuracy,
        "exact": info,
        "regularization": lam,
        "top_k_matches_influences": checked_top_k,
        "rows": rows,
        "total_s": time.perf_counter() - start,
    }


def accuracy_table(result: dict) -> str:
    """One markdown table per problem: per (projection, k, dtype) both preconditioners side by side."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_key.setdefault((row["projection"], row["k"], row["dtype"]), {})[row["preconditioner"]] = row

    def cells(row: dict | None) -> str:
        if row is None:
            return "- | - | - | "
        return (
            f"{row['pearson']:.3f} / {row['spearman']:.3f} | {row['row_pearson']:.3f} / {row['row_spearman']:.3f} | "
            f"{row['top10_overlap']:.2f} | "
        )

    info = result["exact"]
    lines = [
        f"**{result['problem']}**: {result['num_params']:,} parameters, {result['plan']['n_train']} train x "
        f"{result['plan']['n_test']} test points, accuracy {result['train_accuracy']:.2f} train / "
        f"{result['test_accuracy']:.2f} test; exact: {info['method']}; lambda = {result['regularization']:.3g} "
        f"(1e-3 x the largest eigenvalue of the GGN)"
        + (f", effective dimension d_lambda = {info['effective_dim']:.0f}" if "effective_dim" in info else "")
        + (
            f", d_lambda >= {info['effective_dim_top']:.0f} (top {CG_PRECONDITIONER_RANK} eigenvalues)"
            if info.get("effective_dim_top") is not None
            else ""
        ),
        "",
        "| projection | k | index dtype | GGN: pooled P / S | GGN: per-row P / S | GGN: top-10 | "
        "Fisher: pooled P / S | Fisher: per-row P / S | Fisher: top-10 | build s (GGN / Fisher) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (projection, k, dtype), pair in by_key.items():
        curv, fisher = pair.get("curvature"), pair.get("fisher")
        builds = " / ".join(f"{r['build_s']:.1f}" if r else "-" for r in (curv, fisher))
        lines.append(f"| {projection} | {k} | {dtype} | " + cells(curv) + cells(fisher) + f"{builds} |")
    return "\n".join(lines)


def lambda_table(results: list[dict]) -> str:
    """Pooled Pearson at ``lambda`` x 0.1, 1 and 10 (direct-solver problems only)."""
    lines = [
        "| problem | projection | k | preconditioner | lambda x 0.1 | lambda x 1 | lambda x 10 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for row in result["rows"]:
            if "pearson_by_lambda" not in row or row["dtype"] != "float32":
                continue
            by = row["pearson_by_lambda"]
            lines.append(
                f"| {result['problem']} | {row['projection']} | {row['k']} | {row['preconditioner']} | "
                f"{by['0.1']:.3f} | {row['pearson']:.3f} | {by['10']:.3f} |"
            )
    return "\n".join(lines)


# -- part 2: throughput -------------------------------------------------------------------------
def per_sample_grad_seconds(model: nn.Module, x: np.ndarray, y: np.ndarray, chunk: int) -> float:
    """Seconds for the flat per-sample loss gradients of every point (vmap of grad), ``chunk`` at a time."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = loss_fn()

    def sample_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    start = time.perf_counter()
    for s in range(0, len(xs), chunk):
        g = per_sample(params, xs[s : s + chunk], ys[s : s + chunk])
        torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], dim=1)
    return time.perf_counter() - start


def disk_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextmanager
def local_cluster(n_workers: int) -> Iterator[Any]:
    """A LocalCluster of ``n_workers`` single-threaded worker processes on 127.0.0.1, closed afterwards (started as
    the embedded cluster starts them: glibc's dynamic malloc thresholds)."""
    from distributed import Client, LocalCluster

    from dask_influence.mapping.clients import glibc_dynamic_malloc

    with (
        glibc_dynamic_malloc(),
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm_worker)
        yield client


def _warm_worker() -> None:
    import dask_influence.index  # noqa: F401  (torch and the index code imported before measuring)

    torch.set_num_threads(1)
    install_projector_pickling()


# -- a workaround, reported to the owner of dask_influence.index --------------------------------
# A Dask worker sends its Projector to a peer from its event-loop thread while its task thread
# may be inside a forward, where functional_call has swapped the model's parameters for
# functorch wrappers: pickling then fails ("Could not serialize object of type Projector",
# NotImplementedError: Cannot access storage of TensorWrapper) and the transfer, hence the build
# or query on 2+ workers, hangs. The solvers pickle under the forward lock
# (InfluenceModel.__reduce__); until Projector does, the benchmark registers the same for it,
# in this process and on every worker. It is a no-op once Projector defines its own pickling.
def install_projector_pickling() -> bool:
    """Pickle ``Projector`` under the forward lock (see above); ``True`` if the workaround is active."""
    import copyreg

    from dask_influence.index.projector import Projector

    if any(name in Projector.__dict__ for name in ("__reduce__", "__reduce_ex__", "__getstate__")):
        return False
    copyreg.pickle(Projector, _reduce_projector)
    return True


def _reduce_projector(obj: Any) -> tuple:
    import cloudpickle

    from dask_influence.core.gradients import _FORWARD_LOCK

    with _FORWARD_LOCK:
        payload = cloudpickle.dumps(obj.__dict__)
    return (_restore_projector, (payload,))


def _restore_projector(payload: bytes) -> Any:
    import cloudpickle

    from dask_influence.index.projector import Projector

    obj = Projector.__new__(Projector)
    obj.__dict__.update(cloudpickle.loads(payload))
    return obj


def throughput(tiny: bool, workdir: Path, log: Callable[[str], None] = print) -> dict:
    """Build seconds per 1,000 points against per-sample gradients, index size, query time."""
    from dask_influence.index.projector import CHUNK_SIZE

    from .problems import synthetic

    name, n, n_query, k = ("mlp-1e4", 1_000, 200, 256) if tiny else ("mlp-1e5", 2_000, 1_000, 1024)
    torch.manual_seed(SEED)
    model = build_model(name).eval()  # throughput does not depend on training
    p = sum(t.numel() for t in model.parameters())
    x, y = synthetic(n, SEED)
    x_test, y_test = synthetic(n_query, SEED + 1)
    block = 250 if tiny else 500
    out: dict[str, Any] = {"model": name, "num_params": p, "n_train": n, "k": k, "block_size": block}
    log(f"[throughput] {name}: {p:,} parameters, {n} training points, k={k}, one process, one torch thread")
    per_1000 = 1000 / n
    chunks = [c for c in (CHUNK_SIZE, 256, 1024) if c == CHUNK_SIZE or c * p <= 1 << 25]  # <= 128 MiB per chunk
    by_chunk = {c: per_sample_grad_seconds(model, x, y, c) for c in chunks}
    bound = min(by_chunk.values())
    out["per_sample_grads_s_per_1000"] = bound * per_1000
    out["per_sample_grads_s_per_1000_by_chunk"] = {str(c): t * per_1000 for c, t in by_chunk.items()}
    out["projector_chunk"] = CHUNK_SIZE
    log(
        "  per-sample gradients (vmap(grad)) per 1,000 points: "
        + ", ".join(f"{t * per_1000:.2f} s in chunks of {c}" for c, t in by_chunk.items())
    )
    builds = {
        "sjlt_fisher_float32": ("sjlt", "fisher", "float32"),
        "sjlt_fisher_float16": ("sjlt", "fisher", "float16"),
        "sjlt_curvature_float32": ("sjlt", "curvature", "float32"),
        "kronecker_fisher_float32": ("kronecker", "fisher", "float32"),
    }
    keep = workdir / "throughput-sjlt_curvature_float32"
    warm = workdir / "throughput-warm"  # one-time costs (imports, first vmap) before timing
    di.GradientIndex.build(model, loss_fn(), (x[: 2 * block], y[: 2 * block]), warm, projection_dim=k, client="sync")
    shutil.rmtree(warm, ignore_errors=True)
    for label, (projection, preconditioner, dtype) in builds.items():
        path = workdir / f"throughput-{label}"
        start = time.perf_counter()
        index = di.GradientIndex.build(
            model,
            loss_fn(),
            (x, y),
            path,
            projection_dim=k,
            projection=projection,
            dtype=dtype,
            preconditioner=preconditioner,
            train_block_size=block,
            overwrite=True,
            client="sync",
        )
        seconds = time.perf_counter() - start
        stored = disk_bytes(path / "gradients")
        out[label] = {
            "s_per_1000": seconds * per_1000,
            "vs_per_sample_grads": seconds / bound,
            "k": index.dim,
            "bytes_per_point_raw": index.dim * np.dtype(dtype).itemsize,
            "bytes_per_point_disk": stored / n,
        }
        log(
            f"  build {label}: {seconds * per_1000:.2f} s / 1,000 ({seconds / bound:.2f}x the bound), "
            f"{stored / n:.0f} B per point on disk (k={index.dim})"
        )
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    # queries on a 2-worker cluster, started and warmed up (the first query on a fresh cluster
    # ships the projector to both workers and pays their first vmap: timed apart) before timing
    with local_cluster(2) as client:
        index = di.GradientIndex.open(keep, model, loss_fn(), client=client)
        start = time.perf_counter()
        index.top_k((x_test[:40], y_test[:40]), TOP, test_block_size=10)
        cold_s = time.perf_counter() - start
        index.top_k((x_test[:40], y_test[:40]), TOP, test_block_size=10)
        start = time.perf_counter()
        index.top_k((x_test, y_test), TOP, test_block_size=max(1, n_query // 4))
        top_s = time.perf_counter() - start
        start = time.perf_counter()
        index.influences_to_zarr((x_test, y_test), workdir / "query.zarr", test_block_size=max(1, n_query // 4))
        zarr_s = time.perf_counter() - start
    shutil.rmtree(workdir / "query.zarr", ignore_errors=True)
    shutil.rmtree(keep, ignore_errors=True)
    out["query"] = {
        "n_test": n_query,
        "workers": 2,
        "first_query_s": cold_s,
        "first_query_n_test": 40,
        "top_k_s_per_1000_test": top_s * 1000 / n_query,
        "influences_to_zarr_s_per_1000_test": zarr_s * 1000 / n_query,
    }
    log(
        f"  query on 2 workers, per 1,000 test points x {n} train: top_k {top_s * 1000 / n_query:.2f} s, "
        f"influences_to_zarr {zarr_s * 1000 / n_query:.2f} s"
    )
    return out


def throughput_table(r: dict) -> str:
    lines = [
        f"{r['model']} ({r['num_params']:,} parameters, float32), {r['n_train']:,} training points in blocks of "
        f'{r["block_size"]}, k = {r["k"]}, one process (`client="sync"`), one torch thread:',
        "",
        "| what | s per 1,000 training points | vs per-sample gradients | bytes per point (raw / on disk) |",
        "| --- | --- | --- | --- |",
        f"| per-sample gradients alone (vmap(grad), the fastest chunk: the bound) | "
        f"{r['per_sample_grads_s_per_1000']:.2f} | 1.00x | - |",
    ]
    for chunk, seconds in r["per_sample_grads_s_per_1000_by_chunk"].items():
        note = " (the projector's chunk)" if int(chunk) == r["projector_chunk"] else ""
        lines.append(
            f"| per-sample gradients, chunks of {chunk}{note} | {seconds:.2f} | "
            f"{seconds / r['per_sample_grads_s_per_1000']:.2f}x | - |"
        )
    for label in ("sjlt_fisher_float32", "sjlt_fisher_float16", "sjlt_curvature_float32", "kronecker_fisher_float32"):
        b = r[label]
        what = label.replace("_", ", ")
        lines.append(
            f"| build: {what} (k = {b['k']}) | {b['s_per_1000']:.2f} | {b['vs_per_sample_grads']:.2f}x | "
            f"{b['bytes_per_point_raw']} / {b['bytes_per_point_disk']:.0f} |"
        )
    q = r["query"]
    lines += [
        "",
        f"Query, {q['workers']}-worker LocalCluster (started and warmed up), per 1,000 test points against "
        f"the {r['n_train']:,}-point index: `top_k(test, 10)` {q['top_k_s_per_1000_test']:.2f} s, "
        f"`influences_to_zarr` {q['influences_to_zarr_s_per_1000_test']:.2f} s (measured on {q['n_test']} test points; "
        f"the first query on the fresh cluster, {q['first_query_n_test']} points, took {q['first_query_s']:.1f} s).",
    ]
    return "\n".join(lines)


# -- part 3: scale ------------------------------------------------------------------------------
def small_mlp() -> nn.Module:
    """64-32-10 tanh: 2,410 parameters, trained briefly on generated data (float32)."""
    from .problems import synthetic

    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.Tanh(), nn.Linear(32, N_CLASSES))
    x, y = synthetic(5_000, SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ce = loss_fn()
    _fit_adamw(model, lambda idx: ce(model(xt[idx]), yt[idx]), len(xt), 3, batch=128)
    return model.eval()


def generated(n: int, block: int, seed: int) -> tuple[Any, Any]:
    """``(x, y)`` dask arrays: standard normal features, labels of the fixed teacher network of
    :func:`benchmarks.problems.synthetic`; each block is generated where it is used."""
    import dask.array as da

    teacher = np.random.default_rng(12345)
    w1 = teacher.standard_normal((N_FEATURES, 32)) / np.sqrt(N_FEATURES)
    w2 = teacher.standard_normal((32, N_CLASSES))
    x = da.random.RandomState(seed).standard_normal((n, N_FEATURES), chunks=(block, N_FEATURES)).astype(np.float32)
    y = da.argmax(da.tanh(x @ w1.astype(np.float32)) @ w2.astype(np.float32), axis=1).astype(np.int64)
    return x, y


class MemorySampler:
    """Peak resident memory of the workers' processes and of this one, sampled every ``interval`` s."""

    def __init__(self, client: Any, interval: float = 0.05):
        import psutil  # type: ignore[import-untyped]

        pids = client.run(os.getpid)
        self.processes = {addr: psutil.Process(pid) for addr, pid in pids.items()}
        self.driver = psutil.Process()
        self.interval = interval
        self.start = {addr: proc.memory_info().rss for addr, proc in self.processes.items()}
        self.peak = dict(self.start)
        self.driver_start = self.driver.memory_info().rss
        self.driver_peak = self.driver_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for addr, proc in self.processes.items():
                try:
                    self.peak[addr] = max(self.peak[addr], proc.memory_info().rss)
                except Exception:
                    pass
            self.driver_peak = max(self.driver_peak, self.driver.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        mib = 2**20
        return {
            "worker_peak_rss_mib": [self.peak[a] / mib for a in sorted(self.peak)],
            "worker_start_rss_mib": [self.start[a] / mib for a in sorted(self.start)],
            "driver_peak_rss_mib": self.driver_peak / mib,
            "driver_start_rss_mib": self.driver_start / mib,
        }


def scale(tiny: bool, workdir: Path, log: Callable[[str], None] = print) -> dict:
    """Index ``n_train`` generated points on 1 and 2 workers: time, peak memory, a top-k query."""
    sizes = (20_000, 100_000) if tiny else (100_000, 1_000_000)
    block, k, n_query = (5_000, 64, 200) if tiny else (10_000, 128, 1_000)
    model = small_mlp()
    p = sum(t.numel() for t in model.parameters())
    out: dict[str, Any] = {
        "model": "mlp 64-32-10 tanh",
        "num_params": p,
        "k": k,
        "projection": "sjlt",
        "dtype": "float16",
        "preconditioner": "fisher",
        "block_size": block,
        "runs": [],
    }
    x_test, y_test = generated(n_query, n_query, SEED + 1)
    log(f"[scale] {p:,} parameters, k={k} sjlt float16, preconditioner fisher, blocks of {block:,}")
    for n_workers in (1, 2):
        with local_cluster(n_workers) as client:
            warm = workdir / "scale-warm"
            di.GradientIndex.build(
                model,
                loss_fn(),
                generated(2 * block, block, SEED),
                warm,
                projection_dim=k,
                dtype="float16",
                preconditioner="fisher",
                overwrite=True,
                client=client,
            )
            shutil.rmtree(warm, ignore_errors=True)
            for n in sizes:
                path = workdir / f"scale-{n}"
                with MemorySampler(client) as memory:
                    start = time.perf_counter()
                    index = di.GradientIndex.build(
                        model,
                        loss_fn(),
                        generated(n, block, SEED),
                        path,
                        projection_dim=k,
                        dtype="float16",
                        preconditioner="fisher",
                        overwrite=True,
                        client=client,
                    )
                    seconds = time.perf_counter() - start
                run: dict[str, Any] = {
                    "n_train": n,
                    "workers": n_workers,
                    "build_s": seconds,
                    "s_per_1000": seconds * 1000 / n,
                    "index_disk_mib": disk_bytes(path) / 2**20,
                    **memory.report(),
                }
                if n_workers == 2 and n == sizes[0]:
                    index.top_k((x_test[:40], y_test[:40]), TOP)  # warm-up: ships this query's projector
                    with MemorySampler(client) as qmem:
                        start = time.perf_counter()
                        index.top_k((x_test, y_test), TOP)
                        run["top_k_s"] = time.perf_counter() - start
                    run["top_k_n_test"] = n_query
                    run["top_k_worker_peak_rss_mib"] = qmem.report()["worker_peak_rss_mib"]
                shutil.rmtree(path, ignore_errors=True)
                out["runs"].append(run)
                log(
                    f"  n={n:>9,} on {n_workers} worker(s): {seconds:.1f} s, peak RSS per worker "
                    + ", ".join(f"{m:.0f}" for m in run["worker_peak_rss_mib"])
                    + f" MiB, driver {run['driver_peak_rss_mib']:.0f} MiB"
                    + (f"; top_k of {n_query} test points {run['top_k_s']:.1f} s" if "top_k_s" in run else "")
                )
    times = {(r["n_train"], r["workers"]): r["build_s"] for r in out["runs"]}
    out["speedup_2_vs_1"] = {str(n): times[(n, 1)] / times[(n, 2)] for n in sizes}
    return out


def scale_table(r: dict) -> str:
    lines = [
        f"{r['model']} ({r['num_params']:,} parameters, float32), k = {r['k']} {r['projection']}, "
        f"{r['dtype']} index, preconditioner {r['preconditioner']}, blocks of {r['block_size']:,}; "
        "data generated per block by `da.random` on the workers:",
        "",
        "| n_train | workers | build (s) | s per 1,000 | index on disk (MiB) | peak RSS per worker (MiB) "
        "| worker RSS before (MiB) | driver peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['n_train']:,} | {run['workers']} | {run['build_s']:.1f} | {run['s_per_1000']:.3f} | "
            f"{run['index_disk_mib']:.1f} | {', '.join(f'{m:.0f}' for m in run['worker_peak_rss_mib'])} | "
            f"{', '.join(f'{m:.0f}' for m in run['worker_start_rss_mib'])} | {run['driver_peak_rss_mib']:.0f} |"
        )
    lines.append("")
    lines.append(
        "2 workers vs 1: " + ", ".join(f"{float(n):,.0f} points {s:.2f}x" for n, s in r["speedup_2_vs_1"].items()) + "."
    )
    for run in r["runs"]:
        if "top_k_s" in run:
            lines.append(
                f"`top_k(test, 10)` of {run['top_k_n_test']:,} test points against the {run['n_train']:,}-point "
                f"index on 2 workers: {run['top_k_s']:.1f} s (peak worker RSS "
                + ", ".join(f"{m:.0f}" for m in run["top_k_worker_peak_rss_mib"])
                + " MiB)."
            )
    return "\n".join(lines)


# -- driver -------------------------------------------------------------------------------------
def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "cpus": os.cpu_count(),
        "load_average_1_5_15": list(load),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


PARTS = ("accuracy", "throughput", "scale")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (a smoke run of every part)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory of index.json")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--problems", default=None, help="comma-separated accuracy problems (default: all)")
    args = parser.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    torch.set_num_threads(1)  # as one single-threaded Dask worker; the machine is shared
    plans = ACCURACY_TINY if args.tiny else ACCURACY_FULL
    if args.problems:
        chosen = {s.strip() for s in args.problems.split(",")}
        plans = tuple(p for p in plans if p.problem in chosen)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("index-tiny.json" if args.tiny else "index.json")
    report: dict = json.loads(target.read_text()) if target.is_file() else {}
    report.setdefault("machine", {})
    report["machine"] = {**machine(), "parts_run": parts}
    if {"throughput", "scale"} & set(parts):
        report["machine"]["projector_pickling_workaround"] = install_projector_pickling()
    tables: list[str] = []
    with tempfile.TemporaryDirectory(prefix="index-bench-") as tmp:
        workdir = Path(tmp)
        if "accuracy" in parts:
            results = [accuracy_problem(plan, workdir) for plan in plans]
            previous = {r["problem"]: r for r in report.get("accuracy", [])}
            previous.update({r["problem"]: r for r in results})
            report["accuracy"] = list(previous.values())
            tables += [accuracy_table(r) for r in results]
            if any(r["rows"] and "pearson_by_lambda" in r["rows"][0] for r in results):
                tables.append(lambda_table(results))
        if "throughput" in parts:
            report["throughput"] = throughput(args.tiny, workdir)
            tables.append(throughput_table(report["throughput"]))
        if "scale" in parts:
            report["scale"] = scale(args.tiny, workdir)
            tables.append(scale_table(report["scale"]))
    report["machine"]["load_average_after"] = list(os.getloadavg())
    target.write_text(json.dumps(report, indent=2, default=str))
    print("\n\n".join(tables))
    print(f"\nwrote {target}")
    return report


if __name__ == "__main__":
    main()
