"""Time to accuracy: dask-influence against pyDVL, Kronfluence, dattri and captum, in one run.

    python -m benchmarks.peers [--tiny] [--out benchmarks/results] [--repeats 3] [--only mlp-1e4,...]
    make bench-peers                      # the full configuration (see docs/benchmarks.md)

Per problem (a model trained once, its data; the same files go to every library) one run
measures, alternating the libraries method by method and rotating which goes first:

- an EXACT REFERENCE, computed once: our CG at ``rtol=1e-8`` on a float64 copy of the model and
  data (or our DirectInfluence there, on the tiny problem); on the CNN, whose float64
  convolutions are slow, that CG is preconditioned by the Cholesky factor of a float32
  DirectInfluence fit (``"Direct+CG"``: a few float64 sweeps reach the float64 solution);
- the LOWER BOUND: per-sample gradients of all test and train points plus one product
  ``test_grads @ train_grads.T``, no curvature work (fastest of the runs interleaved with the
  solvers);
- each method (Direct, CG, LiSSA, Arnoldi, Nystroem, EK-FAC) in our library and in every peer
  that has it, with matched hyperparameters (rank, steps, regularization; each driver maps
  them onto its library's conventions and normalizes sign and scale to ours): end-to-end time
  (fit + factors + scoring) and its phases, medians of ``--repeats`` runs; Pearson and Spearman
  correlation of the whole ``(n_test, n_train)`` influence matrix against the reference;
  agreement (Pearson) with our implementation of the same method; end-to-end time over the
  lower bound.

Each peer runs in its own virtual environment as a child process (``benchmarks/peer_*.py``,
pyDVL's ``benchmarks/pydvl_driver.py``), created by ``make bench-env-<peer>``. A peer whose
environment is missing gets the row "not installed: make bench-env-<peer>"; one that cannot
run a method or model gets "n/a: reason"; a run over ``--timeout`` seconds is killed.

Writes ``peers.json`` and ``peers.md`` into ``--out`` and the plot of accuracy against end-to-end
time (``--plot``; by default ``docs/img/time_to_accuracy.png`` for the full configuration and
``<out>/time_to_accuracy.png`` for ``--tiny``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dask_influence.core.preconditioners import Preconditioner

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("Direct", "CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC")
OURS = "ours"


# -- the peers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # run as `python -m module` in the peer's environment
    venv: str  # relative to the repository root
    make_target: str
    check: str  # an import that must work there
    methods: tuple[str, ...]
    protocol: str = "peer"  # "peer" (benchmarks.peer_common) or "pydvl" (benchmarks.pydvl_driver)

    @property
    def python(self) -> Path:
        env = os.environ.get(f"BENCH_{self.name.upper()}_PYTHON")
        return Path(env) if env else ROOT / self.venv / "bin" / "python"


PEERS = (
    Peer(
        "pyDVL",
        "benchmarks.pydvl_driver",
        "benchmarks/.venv-pydvl",
        "bench-env",
        "import pydvl.influence.torch",
        ("Direct", "CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC"),
        protocol="pydvl",
    ),
    Peer(
        "Kronfluence",
        "benchmarks.peer_kronfluence",
        "benchmarks/.venv-kronfluence",
        "bench-env-kronfluence",
        "import kronfluence.analyzer",
        ("EK-FAC",),
    ),
    Peer(
        "dattri",
        "benchmarks.peer_dattri",
        "benchmarks/.venv-dattri",
        "bench-env-dattri",
        "import dattri.algorithm.influence_function",
        ("Direct", "CG", "LiSSA", "Arnoldi", "EK-FAC"),
    ),
    Peer(
        "captum",
        "benchmarks.peer_captum",
        "benchmarks/.venv-captum",
        "bench-env-captum",
        "import captum.influence",
        ("Direct", "Arnoldi"),
    ),
)
PEER_NAMES = tuple(p.name for p in PEERS)
LIBRARIES = (OURS, *PEER_NAMES)


def peer_status(peer: Peer, python: Path | None = None) -> str | None:
    """``None`` if the peer's environment is usable, else the row's text ("not installed: ...")."""
    python = python or peer.python
    if not python.exists():
        return f"not installed: make {peer.make_target}"
    check = subprocess.run([str(python), "-c", peer.check], capture_output=True, text=True, timeout=300)
    if check.returncode != 0:
        tail = check.stderr.strip().splitlines()[-1:] or ["?"]
        return f"not installed: make {peer.make_target} ({tail[0][:160]})"
    return None


class PeerProcess:
    """A peer's driver in its environment: one command, one answer, with a time limit."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self.proc = subprocess.Popen(
            [str(peer.python), "-m", peer.module],
            cwd=ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if os.environ.get("BENCH_QUIET") else sys.stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                self.lines.put(line[3:])
        self.lines.put(None)

    def ask(self, timeout: float, **msg: Any) -> dict:
        assert self.proc.stdin
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return {"ok": False, "dead": True, "error": f"timeout: over {timeout:.0f} s (killed)"}
        except OSError as err:
            line = None
            self.kill()
            return {"ok": False, "dead": True, "error": f"{self.peer.name}'s process is gone: {err}"}
        if line is None:
            code = self.proc.wait()
            why = " (killed by SIGKILL: out of memory?)" if code == -9 else ""
            return {"ok": False, "dead": True, "error": f"{self.peer.name}'s process died with exit code {code}{why}"}
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


# -- the problems -----------------------------------------------------------------------------
@dataclass
class Spec:
    """One problem: a model trained once, its data, the methods and their hyperparameters."""

    key: str
    arch: str
    n_train: int
    n_test: int
    reference: str = "Direct"  # "Direct", "CG" or "Direct+CG" (float64, rtol 1e-8), computed once
    methods: tuple[str, ...] = METHODS
    params: dict[str, dict] = field(default_factory=dict)  # per-method overrides
    na: dict[str, str] = field(default_factory=dict)  # "library" or "library/method" -> reason
    regularization: float = 0.1
    timeout_s: float = 600.0  # per run of a peer; a run over it is killed and not repeated
    lm_steps: int = 300  # training steps of the language model (full batch)
    lissa_curve: tuple[int, ...] = (10, 25)  # fewer steps of our LiSSA, once each: accuracy against time


# Hyperparameters every library gets (each names them its own way; see the drivers).
DEFAULTS: dict[str, dict] = {
    "Direct": {},
    "CG": {"rtol": 1e-4, "maxiter": 100},
    # rtol 0: every library runs exactly `maxiter` steps (dattri has no stopping rule)
    "LiSSA": {"maxiter": 100, "rtol": 0.0, "batch_size": 256},
    "Arnoldi": {"rank": 50, "krylov_dimension": 100},
    "Nystroem": {"rank": 50},
    "EK-FAC": {},
}

_LINEAR_ONLY = "its EK-FAC factors nn.Linear layers only"
_NO_LM = "benchmarks/pydvl_driver.py loads the MLP and CNN architectures only"
_DENSE = "forms the dense p x p Hessian (minutes to hours at these sizes); run on the tiny problem only"


def full_specs() -> list[Spec]:
    dense = {f"{lib}/Direct": _DENSE for lib in PEER_NAMES}
    return [
        Spec("mlp-1e4", "mlp-1e4", 2000, 100, reference="CG", methods=METHODS[1:], na=dense),
        Spec(
            "mlp-1e5",
            "mlp-1e5",
            2000,
            100,
            reference="CG",
            methods=METHODS[1:],
            params={"LiSSA": {"maxiter": 50}},
            na=dense,
        ),
        Spec(
            "cnn-digits",
            "cnn-digits",
            1597,
            20,  # each CG or LiSSA sweep costs per test point: the CNN's products are 10x the MLP's
            # float64 convolutions under double backward run 4-5x slower than float32 here: a float64
            # Direct fit is 25 minutes, float64 CG longer; H in float32 preconditions float64 CG
            reference="Direct+CG",
            methods=METHODS[1:],
            params={"LiSSA": {"maxiter": 50}},
            na={**dense, "pyDVL/EK-FAC": _LINEAR_ONLY, "dattri/EK-FAC": _LINEAR_ONLY},
        ),
        Spec(
            "gpt2-tiny",
            "gpt2-tiny",
            256,
            16,
            reference="CG",
            methods=METHODS[1:],
            # the Hessian of the trained model has an eigenvalue near -0.16: at 0.1, H + lambda I is
            # indefinite (our CG refuses it; the peers would return garbage)
            regularization=0.5,
            params={"LiSSA": {"batch_size": 64}},
            na={**dense, "pyDVL": _NO_LM, "dattri/EK-FAC": _LINEAR_ONLY + " (GPT-2's are Conv1D)"},
        ),
    ]


def tiny_specs() -> list[Spec]:
    """Seconds per library: the check that every peer agrees with ours where the method is the same."""
    return [
        Spec(
            "mlp-tiny",
            "mlp-tiny",
            200,
            10,
            regularization=0.5,
            params={
                # full-batch LiSSA is deterministic: the same recursion in every library
                "LiSSA": {"maxiter": 30, "batch_size": 200},
                # the peers drop the complement of the Krylov eigenvectors; so does ours here
                "Arnoldi": {"rank": 10, "krylov_dimension": 80, "complement": "ignore"},
                "Nystroem": {"rank": 10},
            },
            timeout_s=300,
        ),
        Spec(
            "gpt2-tiny",
            "gpt2-tiny",
            32,
            4,
            reference="CG",
            regularization=0.5,
            lm_steps=100,
            methods=("CG", "Arnoldi", "EK-FAC"),
            params={"Arnoldi": {"rank": 10, "krylov_dimension": 60, "complement": "ignore"}},
            na={"pyDVL": _NO_LM, "dattri/EK-FAC": _LINEAR_ONLY + " (GPT-2's are Conv1D)"},
            timeout_s=300,
        ),
    ]


def method_params(spec: Spec, method: str) -> dict:
    p = {"regularization": spec.regularization, **DEFAULTS.get(method, {}), **spec.params.get(method, {})}
    return p


def na_reason(spec: Spec, library: str, method: str) -> str | None:
    return spec.na.get(f"{library}/{method}") or spec.na.get(library)


# -- data and models (the project's environment) -------------------------------------------------
@dataclass
class Loaded:
    """A trained model and its data, in the shapes our solvers and the drivers take."""

    arch: str
    model: torch.nn.Module  # ours: the MLP/CNN, or the Hugging Face GPT-2
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_accuracy: float | None = None

    @property
    def is_lm(self) -> bool:
        return self.arch.startswith("gpt2")


def lm_sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(n, 8)`` over 16 tokens following ``t+1 = t + step (mod 16)`` with 10% noise, and masks."""
    from .peer_common import GPT2_TINY

    vocab, length = GPT2_TINY["vocab_size"], GPT2_TINY["n_positions"]
    rng = np.random.default_rng(seed)
    ids = np.empty((n, length), dtype=np.int64)
    ids[:, 0] = rng.integers(0, vocab, n)
    step = rng.integers(1, 3, n)
    for t in range(1, length):
        ids[:, t] = (ids[:, t - 1] + step) % vocab
    noise = rng.random((n, length)) < 0.1
    ids[noise] = rng.integers(0, vocab, int(noise.sum()))
    mask = np.ones_like(ids)
    mask[::5, -2:] = 0  # some padded sequences, as in benchmarks/transformers.py
    return ids, mask


def make_lm_problem(n_train: int, n_test: int, seed: int = 0, steps: int = 300) -> Loaded:
    """The tiny GPT-2 of benchmarks/transformers.py, trained (AdamW, full batch) on :func:`lm_sequences`."""
    from .peer_common import build_hf_gpt2, lm_labels, sequence_losses

    torch.manual_seed(seed)
    model = build_hf_gpt2("gpt2-tiny").train()
    ids, mask = lm_sequences(n_train, seed)
    ids_test, mask_test = lm_sequences(n_test, seed + 1000)
    x, m = torch.from_numpy(ids), torch.from_numpy(mask)
    labels = lm_labels(x, m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        sequence_losses(model(input_ids=x, attention_mask=m).logits, labels).mean().backward()
        opt.step()
    model.eval()
    return Loaded("gpt2-tiny", model, ids, mask, ids_test, mask_test)


def load_problem(spec: Spec) -> Loaded:
    if spec.arch.startswith("gpt2"):
        return make_lm_problem(spec.n_train, spec.n_test, steps=spec.lm_steps)
    from .problems import make_problem

    pb = make_problem(spec.arch, spec.n_train, spec.n_test)
    return Loaded(spec.arch, pb.model, pb.x_train, pb.y_train, pb.x_test, pb.y_test, pb.train_accuracy)


def batches(pb: Loaded, dtype: torch.dtype | None = None) -> tuple[tuple, tuple]:
    """``(train, test)`` as our solvers take them: ``(x, y)`` pairs, or dict batches for the language model."""
    if pb.is_lm:
        train = {"input_ids": torch.from_numpy(pb.x_train), "attention_mask": torch.from_numpy(pb.y_train)}
        test = {"input_ids": torch.from_numpy(pb.x_test), "attention_mask": torch.from_numpy(pb.y_test)}
        return (train,), (test,)
    x, xt = pb.x_train, pb.x_test
    if dtype == torch.float64:
        x, xt = x.astype(np.float64), xt.astype(np.float64)
    return (x, pb.y_train), (xt, pb.y_test)


def fit_data(pb: Loaded, train: tuple) -> Any:
    """``train`` of :func:`batches` as ``fit`` takes it: the ``(x, y)`` pair, or the language model's
    dict batch itself (the 1-tuple ``(batch,)`` would be read as a list of one batch, whose random
    batches for LiSSA are then whole batches)."""
    return train[0] if pb.is_lm else train


def make_ours(method: str, pb: Loaded, p: dict, chunk: int, model: torch.nn.Module | None = None):
    import dask_influence as di

    from .models import loss_fn

    model = pb.model if model is None else model
    loss = di.tasks.causal_lm() if pb.is_lm else loss_fn()
    common = {"regularization": p["regularization"], "chunk_size": chunk}
    if method == "Direct":
        return di.DirectInfluence(model, loss, **common)
    if method == "CG":
        extra = {k: p[k] for k in ("preconditioner", "preconditioner_rank") if k in p}
        return di.CgInfluence(model, loss, rtol=p["rtol"], maxiter=p["maxiter"], **extra, **common)
    if method == "LiSSA":
        return di.LissaInfluence(
            model,
            loss,
            maxiter=p["maxiter"],
            rtol=p["rtol"],
            scale=p.get("scale"),
            batch_size=p["batch_size"],
            **common,
        )
    if method == "Arnoldi":
        extra = {"complement": p["complement"]} if "complement" in p else {}
        return di.ArnoldiInfluence(
            model, loss, rank=p["rank"], krylov_dimension=p["krylov_dimension"], **extra, **common
        )
    if method == "Nystroem":
        return di.NystroemSketchInfluence(model, loss, rank=p["rank"], **common)
    if method == "EK-FAC":
        return di.EkfacInfluence(model, loss, update_diagonal=True, **common)
    raise ValueError(method)


def run_ours(method: str, pb: Loaded, p: dict, chunk: int, model=None, dtype=None) -> tuple[dict, np.ndarray, Any]:
    import dask_influence as di

    train, test = batches(pb, dtype)
    out: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", di.ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # EK-FAC on GPT-2: which parameters it leaves out
        t0 = time.perf_counter()  # construction counts as fit, as for the peers
        solver = make_ours(method, pb, p, chunk, model)
        solver.fit(fit_data(pb, train))
        t1 = time.perf_counter()
        factors = solver.influence_factors(*test)
        t2 = time.perf_counter()
        values = solver.influences_from_factors(factors, *train)
        t3 = time.perf_counter()
    out.update(fit_s=t1 - t0, factors_s=t2 - t1, scoring_s=t3 - t2)
    return out, values.detach().cpu().numpy(), solver


def measure_lower_bound(pb: Loaded, chunk: int) -> dict:
    """Per-sample gradients of all test and train points (vmap of grad) plus one product."""
    if not pb.is_lm:
        from .problems import lower_bound

        return lower_bound(pb.model, pb.x_train, pb.y_train, pb.x_test, pb.y_test, chunk=chunk)[0]
    from torch.func import functional_call, grad, vmap

    from .peer_common import lm_labels, sequence_losses

    model = pb.model
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": mask[None]}).logits
        return sequence_losses(logits, lm_labels(ids[None], mask[None]))[0]

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def flat(ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        g = per_sample(params, torch.from_numpy(ids), torch.from_numpy(mask))
        return torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], dim=1)

    start = time.perf_counter()
    test = flat(pb.x_test, pb.y_test)
    mid = time.perf_counter()
    test @ flat(pb.x_train, pb.y_train).T
    end = time.perf_counter()
    return {"test_grads_s": mid - start, "scoring_s": end - mid, "total_s": end - start}


class CholeskyPreconditioner(Preconditioner):
    """``(H_32 + lambda I)^-1`` from the float64 Cholesky factor of a float32 Direct fit's ``H``:
    float64 CG preconditioned by it converges in a few sweeps to the float64 solution."""

    def __init__(self, factor: torch.Tensor):
        super().__init__()
        self.factor = factor

    def _fit(self, operator, regularization: float) -> None:
        if operator.size != self.factor.shape[0]:
            raise ValueError(f"the factor is for p={self.factor.shape[0]}, the operator has p={operator.size}")

    def _apply(self, r: torch.Tensor) -> torch.Tensor:
        from dask_influence.core.eigen import factor_solve

        return factor_solve(self.factor, r)


def reference(spec: Spec, pb: Loaded, chunk: int, log) -> tuple[dict, np.ndarray]:
    """The exact influences, once: Direct, or CG at rtol 1e-8 (for "Direct+CG" preconditioned by a
    float32 Direct fit), on a float64 copy of the model."""
    model64 = copy.deepcopy(pb.model).double().eval()
    method = spec.reference
    info: dict = {"method": method, "dtype": "float64"}
    t0 = time.perf_counter()
    if method == "Direct":
        _, values, solver = run_ours(method, pb, method_params(spec, method), chunk, model=model64, dtype=torch.float64)
        info["seconds"] = time.perf_counter() - t0
        return info, values
    p = {**method_params(spec, "CG"), "rtol": 1e-8, "maxiter": 2000}
    if method == "Direct+CG":
        # float32 H from curvature products of 4,096 sample-columns per call (the fastest size
        # measured for the CNN); the fit keeps the float64 Cholesky factor of H + lambda I
        _, _, direct = run_ours("Direct", pb, method_params(spec, "Direct"), 64)
        (factor,) = direct._cholesky_factors()  # one block: blocks="full"
        p["preconditioner"] = CholeskyPreconditioner(factor)
        info["direct_float32_s"] = time.perf_counter() - t0
    _, values, solver = run_ours("CG", pb, p, chunk, model=model64, dtype=torch.float64)
    info.update(seconds=time.perf_counter() - t0, rtol=p["rtol"], iterations=solver.info_.iterations)
    return info, values


# -- accuracy --------------------------------------------------------------------------------------
def _ranks(a: np.ndarray) -> np.ndarray:
    r = np.empty(len(a), dtype=np.float64)
    r[np.argsort(a, kind="stable")] = np.arange(len(a), dtype=np.float64)
    return r


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return pearson(_ranks(a), _ranks(b))


def plan_runs(
    spec: Spec, statuses: dict[str, str | None], load_errors: dict[str, str] | None = None
) -> tuple[dict[str, list[str]], dict[tuple[str, str], dict]]:
    """Who runs which method, and the rows of those who cannot (``{(method, library): {"status": ...}}``).

    ``statuses`` maps each peer to ``None`` (usable) or why not ("not installed: make ...");
    ``load_errors`` to why its driver failed to load the problem.
    """
    load_errors = load_errors or {}
    plan: dict[str, list[str]] = {}
    rows: dict[tuple[str, str], dict] = {}
    for m in spec.methods:
        plan[m] = [OURS]
        for peer in PEERS:
            if m not in peer.methods:
                continue
            reason = na_reason(spec, peer.name, m)
            if reason:
                rows[(m, peer.name)] = {"status": f"n/a: {reason}"}
            elif statuses.get(peer.name):
                rows[(m, peer.name)] = {"status": statuses[peer.name]}
            elif peer.name in load_errors:
                rows[(m, peer.name)] = {"status": load_errors[peer.name]}
            else:
                plan[m].append(peer.name)
    return plan, rows


# -- one problem -------------------------------------------------------------------------------------
def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def summarize_runs(runs: list[dict]) -> dict:
    """Medians of the phases over the runs (``factors_s`` is ``None`` where a library does not separate it)."""
    ends = [r["fit_s"] + (r.get("factors_s") or 0.0) + r["scoring_s"] for r in runs]
    return {
        "fit_s": _median([r["fit_s"] for r in runs]),
        "factors_s": _median([r.get("factors_s") for r in runs]),
        "scoring_s": _median([r["scoring_s"] for r in runs]),
        "end_to_end_s": float(np.median(ends)),
        "end_to_end_runs_s": ends,
    }


def run_problem(spec: Spec, peers: dict[str, str | None], repeats: int, log) -> dict:
    from .models import num_params
    from .run import score_chunk

    t_start = time.perf_counter()
    pb = load_problem(spec)
    p_count = num_params(pb.model)
    chunk = score_chunk(p_count)
    log(f"== {spec.key}: p={p_count:,}, n_train={len(pb.x_train)}, n_test={len(pb.x_test)}")
    res: dict = {
        "key": spec.key,
        "arch": spec.arch,
        "params": p_count,
        "n_train": len(pb.x_train),
        "n_test": len(pb.x_test),
        "regularization": spec.regularization,
        "train_accuracy": pb.train_accuracy,
        "repeats": repeats,
        "hyperparameters": {},
        "rows": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    procs: dict[str, PeerProcess] = {}
    try:
        log("   reference")
        res["reference"], ref = reference(spec, pb, chunk, log)
        log(f"   reference: {res['reference']}")
        lbs = [measure_lower_bound(pb, chunk) for _ in range(2)]

        # calibration, untimed: the iterations our CG needs (dattri's CG has no stopping rule)
        # and LiSSA's scale (every library gets the same)
        params = {m: method_params(spec, m) for m in spec.methods}
        if "CG" in params:
            _, _, cg = run_ours("CG", pb, params["CG"], chunk)
            params["CG"]["iterations"] = int(cg.info_.iterations)
        if "LiSSA" in params:
            probe = make_ours("LiSSA", pb, {**params["LiSSA"], "maxiter": 1}, chunk)
            probe.fit(fit_data(pb, batches(pb)[0]))
            params["LiSSA"]["scale"] = float(probe.scale_)
        res["hyperparameters"] = params

        # the peers' processes, each loaded with the same files
        torch.save(pb.model.state_dict(), tmp / "model.pt")
        for k in ("x_train", "y_train", "x_test", "y_test"):
            np.save(tmp / f"{k}.npy", getattr(pb, k))
        load_msg = {
            "cmd": "load",
            "arch": spec.arch,
            "model": spec.arch,
            "state": str(tmp / "model.pt"),
            "threads": torch.get_num_threads(),
            "batch_size": chunk,
            "score_chunk": chunk,
            **{k: str(tmp / f"{k}.npy") for k in ("x_train", "y_train", "x_test", "y_test")},
        }
        versions: dict[str, dict] = {}
        load_errors: dict[str, str] = {}

        def start(peer: Peer) -> PeerProcess | None:
            proc = PeerProcess(peer)
            reply = proc.ask(timeout=600, **load_msg)
            if not reply.get("ok"):
                proc.kill()
                load_errors[peer.name] = f"failed to load: {reply.get('error', '?')[:200]}"
                return None
            reply.pop("ok")
            versions[peer.name] = reply
            return proc

        for peer in PEERS:
            wanted = [m for m in spec.methods if m in peer.methods and not na_reason(spec, peer.name, m)]
            if peers.get(peer.name) is None and wanted:
                proc = start(peer)
                if proc is not None:
                    procs[peer.name] = proc
        res["versions"] = versions

        plan, rows = plan_runs(spec, peers, load_errors)
        runs: dict[tuple[str, str], list[dict]] = {}
        values: dict[tuple[str, str], np.ndarray] = {}
        extra: dict[tuple[str, str], dict] = {}
        for r in range(repeats):
            for i, m in enumerate(spec.methods):
                if (r * len(spec.methods) + i) % 2:
                    lbs.append(measure_lower_bound(pb, chunk))
                order = plan[m][(r + i) % len(plan[m]) :] + plan[m][: (r + i) % len(plan[m])]
                for lib in order:
                    if (m, lib) in rows:  # failed or timed out in an earlier repeat
                        continue
                    log(f"   [{r + 1}/{repeats}] {m} {lib}")
                    out_file = tmp / f"{lib}_{m}.npy"
                    if lib == OURS:
                        try:
                            timing, vals, _ = run_ours(m, pb, params[m], chunk)
                        except Exception as err:  # recorded, and the run goes on
                            rows[(m, lib)] = {"status": f"failed: {type(err).__name__}: {str(err)[:200]}"}
                            continue
                    else:
                        proc = procs.get(lib)
                        if proc is None or proc.proc.poll() is not None:
                            proc = start(next(pp for pp in PEERS if pp.name == lib))
                            if proc is None:
                                rows[(m, lib)] = {"status": load_errors[lib]}
                                continue
                            procs[lib] = proc
                        if lib == "pyDVL":
                            msg = {"cmd": "solver", "name": m, "params": params[m], "out": str(out_file)}
                        else:
                            msg = {"cmd": "run", "method": m, "params": params[m], "out": str(out_file)}
                        reply = proc.ask(timeout=spec.timeout_s, **msg)
                        if not reply.pop("ok", False):
                            error = str(reply.get("error", "?"))
                            status = error if error.startswith("timeout") else f"failed: {error[:200]}"
                            rows[(m, lib)] = {"status": status}
                            log(f"   {lib} {m}: {status}")
                            if reply.get("dead"):
                                procs.pop(lib, None)
                            continue
                        timing = {k: reply.get(k) for k in ("fit_s", "factors_s", "scoring_s")}
                        extra[(m, lib)] = {
                            k: v
                            for k, v in reply.items()
                            if k not in ("fit_s", "factors_s", "scoring_s", "traceback") and not k.startswith("peak_")
                        }
                        vals = np.load(out_file)
                    runs.setdefault((m, lib), []).append(timing)
                    values.setdefault((m, lib), vals)
        lbs.append(measure_lower_bound(pb, chunk))
        best = min(lbs, key=lambda lb: lb["total_s"])
        res["lower_bound"] = {**best, "median_total_s": float(np.median([lb["total_s"] for lb in lbs])), "runs": lbs}

        for m in spec.methods:
            for lib in LIBRARIES:
                key = (m, lib)
                if key in rows:
                    res["rows"].append({"method": m, "library": lib, **rows[key]})
                    continue
                if key not in runs:
                    continue
                row: dict = {"method": m, "library": lib, "status": "ok", **summarize_runs(runs[key])}
                row.update(extra.get(key, {}))
                v = values[key]
                row["pearson"] = pearson(v, ref)
                row["spearman"] = spearman(v, ref)
                if lib != OURS and (m, OURS) in values:
                    row["agreement_with_ours"] = pearson(v, values[(m, OURS)])
                row["vs_lower_bound"] = row["end_to_end_s"] / best["total_s"]
                res["rows"].append(row)
        if "LiSSA" in params and (("LiSSA", OURS) in runs):
            res["lissa_steps"] = lissa_curve(spec, pb, params["LiSSA"], chunk, ref, res["rows"], log)
    finally:
        for proc in procs.values():
            proc.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - t_start
    return res


def lissa_curve(spec: Spec, pb: Loaded, p: dict, chunk: int, ref: np.ndarray, rows: list[dict], log) -> list[dict]:
    """Our LiSSA with fewer steps (``spec.lissa_curve``, one run each) and the row's own steps:
    ``[{"steps", "end_to_end_s", "pearson"}, ...]``, accuracy against time along the recursion."""
    curve = []
    for steps in spec.lissa_curve:
        if steps >= p["maxiter"]:
            continue
        log(f"   LiSSA ours, {steps} steps")
        timing, vals, _ = run_ours("LiSSA", pb, {**p, "maxiter": steps}, chunk)
        curve.append({"steps": steps, "end_to_end_s": sum(timing.values()), "pearson": pearson(vals, ref)})
    own = next(r for r in rows if r["method"] == "LiSSA" and r["library"] == OURS)
    if _ok(own):
        curve.append({"steps": p["maxiter"], "end_to_end_s": own["end_to_end_s"], "pearson": own["pearson"]})
    return curve


# -- reports (pure: tests/benchmarks/test_peers.py runs them on a fixed report) ---------------------
def _f(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return fmt.format(x)


def _ok(row: dict) -> bool:
    return row.get("status") == "ok"


def reference_text(ref: dict) -> str:
    if ref["method"] == "Direct+CG":
        return (
            f"our CG in float64 at rtol {ref['rtol']:g} ({ref['iterations']} sweeps), preconditioned by the "
            f"Cholesky factor of our float32 Direct fit ({ref['direct_float32_s']:.0f} s of it)"
        )
    text = f"our {ref['method']} in float64"
    if "rtol" in ref:
        text += f" at rtol {ref['rtol']:g}"
    return text


def markdown(report: dict) -> str:
    """The report as markdown: one table per problem, then ours against the fastest peer per method."""
    lines = [
        f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} threads; "
        f"configuration {report['config']}, medians of "
        + ", ".join(f"{res.get('repeats', report['repeats'])} ({res['key']})" for res in report["problems"])
        + f" run(s); {report['date']}.",
        "",
    ]
    for name, info in report["peers"].items():
        version = info.get("versions") or {}
        lines.append(f"- {name}: {info['status'] or ', '.join(f'{k} {v}' for k, v in version.items()) or 'ok'}")
    lines.append("")
    for res in report["problems"]:
        lb, ref = res["lower_bound"], res["reference"]
        ref_text = reference_text(ref)
        lines += [
            f"### {res['key']}: {res['params']:,} parameters, n_train = {res['n_train']:,}, "
            f"n_test = {res['n_test']}, regularization {res['regularization']:g}",
            "",
            f"Lower bound (per-sample gradients + one product, fastest of {len(lb['runs'])}): "
            f"**{lb['total_s']:.3f} s**. Exact reference: {ref_text} ({ref['seconds']:.1f} s, once). "
            "Times in seconds; `factors` is `-` where a library does not separate it from scoring.",
            "",
            "| method | library | end to end | fit | factors | scoring | Pearson vs exact | Spearman vs exact "
            "| agrees with ours | end to end / LB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in res["rows"]:
            if not _ok(row):
                lines.append(f"| {row['method']} | {row['library']} | {row['status']} | | | | | | | |")
                continue
            lines.append(
                f"| {row['method']} | {row['library']} | **{_f(row['end_to_end_s'])}** | {_f(row['fit_s'])} | "
                f"{_f(row.get('factors_s'))} | {_f(row['scoring_s'])} | {_f(row['pearson'], '{:.4f}')} | "
                f"{_f(row['spearman'], '{:.4f}')} | {_f(row.get('agreement_with_ours'), '{:.4f}')} | "
                f"{_f(row['vs_lower_bound'], '{:.1f}x')} |"
            )
        if res.get("lissa_steps"):
            points = "; ".join(
                f"{pt['steps']} steps: {pt['pearson']:.4f} in {pt['end_to_end_s']:.2f} s" for pt in res["lissa_steps"]
            )
            lines += ["", f"Our LiSSA by steps (Pearson vs exact, end to end; fewer steps once each): {points}."]
        lines.append("")
    lines += [
        "### Ours against the fastest peer, per method",
        "",
        "| problem | method | ours: s (Pearson) | fastest peer: s (Pearson) | ours / fastest peer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for res in report["problems"]:
        for method in METHODS:
            rows = [r for r in res["rows"] if r["method"] == method and _ok(r)]
            ours = next((r for r in rows if r["library"] == OURS), None)
            theirs = [r for r in rows if r["library"] != OURS]
            if ours is None or not theirs:
                continue
            best = min(theirs, key=lambda r: r["end_to_end_s"])
            lines.append(
                f"| {res['key']} | {method} | {_f(ours['end_to_end_s'])} ({_f(ours['pearson'], '{:.4f}')}) | "
                f"{best['library']}: {_f(best['end_to_end_s'])} ({_f(best['pearson'], '{:.4f}')}) | "
                f"{ours['end_to_end_s'] / best['end_to_end_s']:.2f}x |"
            )
            # the fewest steps of our LiSSA that reach the fastest peer's accuracy
            reach = [pt for pt in res.get("lissa_steps") or [] if pt["pearson"] >= best["pearson"]]
            if method == "LiSSA" and reach:
                pt = min(reach, key=lambda q: q["end_to_end_s"])
                lines.append(
                    f"| {res['key']} | LiSSA, {pt['steps']} steps (equal accuracy) | {_f(pt['end_to_end_s'])} "
                    f"({_f(pt['pearson'], '{:.4f}')}) | {best['library']}: {_f(best['end_to_end_s'])} "
                    f"({_f(best['pearson'], '{:.4f}')}) | {pt['end_to_end_s'] / best['end_to_end_s']:.2f}x |"
                )
    return "\n".join(lines) + "\n"


def merge(paths: list[Path]) -> dict:
    """One report from several runs' ``peers.json``: their problems in order. A later run of a
    problem replaces the earlier run's rows of the methods it ran (a run with ``--methods``
    replaces those rows only, each row keeping its own run's date and ratio to that run's lower
    bound); the peers' statuses and versions of all."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    merged = {**reports[-1], "problems": [], "merged_from": [str(path) for path in paths]}
    problems: dict[str, dict] = {}
    for rep in reports:
        for name, info in rep["peers"].items():
            merged["peers"].setdefault(name, {}).update({k: v for k, v in info.items() if v})
        for res in rep["problems"]:
            new = {**res, "date": rep.get("date"), "repeats": res.get("repeats", rep.get("repeats"))}
            new["rows"] = [{**row, "date": rep.get("date")} for row in res["rows"]]
            old = problems.get(res["key"])
            if old is not None:
                ran = {row["method"] for row in new["rows"]}
                kept = [row for row in old["rows"] if row["method"] not in ran]
                order = {m: i for i, m in enumerate(METHODS)}
                new["rows"] = sorted(kept + new["rows"], key=lambda row: order.get(row["method"], len(order)))
                if "lissa_steps" not in new and "LiSSA" not in ran and "lissa_steps" in old:
                    new["lissa_steps"] = old["lissa_steps"]
                if kept and old.get("repeats") != new.get("repeats"):
                    new["repeats"] = f"{old.get('repeats')} ({', '.join(sorted(ran))}: {new.get('repeats')})"
            problems[res["key"]] = new
    known = [spec.key for spec in full_specs()]
    merged["problems"] = sorted(
        problems.values(), key=lambda res: known.index(res["key"]) if res["key"] in known else len(known)
    )
    merged["date"] = ", ".join(sorted({str(rep.get("date")) for rep in reports}))
    return merged


MARKERS = {OURS: "o", "pyDVL": "s", "Kronfluence": "D", "dattri": "^", "captum": "v"}


def plot(report: dict, path: Path) -> None:
    """Pearson against the exact reference versus end-to-end seconds: one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    problems = report["problems"]
    cols = min(2, max(1, len(problems)))
    nrows = -(-len(problems) // cols) if problems else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.4 * nrows), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def color(method: str) -> str:
        return cycle[METHODS.index(method) % len(cycle)]

    for ax, res in zip(axes.flat, problems):
        for row in res["rows"]:
            if not _ok(row) or row.get("pearson") is None or not np.isfinite(row["pearson"]):
                continue
            ax.scatter(
                row["end_to_end_s"],
                row["pearson"],
                marker=MARKERS.get(row["library"], "x"),
                color=color(row["method"]),
                s=60 if row["library"] == OURS else 40,
                edgecolors="black" if row["library"] == OURS else "none",
            )
        curve = res.get("lissa_steps") or []
        if len(curve) > 1:
            xs, ys = [pt["end_to_end_s"] for pt in curve], [pt["pearson"] for pt in curve]
            ax.plot(xs, ys, color=color("LiSSA"), lw=1, alpha=0.7, zorder=1)
            for pt in curve:
                ax.annotate(
                    str(pt["steps"]),
                    (pt["end_to_end_s"], pt["pearson"]),
                    fontsize=7,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
        ax.axvline(res["lower_bound"]["total_s"], color="grey", ls=":", lw=1)
        ax.set(xscale="log", xlabel="end to end, s (fit + factors + scoring)", ylabel="Pearson vs exact")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a panel spanning about a decade labels its minor ticks
        ax.set_title(f"{res['key']} ({res['params']:,} parameters)", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="s", color=color(m), label=m) for m in METHODS]
    handles += [Line2D([], [], ls="", marker=mk, color="black", mfc="none", label=lib) for lib, mk in MARKERS.items()]
    handles.append(Line2D([], [], color="grey", ls=":", label="lower bound"))
    handles.append(Line2D([], [], color=color("LiSSA"), label="our LiSSA by steps"))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("Time to accuracy: method (colour) by library (marker)", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, plot_path: Path) -> None:
    """``peers.json`` and ``peers.md`` into ``out``, and the plot."""
    (out / "peers.json").write_text(json.dumps(report, indent=2))
    (out / "peers.md").write_text(markdown(report))
    plot(report, plot_path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the smoke configuration: seconds per library")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--repeats", type=int, default=None, help="runs per method and library (default 3; 1 --tiny)")
    parser.add_argument("--only", default=None, help="comma-separated problem keys, e.g. mlp-1e4,gpt2-tiny")
    parser.add_argument("--peers", default=None, help="comma-separated peers to run (default: all installed)")
    parser.add_argument("--methods", default=None, help="comma-separated methods to run, e.g. Arnoldi,EK-FAC")
    parser.add_argument("--plot", default=None, help="where the plot goes (default: see the module's docstring)")
    parser.add_argument(
        "--merge", nargs="+", default=None, help="no run: merge these peers.json files into --out (tables, plot)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        report = merge([Path(path) for path in args.merge])
        write_report(report, out, Path(args.plot) if args.plot else ROOT / "docs" / "img" / "time_to_accuracy.png")
        return report

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    specs = tiny_specs() if args.tiny else full_specs()
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s.key in keep]
    if args.methods:
        wanted = set(args.methods.split(","))
        for spec in specs:
            spec.methods = tuple(m for m in spec.methods if m in wanted)
    repeats = args.repeats or (1 if args.tiny else 3)
    chosen = set(args.peers.split(",")) if args.peers else set(PEER_NAMES)
    statuses = {p.name: (peer_status(p) if p.name in chosen else "skipped (--peers)") for p in PEERS}
    for name, status in statuses.items():
        log(f"{name}: {status or 'ok'}")
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": "tiny" if args.tiny else "full",
        "repeats": repeats,
        "date": time.strftime("%Y-%m-%d"),
        "peers": {name: {"status": status} for name, status in statuses.items()},
        "problems": [],
    }
    for spec in specs:
        res = run_problem(spec, statuses, repeats, log)
        for name, version in res.pop("versions", {}).items():
            report["peers"][name]["versions"] = version
        report["problems"].append(res)
        (out / "peers.json").write_text(json.dumps(report, indent=2))  # after each problem: partial results survive
    plot_path = Path(args.plot) if args.plot else (out if args.tiny else ROOT / "docs" / "img") / "time_to_accuracy.png"
    write_report(report, out, plot_path)
    log(f"wrote {out / 'peers.json'}, {out / 'peers.md'}, {plot_path}")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
