"""Scale: every documented path on GPT-2 language models with the real vocabulary (issue 29 item 6).

    python -m benchmarks.scale_lm --config 2x128 [--n-train 32 --n-test 4] [--workers 1 2]
    python -m benchmarks.scale_lm --config gpt2-small --n-train 256 --n-test 16   # a quiet machine or GPU host
    python -m benchmarks.scale_lm --tiny          # a seconds-long smoke run (the tests use it)

Models: ``GPT2LMHeadModel`` built from a config (nothing downloaded; :data:`CONFIGS`: ``tiny``, ``2x128``,
``4x256``, ``2x768``, ``6x512`` and ``gpt2-small``, 12 layers x 768, ``V = 50,257``, ``T = 128``), float32, eager
attention, random weights trained ``--train-steps`` Adam steps on the generated tokens (Zipf-distributed
ids, so that the model's predictive distribution is not uniform), the causal-LM task
(``di.tasks.causal_lm()``). GPT-2's tied ``wte``/``lm_head`` is factored through the head by EK-FAC
(``tied="head"``). Each path runs on an embedded ``LocalCluster`` of 1 and of 2 single-threaded worker
processes (one cluster alive at a time; its workers import ``dask_influence`` and GPT-2's code when it starts,
a worker's start rather than a path's cost):

- ``EK-FAC fit`` (``DaskInfluenceCalculator.fit``: the covariance pass and the corrected-eigenvalue pass,
  sampled Fisher with 1 draw), ``EK-FAC factors`` (one test block's ``influence_factors``, on the client)
  and ``EK-FAC scoring`` (``calc.influences_to_zarr(test, train, store)`` on the cluster, ``--scoring``: by
  default one pass over the training data against the factors saved in the store, where they need several
  test groups); ``--ekfac-parts factors`` leaves the scoring out (the fit always runs). The solver chooses its
  own chunks within ``--memory-per-worker``;
- ``index build`` (``GradientIndex.build``, ``--projection`` of dimension ``--projection-dim``,
  ``preconditioner="fisher"``) and ``index query`` (``top_k`` with k = 10 of the test sequences);
- ``CG`` (``--cg-iterations`` GGN-CG sweeps for ``--n-solve`` test sequences, on the cluster) and ``Arnoldi``
  (the fit: Lanczos of rank ``--rank`` on the GGN, on the cluster).

Beside each time, its **floor**: the forward+backward passes the path cannot avoid, measured in the same run
on the same data (one forward and backward of the mean loss over the training sequences, ``FB_train``, and over
the test sequences, ``FB_test``, single-threaded like each worker, in chunks of the block size): a pass over
the training data costs at least ``FB_train / workers`` (ideal split), so EK-FAC's fit floor is
``2 FB_train / w``, the index build's ``FB_train / w``, CG's ``iterations x FB_train / w + FB_test``, Arnoldi's
``(Lanczos vectors) x FB_train / w`` (each Krylov vector is a GGN product over the data), scoring's
``FB_train / w + FB_test`` in one pass, ``B x FB_train / w + FB_test`` in ``B`` test groups (``--scoring
groups``: a group's factors ``(n, p)`` are held within a quarter of ``--memory-per-worker``, two test sequences
of GPT-2-small at 8 GB, so its 16 test sequences are 8 passes over the training data), a query's
``FB_test``. Tokens per second count the training tokens a path reads (test tokens for the factors and the
query). Peak memory per worker is the largest resident set size (RSS,
psutil, polled every 50 ms) of each worker process during the path (torch's allocations included; the
client's own for the client-side steps). Before each path its memory per worker is ESTIMATED: an idle
worker's resident set (measured when the cluster starts) plus, for EK-FAC, the solver's own
:class:`FitMemory` and a chunk of its ``chunk_pieces`` (the fit's or scoring's), for the others the model's
and the data's shapes (weights, gradients, the solver's vectors, a chunk's logits ``T x V`` and activations);
a path whose estimate exceeds ``--memory-per-worker`` is refused with a one-line reason (recorded in the table).

Writes ``benchmarks/results/scale_lm_<config>.json`` and ``.md`` (git-ignored). The machine this runs on may be
shared and loaded: read ratios (time / floor), not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dask_influence as di
from dask_influence.mapping.clients import trim_memory

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64, "seq_len": 16, "n_train": 8, "n_test": 2},
    "2x128": {
        "n_layer": 2,
        "n_embd": 128,
        "n_head": 4,
        "vocab_size": 50257,
        "seq_len": 128,
        "n_train": 32,
        "n_test": 4,
    },
    "4x256": {
        "n_layer": 4,
        "n_embd": 256,
        "n_head": 4,
        "vocab_size": 50257,
        "seq_len": 128,
        "n_train": 64,
        "n_test": 8,
    },
    "2x768": {  # GPT-2-small's width and vocabulary at 2 layers (53M parameters): its memory in minutes
        "n_layer": 2,
        "n_embd": 768,
        "n_head": 12,
        "vocab_size": 50257,
        "seq_len": 128,
        "n_train": 16,
        "n_test": 2,
    },
    "6x512": {
        "n_layer": 6,
        "n_embd": 512,
        "n_head": 8,
        "vocab_size": 50257,
        "seq_len": 128,
        "n_train": 128,
        "n_test": 16,
    },
    "gpt2-small": {
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "vocab_size": 50257,
        "seq_len": 128,
        "n_train": 256,
        "n_test": 16,
    },
}
PATHS = ("ekfac", "index", "cg", "arnoldi")
TRAIN_ROWS = 16
"""Training sequences the model's few Adam steps see (so that its weights are not the initialization)."""
COLUMNS = (
    "config",
    "path",
    "workers",
    "status",
    "time_s",
    "floor_s",
    "time_over_floor",
    "tokens_per_s",
    "peak_rss_per_worker_mb",
    "estimate_per_worker_mb",
)
MB = 1e6


def make_model(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """``GPT2LMHeadModel`` (float32, eval, eager attention, no dropout) from ``config``'s shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=config["n_layer"],
        n_embd=config["n_embd"],
        n_head=config["n_head"],
        vocab_size=config["vocab_size"],
        n_positions=config["seq_len"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).eval()


def make_tokens(n: int, seq_len: int, vocab: int, seed: int) -> np.ndarray:
    """``(n, seq_len)`` int64 ids drawn from a Zipf-like distribution over ``vocab`` (rank ``r`` has weight ``1/r``)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, n * seq_len, replacement=True, generator=g).reshape(n, seq_len).numpy()


def train_a_few_steps(model: torch.nn.Module, ids: np.ndarray, steps: int, lr: float = 1e-3) -> list[float]:
    """``steps`` Adam steps of the causal-LM loss on ``ids`` (so the weights are not the initialization); the losses."""
    task = di.tasks.causal_lm()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = {"input_ids": torch.as_tensor(ids)}
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.zero_grad(set_to_none=True)
    return losses


def forward_backward_seconds(model: torch.nn.Module, ids: np.ndarray, chunk: int) -> float:
    """One forward and backward of the mean causal-LM loss over ``ids`` in chunks of ``chunk``, one thread."""
    task = di.tasks.causal_lm()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for s in range(0, len(ids), chunk):
            model.zero_grad(set_to_none=True)
            task.loss(model, {"input_ids": torch.as_tensor(ids[s : s + chunk])}).backward()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)
    return seconds


# -- memory: estimated before each path, measured (RSS) during it ------------------------------------------------
def ekfac_estimate(config, p, chunk, args, solver, batch, scoring: bool, baseline: int) -> int:
    """EK-FAC's peak bytes per worker for its fit (``scoring=False``) or its scoring, at ``chunk`` halved until the
    estimate fits ``--memory-per-worker`` (as the solver halves its own within its ``memory_budget``), at least 1."""
    while True:
        estimate = baseline + estimate_bytes("ekfac", config, p, chunk, args, solver, batch, scoring)
        if chunk == 1 or estimate <= args.memory_per_worker:
            return estimate
        chunk //= 2


def activation_bytes(config: dict[str, Any], chunk: int) -> int:
    """A chunk's forward and backward activations (float32): six ``T x V`` tensors of the logits (values,
    log-softmax, probabilities, their gradient, the back-propagated vectors, a copy) and per layer about 20
    ``T x d`` tensors and the attention's ``3 x heads x T^2``."""
    t, v, d = config["seq_len"], config["vocab_size"], config["n_embd"]
    per_sequence = 6 * t * v + config["n_layer"] * (20 * t * d + 3 * config["n_head"] * t * t)
    return 4 * chunk * per_sequence


def estimate_bytes(
    path: str,
    config: dict[str, Any],
    p: int,
    chunk: int,
    args: argparse.Namespace,
    solver=None,
    batch=None,
    scoring: bool = False,
) -> int:
    """Peak bytes per worker of ``path`` before it starts (see the module docstring); for EK-FAC its fit's
    (``scoring=False``) or its scoring's, in chunks of ``chunk`` samples."""
    weights = 4 * p
    acts = activation_bytes(config, chunk)
    if path == "ekfac":  # the solver's own estimates: its factors and one sample's blocks (logits included)
        assert solver is not None and batch is not None
        theta = solver.trained_parameters()
        # the fit's blocks, or scoring's (with the flat (p,) gradients and their solve)
        per_sample = sum(size for _, size in solver.chunk_pieces(theta, batch, scoring=scoring))
        t, d = config["seq_len"], config["n_embd"]
        layers = 4 * chunk * config["n_layer"] * (20 * t * d + 3 * config["n_head"] * t * t)  # inside the blocks
        return 3 * weights + solver.memory_.fixed + chunk * per_sample + layers
    if path == "index":  # per-sample flat gradients of a chunk and the projection
        return 3 * weights + 2 * 4 * chunk * p + acts + 4 * args.projection_dim**2
    if path == "cg":  # the iterates of block CG (x, r, p, Ap and the right-hand sides) for n_solve sequences
        return 3 * weights + 6 * 4 * args.n_solve * p + args.n_solve * acts
    if path == "arnoldi":  # the Krylov basis (its Lanczos vectors of p) and their products
        krylov = args.krylov_dimension or max(2 * args.rank, args.rank + 20)
        return 3 * weights + 2 * 4 * krylov * p + acts
    raise ValueError(path)


TRACES: dict[str, list[list[float]]] = {}
"""Per measured path, its workers' resident sets about once a second (``RssMonitor.trace``), in the JSON."""


class RssMonitor:
    """The peak resident set size of each of ``pids`` while the ``with`` block runs (polled every 50 ms)."""

    def __init__(self, pids: list[int]):
        import psutil

        self.processes = [psutil.Process(pid) for pid in pids]
        self.peaks = [0] * len(pids)
        self.trace: list[list[float]] = []
        """``[seconds, MB of each process]`` about once a second: where in a path its peak falls."""
        self._stop = threading.Event()

    def _poll(self) -> None:
        import psutil

        start = last = time.perf_counter()
        while True:
            now = self._poll_once()
            if time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                self.trace.append([round(last - start, 1)] + [round(x / MB) for x in now])
                if os.environ.get("SCALE_LM_TRACE") and len(self.trace) % 5 == 0:  # with the client's, as it runs
                    client = psutil.Process().memory_info().rss
                    print(
                        f"rss MB at {self.trace[-1][0]} s: workers {self.trace[-1][1:]}, client {round(client / MB)}",
                        flush=True,
                    )
            if self._stop.wait(0.05):
                return

    def __enter__(self) -> RssMonitor:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._poll_once()

    def _poll_once(self) -> list[int]:
        """Each process's resident set now (0 for one that ended, whose last peak is kept), the peaks raised."""
        now = [0] * len(self.processes)
        for i, proc in enumerate(self.processes):
            try:
                now[i] = proc.memory_info().rss
                self.peaks[i] = max(self.peaks[i], now[i])
            except Exception:  # a worker that ended: keep its last peak
                pass
        return now


@contextmanager
def local_cluster(workers: int):
    """A LocalCluster of ``workers`` single-threaded worker processes on 127.0.0.1, its client and the workers' pids
    (started as the embedded cluster starts them: glibc's dynamic malloc thresholds, :func:`glibc_dynamic_malloc`)."""
    from distributed import Client, LocalCluster

    from dask_influence.mapping.clients import glibc_dynamic_malloc

    with ExitStack() as stack:
        stack.enter_context(glibc_dynamic_malloc())
        cluster = stack.enter_context(
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit=0,  # the benchmark measures; Dask's own limits would pause or kill workers
            )
        )
        client = stack.enter_context(Client(cluster))
        client.run(lambda: __import__("dask_influence.mapping.fitting"))
        # the model's code, imported once per worker when the first task unpickles a GPT-2 (about 4 s of the
        # first EK-FAC fit's 16 s on one worker in the run of docs/benchmarks.md): a worker's start, not a
        # cost per token, and the floor is measured in this warm process
        client.run(lambda: __import__("transformers.models.gpt2.modeling_gpt2"))
        client.run(lambda: torch.set_num_threads(1))
        pids = sorted(client.run(os.getpid).values())
        yield client, pids


# -- the paths -----------------------------------------------------------------------------------------------------
def run_paths(model, config, train_ids, test_ids, args, workers: int, fb: dict[str, float]) -> list[dict]:
    """Every path of ``args.paths`` on a cluster of ``workers``: one row per measured step."""
    from dask_influence.mapping.fitting import solving_on_cluster
    from dask_influence.mapping.sources import as_source

    task = di.tasks.causal_lm()
    p = sum(t.numel() for t in model.parameters())
    n_train, n_test, t = len(train_ids), len(test_ids), config["seq_len"]
    train = {"input_ids": train_ids}
    test = {"input_ids": torch.as_tensor(test_ids)}
    block = args.block_size
    chunk = min(block, 8)
    rows: list[dict] = []
    floor_train = fb["train"] / workers

    def row(
        path: str,
        seconds: float | None,
        floor: float,
        tokens: int,
        peaks: list[int],
        estimate: int,
        status="ok",
        trace=None,
    ):
        if trace:
            TRACES[f"{path}, {workers} worker(s)"] = trace
        rows.append(
            {
                "config": args.config,
                "path": path,
                "workers": workers,
                "status": status,
                "time_s": None if seconds is None else round(seconds, 3),
                "floor_s": round(floor, 4),
                "time_over_floor": None if seconds is None else round(seconds / floor, 2),
                "tokens_per_s": None if seconds is None else round(tokens / seconds, 1),
                "peak_rss_per_worker_mb": [round(x / MB) for x in peaks],
                "estimate_per_worker_mb": round(estimate / MB, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    def refused(names: list[str], estimate: int, floors: list[float]) -> bool:
        if estimate <= args.memory_per_worker:
            return False
        reason = (
            f"refused: needs about {estimate / 1e9:.1f} GB per worker (estimated before the start), more than "
            f"--memory-per-worker {args.memory_per_worker / 1e9:.1f} GB"
        )
        print(f"{args.config} {names[0]} on {workers} worker(s) {reason}", flush=True)
        for name, floor in zip(names, floors):
            row(name, None, floor, 0, [], estimate, status=reason)
        return True

    with local_cluster(workers) as (client, pids):
        import psutil

        # an idle worker's resident set (Python, torch, Dask), measured before any path: part of every estimate
        baseline = max(psutil.Process(pid).memory_info().rss for pid in pids)
        if "ekfac" in args.paths:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the left-out LayerNorms, the tied head's note
                # its own chunks, halved within the budget: the fit's (small per sample) and scoring's (a test
                # sequence's flat gradients and their solve) apart, as a user's solver chooses them
                solver = di.EkfacInfluence(
                    model,
                    task,
                    regularization=args.regularization,
                    tied="head",
                    fisher="sampled",
                    memory_budget=args.memory_per_worker,
                )
            one = {"input_ids": torch.as_tensor(train_ids[:1])}
            estimate = max(ekfac_estimate(config, p, chunk, args, solver, one, s, baseline) for s in (False, True))
            names = ["EK-FAC fit", "EK-FAC factors", "EK-FAC scoring"]
            # scoring holds a test block's factors (n, p) per task within a quarter of a worker's memory: each
            # block is one more pass over the training data (2 test sequences of GPT-2-small per block at 8 GB)
            score_budget = int(args.memory_per_worker // 4)
            per_block = min(n_test, max(1, score_budget // (2 * 4 * p)))
            groups = -(-n_test // per_block)
            floors = [2 * floor_train, fb["test"] * per_block / n_test, groups * floor_train + fb["test"]]
            if not refused(names, estimate, floors):
                calc = di.DaskInfluenceCalculator(solver, client, progress=False, memory_budget=score_budget)
                with RssMonitor(pids) as mon:
                    start = time.perf_counter()
                    calc.fit(train, train_block_size=block)
                    seconds = time.perf_counter() - start
                row(names[0], seconds, floors[0], 2 * n_train * t, mon.peaks, estimate, trace=mon.trace)
                if "factors" in args.ekfac_parts:
                    with RssMonitor([os.getpid()]) as mon:  # on the client: one test block's
                        start = time.perf_counter()
                        solver.influence_factors({"input_ids": test["input_ids"][:per_block]})
                        seconds = time.perf_counter() - start
                    row(names[1], seconds, floors[1], per_block * t, mon.peaks, estimate)
                if "scoring" in args.ekfac_parts:
                    with tempfile.TemporaryDirectory() as tmp, RssMonitor(pids) as mon:
                        start = time.perf_counter()
                        store = calc.influences_to_zarr(
                            test_ids,
                            train,
                            Path(tmp) / "influences.zarr",
                            test_block_size=per_block,
                            train_block_size=block,
                            scoring=args.scoring,
                        )
                        seconds = time.perf_counter() - start
                        scores = np.asarray(store["influences"][...])
                    assert scores.shape == (n_test, n_train) and np.isfinite(scores).all()
                    if calc.last_run_["scoring"] == "one_pass":  # one pass over the training data, not one per group
                        floors[2] = floor_train + fb["test"]
                    print(
                        f"EK-FAC scoring: scoring={calc.last_run_['scoring']!r}, {calc.last_run_['plan']}", flush=True
                    )
                    row(names[2], seconds, floors[2], (n_train + n_test) * t, mon.peaks, estimate, trace=mon.trace)
        if "index" in args.paths:
            estimate = baseline + estimate_bytes("index", config, p, chunk, args)
            names = ["index build", "index query"]
            floors = [floor_train, fb["test"]]
            if not refused(names, estimate, floors):
                with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with RssMonitor(pids) as mon:
                        start = time.perf_counter()
                        index = di.GradientIndex.build(
                            model,
                            task,
                            train,
                            Path(tmp) / "index",
                            projection_dim=args.projection_dim,
                            projection=args.projection,
                            preconditioner="fisher",
                            train_block_size=block,
                            client=client,
                            progress=False,
                        )
                        seconds = time.perf_counter() - start
                    row(names[0], seconds, floors[0], n_train * t, mon.peaks, estimate)
                    with RssMonitor(pids) as mon:
                        start = time.perf_counter()
                        index.top_k({"input_ids": test_ids}, min(10, n_train))
                        seconds = time.perf_counter() - start
                    row(names[1], seconds, floors[1], n_test * t, mon.peaks, estimate)
        if "cg" in args.paths:
            estimate = baseline + estimate_bytes("cg", config, p, chunk, args)
            floor = args.cg_iterations * floor_train + fb["test"]
            if not refused(["CG"], estimate, [floor]):
                solver = di.CgInfluence(
                    model,
                    task,
                    regularization=args.regularization,
                    curvature="ggn",
                    maxiter=args.cg_iterations,
                    rtol=1e-12,
                )
                calc = di.DaskInfluenceCalculator(solver, client, progress=False)
                with RssMonitor(pids) as mon, warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a few iterations do not reach rtol
                    start = time.perf_counter()
                    calc.fit(train, train_block_size=block)
                    rhs = solver.per_sample_grads({"input_ids": torch.as_tensor(test_ids[: args.n_solve])})
                    with solving_on_cluster(solver, client, as_source(train, block_size=block)) as cg:
                        cg.apply_inverse(rhs)
                    seconds = time.perf_counter() - start
                row("CG", seconds, floor, args.cg_iterations * n_train * t, mon.peaks, estimate)
        if "arnoldi" in args.paths:
            estimate = baseline + estimate_bytes("arnoldi", config, p, chunk, args)
            if not refused(["Arnoldi"], estimate, [args.rank * floor_train]):
                solver = di.ArnoldiInfluence(
                    model,
                    task,
                    regularization=args.regularization,
                    curvature="ggn",
                    rank=args.rank,
                    krylov_dimension=args.krylov_dimension,
                )
                calc = di.DaskInfluenceCalculator(solver, client, progress=False)
                with RssMonitor(pids) as mon:
                    start = time.perf_counter()
                    calc.fit(train, train_block_size=block)
                    seconds = time.perf_counter() - start
                vectors = int(getattr(solver.state_, "krylov_dimension", 0) or 0) or args.rank
                row("Arnoldi", seconds, vectors * floor_train, vectors * n_train * t, mon.peaks, estimate)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| path | workers | time (s) | floor (s) | time / floor | tokens/s | peak RSS per worker (MB) "
        "| estimate (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['path']} | {r['workers']} | {r['status']} | {r['floor_s']:.3f} | | | "
                f"| {r['estimate_per_worker_mb']:,} |"
            )
            continue
        peaks = " / ".join(f"{x:,}" for x in r["peak_rss_per_worker_mb"])
        lines.append(
            f"| {r['path']} | {r['workers']} | {r['time_s']:.2f} | {r['floor_s']:.3f} | {r['time_over_floor']:.1f}x | "
            f"{r['tokens_per_s']:,.0f} | {peaks} | {r['estimate_per_worker_mb']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="2x128")
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration, seconds (the tests use it)")
    parser.add_argument("--n-train", type=int, default=None, help="training sequences (default: the config's)")
    parser.add_argument("--n-test", type=int, default=None, help="test sequences (default: the config's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's)")
    parser.add_argument(
        "--block-size", type=int, default=None, help="training sequences per block (default n_train / 4)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--scoring",
        choices=("auto", "groups", "one_pass"),
        default="auto",
        help="EK-FAC scoring's influences_to_zarr(scoring=...): one pass over the training data, or one per test group",
    )
    parser.add_argument(
        "--ekfac-parts", nargs="+", choices=("factors", "scoring"), default=["factors", "scoring"],
        help="after EK-FAC's fit (always run): the client's factors and the scoring",
    )  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--regularization", type=float, default=0.01)
    parser.add_argument("--projection", choices=["sjlt", "kronecker"], default="sjlt")
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--cg-iterations", type=int, default=3)
    parser.add_argument("--n-solve", type=int, default=2, help="test sequences CG solves for")
    parser.add_argument("--rank", type=int, default=4, help="Arnoldi's rank")
    parser.add_argument("--krylov-dimension", type=int, default=None, help="Arnoldi's Lanczos steps (default: its own)")
    parser.add_argument("--memory-per-worker", type=float, default=8e9, help="bytes; paths estimated above are refused")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.tiny:
        args.config = "tiny"
    config = dict(CONFIGS[args.config])
    for key in ("n_train", "n_test", "seq_len"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    args.memory_per_worker = int(args.memory_per_worker)
    args.block_size = args.block_size or max(1, config["n_train"] // 4)
    args.n_solve = min(args.n_solve, config["n_test"])
    torch.set_num_threads(1)
    model = make_model(config)
    p = sum(t.numel() for t in model.parameters())
    train_ids = make_tokens(config["n_train"], config["seq_len"], config["vocab_size"], seed=1)
    test_ids = make_tokens(config["n_test"], config["seq_len"], config["vocab_size"], seed=2)
    # on the first TRAIN_ROWS sequences: 256 of GPT-2-small at once would hold 6.6 GB of logits alone
    losses = train_a_few_steps(model, train_ids[:TRAIN_ROWS], args.train_steps)
    chunk = min(args.block_size, 8)
    forward_backward_seconds(model, train_ids[:chunk], chunk)  # warm-up
    fb = {
        "train": forward_backward_seconds(model, train_ids, chunk),
        "test": forward_backward_seconds(model, test_ids, chunk),
    }
    trim_memory()  # the training's and these passes' freed activations (GPT-2-small: the client at 6.5 GB)
    header = (
        f"{args.config}: GPT-2 {config['n_layer']} x {config['n_embd']}, V = {config['vocab_size']:,}, "
        f"T = {config['seq_len']}, p = {p:,}; {config['n_train']} training x {config['n_test']} test sequences, "
        f"blocks of {args.block_size}; FB_train = {fb['train']:.3f} s, FB_test = {fb['test']:.3f} s "
        f"(one thread); training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.train_steps} Adam steps"
    )
    print(header, flush=True)
    rows: list[dict] = []
    for w in args.workers:
        rows += run_paths(model, config, train_ids, test_ids, args, w, fb)
    result = {
        "config": args.config,
        "model": {**config, "num_params": p},
        "block_size": args.block_size,
        "train_losses": losses,
        "floor_forward_backward_s": fb,
        "columns": list(COLUMNS),
        "rows": rows,
        "rss_traces_mb": TRACES,
        "note": "loaded, shared machine unless stated otherwise: read time / floor ratios, not seconds",
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale_lm_{args.config}.json").write_text(json.dumps(result, indent=1))
    table = markdown(rows, header)
    (out / f"scale_lm_{args.config}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
