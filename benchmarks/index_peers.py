"""Gradient indexes side by side (issue 28 item 4): build time, query time, index size and
accuracy per ``k`` against exact float64 GGN influences, on an MLP and a 2-layer GPT-2, for ours
and every peer library that installs here, each in its own environment.

    python -m benchmarks.index_peers --tiny          # smoke sizes (a minute; the test runs it with --peers "")
    python -m benchmarks.index_peers --problems mlp --keep-reference --plot mlp.png   # one problem per run
    python -m benchmarks.index_peers --problems gpt2 --keep-reference                # (docs/benchmarks.md)

Writes ``OUT/index_peers.json`` (``index_peers-tiny.json`` with ``--tiny``), prints a markdown
table and, per peer row, the cheapest default row at least as accurate (time and byte
ratios); ``--plot`` draws time to accuracy. ``--keep-reference`` keeps the exact reference
in ``OUT`` for the next run (the GPT-2's takes about 30 minutes on the loaded 2-core machine).

Problems (trained briefly in float32 with AdamW; the indexes are built from the float32
model, the reference from its float64 copy):

- ``mlp``: a 64-64-32-10 tanh MLP (6,570 parameters) on the digits (1,600 train, 100 test);
- ``gpt2``: a 2-layer GPT-2 (vocabulary 16, 16 positions, width 16, eager attention) on
  sequences of a random sparse Markov chain (256 train, 100 test; every fifth padded), the
  causal-LM task, influence on the MLP projections only (``c_fc``, ``c_proj`` with biases:
  4,256 parameters; the rest frozen). Each sequence has ``(T - 1) V = 240`` output logits.

Reference: ``DirectInfluence(curvature="ggn")`` in float64 at ``lambda = 0.01 x`` the largest
eigenvalue of the GGN (power iteration on the dense GGN), the same ``lambda`` every index is
queried at. Also reported: the plain unprojected gradient dot product and the effective
dimension ``tr(G (G + lambda I)^-1)`` of the full GGN.

Methods (``client="sync"``: one process, no Dask cluster; the machine may be loaded, so
compare ratios within one run; every library at one ``k`` before the next ``k``, each after an
untimed warm-up build and query on 64 samples):

- ``ours``: ``di.GradientIndex`` with its defaults;
- ``ours-exact``: ``ggn_draws=0`` (the exact projected GGN; the LM only, ``k <= 1,024``, not
  with ``--tiny``);
- ``ours-fisher``: ``preconditioner="fisher"`` (the projected empirical Fisher: TRAK's and
  Bergson's preconditioner).

Peers (``--peers``, default all four; each skipped, with the reason in the JSON's
``peers_not_run``, where its environment is missing or it has no path for the problem): TRAK
(``traker`` 0.3.2, the MLP), Bergson 2.5.1 (the GPT-2), dattri-llm 0.1.0 and LoGra
(``logix-ai`` 0.1.1), each run by its driver ``benchmarks/peer_<name>_index.py`` in its own
environment ``benchmarks/.venv-<env>`` (git-ignored); the driver's docstring has the commands
that make the environment and how the library is mapped onto our problems and ``lambda``.
The problems cross over through :mod:`benchmarks.peer_problems_index`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import dask_influence as di

SEED = 0
TOP = 10


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    mlp_hidden: tuple[int, int]
    mlp_train: int
    mlp_test: int
    gpt2_layers: int
    gpt2_width: int
    gpt2_positions: int
    gpt2_train: int
    gpt2_test: int
    epochs: int
    ks: tuple[int, ...]
    exact_lm: bool
    ours_ks: tuple[int, ...] = ()  # smaller k for the default index only: where it meets the peers' accuracy


FULL = Plan((64, 32), 1600, 100, 2, 16, 16, 256, 100, 20, (256, 1024, 4096), True, (64, 128))
TINY = Plan((8, 8), 120, 12, 1, 8, 8, 32, 8, 3, (16, 64), False, (8,))


@dataclass
class Problem:
    name: str
    model: nn.Module  # float32, eval
    task: Any
    train: Any
    test: Any


def _fit(model: nn.Module, loss: Any, n: int, epochs: int, batch: int = 32) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            opt.zero_grad()
            loss(perm[s : s + batch]).backward()
            opt.step()
    model.eval()


def mlp_problem(plan: Plan) -> Problem:
    from .problems import digits

    x, y = digits(SEED)
    x = x.reshape(len(x), -1)
    n, m = plan.mlp_train, plan.mlp_test
    torch.manual_seed(SEED)
    h1, h2 = plan.mlp_hidden
    model = nn.Sequential(nn.Linear(64, h1), nn.Tanh(), nn.Linear(h1, h2), nn.Tanh(), nn.Linear(h2, 10))
    xt, yt = torch.from_numpy(x[:n]), torch.from_numpy(y[:n])
    ce = nn.CrossEntropyLoss()
    _fit(model, lambda idx: ce(model(xt[idx]), yt[idx]), n, plan.epochs)
    return Problem("mlp", model, nn.CrossEntropyLoss(), (x[:n], y[:n]), (x[n : n + m], y[n : n + m]))


def markov_sequences(n: int, vocab: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` sequences of a random sparse Markov chain over ``vocab`` tokens, every fifth padded."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(rng.dirichlet(np.full(vocab, 0.2), size=vocab), axis=1)
    ids = np.empty((n, length), np.int64)
    ids[:, 0] = rng.integers(0, vocab, n)
    for t in range(1, length):
        ids[:, t] = np.minimum((cumulative[ids[:, t - 1]] < rng.random(n)[:, None]).sum(1), vocab - 1)
    mask = np.ones_like(ids)
    mask[::5, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def gpt2_problem(plan: Plan) -> Problem:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=16, n_positions=plan.gpt2_positions, n_embd=plan.gpt2_width, n_layer=plan.gpt2_layers, n_head=2,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    n, m = plan.gpt2_train, plan.gpt2_test
    data = markov_sequences(n + m, 16, plan.gpt2_positions, SEED)
    train = {k: v[:n] for k, v in data.items()}
    test = {k: v[n:] for k, v in data.items()}
    task = di.tasks.causal_lm()
    tensors = {k: torch.from_numpy(v) for k, v in train.items()}
    _fit(model, lambda idx: task.loss(model, {k: v[idx] for k, v in tensors.items()}), n, plan.epochs)
    for name, param in model.named_parameters():  # influence on the MLP projections only
        param.requires_grad_(".mlp." in name)
    return Problem("gpt2", model, task, train, test)


def _wide(data: Any) -> Any:
    if isinstance(data, dict):
        return data
    x, y = data
    return (x.astype(np.float64), y)


def _args(problem: Problem, data: Any) -> tuple:
    return tuple(data) if isinstance(data, tuple) else (data,)


def reference(problem: Problem) -> dict[str, Any]:
    """Exact float64 GGN influences at ``lambda = 0.01 x`` the GGN's largest eigenvalue."""
    import copy

    model = copy.deepcopy(problem.model).double()
    train, test = _wide(problem.train), _wide(problem.test)
    start = time.perf_counter()
    direct = di.DirectInfluence(model, problem.task, regularization=1.0, curvature="ggn").fit(train)
    g = direct.hessian
    v = torch.randn(g.shape[0], dtype=g.dtype, generator=torch.Generator().manual_seed(SEED))
    for _ in range(100):
        v = g @ v
        v = v / v.norm()
    top = float(v @ g @ v)
    lam = 0.01 * top
    direct = di.DirectInfluence(model, problem.task, regularization=lam, curvature="ggn").fit(train)
    exact = direct.influences(*_args(problem, test), *_args(problem, train)).numpy()
    seconds = time.perf_counter() - start
    from dask_influence.index import Projector

    pr = Projector(model, problem.task, "sjlt", 8)
    g_train = pr.functions.per_sample_grads(pr.theta, pr.batch(train))
    g_test = pr.functions.per_sample_grads(pr.theta, pr.batch(test), measurement=True)
    plain = (g_test @ g_train.T).numpy()
    e = torch.linalg.eigvalsh(g).clamp_min(0)
    return {
        "exact": exact,
        "lam": lam,
        "lambda_max": top,
        "num_params": int(g.shape[0]),
        "seconds": seconds,
        "effective_dimension": float((e / (e + lam)).sum()),
        "plain_dot": compare(plain, exact),
    }


def compare(approx: np.ndarray, exact: np.ndarray, top: int = TOP) -> dict[str, float]:
    """Pooled Pearson and the mean top-``top`` overlap of the most helpful training points."""
    a, b = approx.ravel().astype(np.float64), exact.ravel()
    pearson = float(np.corrcoef(a, b)[0, 1])
    t = min(top, exact.shape[1])
    mine = np.argsort(-approx, axis=1)[:, :t]
    theirs = np.argsort(-exact, axis=1)[:, :t]
    overlap = float(np.mean([len(set(x) & set(y)) / t for x, y in zip(mine, theirs)]))
    return {"pearson": pearson, "top_overlap": overlap}


def disk_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def methods(problem: Problem, plan: Plan, k: int) -> list[tuple[str, dict]]:
    out = [("ours", {}), ("ours-fisher", {"preconditioner": "fisher"})]
    if problem.name == "gpt2" and plan.exact_lm and k <= 1024:  # the exact LM GGN: (T - 1) V passes per sequence
        out.insert(1, ("ours-exact", {"ggn_draws": 0}))
    if problem.name == "mlp" and k >= 256:  # Kronecker, stored as rank-1 factors per layer (a classifier: T = 1):
        # sum_l (k_o + k_i) numbers per point instead of k (106 of 1,027, 213 of 4,109); docs/gradient-index.md
        out.append(("ours-factored", {"projection": "kronecker", "storage": "factored"}))
    return out


def measure_ours(problem: Problem, ref: dict, k: int, name: str, options: dict, workdir: Path) -> dict:
    path = workdir / f"{problem.name}-{name}-{k}.zarr"
    block = 400 if isinstance(problem.train, tuple) else 64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        index = di.GradientIndex.build(
            problem.model, problem.task, problem.train, path, projection_dim=k, regularization=ref["lam"],
            train_block_size=block, client="sync", overwrite=True, **options,
        )  # fmt: skip
        build = time.perf_counter() - start
    start = time.perf_counter()
    scores = index.influences(problem.test)
    query = time.perf_counter() - start
    attrs = index.attributes
    row = {
        "problem": problem.name,
        "method": name,
        "k": index.dim,
        "build_s": build,
        "query_s": query,
        "bytes": disk_bytes(path),
        **compare(scores, ref["exact"]),
        "ggn": attrs.get("ggn_estimate"),
        "dtype": attrs.get("dtype"),
        "d_k": attrs.get("effective_dimension_projected"),
        "d_estimate": attrs.get("effective_dimension"),
        "warned_small_k": any("too small" in str(w.message) for w in caught),
    }
    shutil.rmtree(path, ignore_errors=True)
    return row


BENCH = Path(__file__).resolve().parent

# name -> (its environment under benchmarks/, its driver module, the label of its rows);
# each driver's docstring says how its environment is made
PEERS: dict[str, tuple[str, str, str]] = {
    "trak": (".venv-trak", "benchmarks.peer_trak_index", "trak"),
    "bergson": (".venv-bergson", "benchmarks.peer_bergson_index", "bergson"),
    "dattri": (".venv-dattri-llm", "benchmarks.peer_dattri_index", "dattri-llm"),
    "logra": (".venv-logix", "benchmarks.peer_logra_index", "logra (logix-ai)"),
}


def peer_spec(problem: Problem, ref: dict, plan: Plan, ks: tuple[int, ...], workdir: Path, name: str) -> Path:
    """Write the problem (data, trained float32 weights, sizes) for a peer driver; see
    :mod:`benchmarks.peer_problems_index`. Returns the spec's path."""
    data = workdir / f"{problem.name}-data.npz"
    state = workdir / f"{problem.name}-state.pt"
    if not data.exists():
        if isinstance(problem.train, tuple):
            (x, y), (xt, yt) = problem.train, problem.test
            np.savez(data, x_train=x, y_train=y, x_test=xt, y_test=yt)
        else:
            np.savez(
                data,
                **{
                    f"{k}_{part}": v
                    for part, d in (("train", problem.train), ("test", problem.test))
                    for k, v in d.items()
                },
            )
        torch.save(problem.model.state_dict(), state)
    spec = {
        "problem": problem.name, "data": str(data), "state": str(state), "hidden": list(plan.mlp_hidden),
        "gpt2": {"n_layer": plan.gpt2_layers, "n_embd": plan.gpt2_width, "n_positions": plan.gpt2_positions,
                 "vocab_size": 16, "n_head": 2},
        "ks": list(ks), "lam": ref["lam"], "workdir": str(workdir),
        "out": str(workdir / f"{name}-{problem.name}-out.json"),
    }  # fmt: skip
    path = workdir / f"{name}-{problem.name}-spec.json"
    path.write_text(json.dumps(spec))
    return path


def measure_peer(
    name: str, problem: Problem, ref: dict, plan: Plan, ks: tuple[int, ...], workdir: Path, log: Any = print
) -> tuple[list[dict], str | None]:
    """A peer's rows for ``ks``, from its driver run in its own environment; ``([], why)``
    where its environment is missing, it skips the problem, or it fails (the last line of
    its error)."""
    import subprocess

    env, module, label = PEERS[name]
    python = BENCH / env / "bin" / "python"
    if not python.exists():
        return [], f"not installed ({python.relative_to(BENCH.parent)} missing)"
    spec = peer_spec(problem, ref, plan, ks, workdir, name)
    out = Path(json.loads(spec.read_text())["out"])
    out.unlink(missing_ok=True)
    done = subprocess.run(
        ["nice", "-n", "10", str(python), "-m", module, str(spec)],
        cwd=BENCH.parent, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if done.returncode != 0 or not out.exists():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return [], f"failed: {lines[-1] if lines else done.returncode}"
    answer = json.loads(out.read_text())
    rows = []
    for r in answer["rows"]:
        scores = np.load(r["scores"])
        rows.append({
            "problem": problem.name, "method": f"{label} {answer['version']}", "k": r["k"], "build_s": r["build_s"],
            "query_s": r["query_s"], "bytes": r["bytes"], **compare(scores, ref["exact"]), "ggn": None,
            "dtype": r.get("dtype", "float32"), "d_k": None, "d_estimate": None, "warned_small_k": False,
        })  # fmt: skip
    return rows, answer.get("skipped")


def _ggn_note(ggn: Any) -> str:
    """How a default row summed its GGN, as the table shows it."""
    if not isinstance(ggn, dict):
        return ""
    if ggn.get("kind") == "sampled":
        return f" (sampled, {ggn['draws']} draws)"
    return f" ({ggn.get('kind')}{', trace ' + str(ggn['trace']) if 'trace' in ggn else ''})"


def table(result: dict) -> str:
    lines = []
    for name, problem in result["problems"].items():
        ref = problem["reference"]
        lines += [
            f"\n**{name}** ({ref['num_params']:,} parameters; lambda = {ref['lam']:.3g} = 0.01 x lambda_max; "
            f"exact d_lambda {ref['effective_dimension']:,.0f}; plain gradient dot product: Pearson "
            f"{ref['plain_dot']['pearson']:.3f}; reference {ref['seconds']:.1f} s)\n",
            "| method | k | build s | query s | index bytes | Pearson | top-10 | d_k / estimate | warned |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in problem["rows"]:
            est = "saturated" if r["d_estimate"] is None else f"{r['d_estimate']:,.0f}"
            d_k = "" if r["d_k"] is None else f"{r['d_k']:,.0f} / {est}"
            how = r["method"] + _ggn_note(r["ggn"])
            lines.append(
                f"| {how} | {r['k']:,} | {r['build_s']:.2f} | {r['query_s']:.3f} | {r['bytes']:,} | "
                f"{r['pearson']:.3f} | {r['top_overlap']:.2f} | {d_k} | {'yes' if r['warned_small_k'] else ''} |"
            )
    return "\n".join(lines)


def _family(method: str) -> str:
    """A row's library (one line of the plot): the method without its version."""
    return method.rsplit(" ", 1)[0] if method[-1].isdigit() else method


def at_equal_accuracy(result: dict, ours: str = "ours") -> dict[str, list[dict]]:
    """Per problem, each peer row against the cheapest ``ours`` row (by build + query
    seconds) whose Pearson is at least the peer's: the time and byte ratios (``ours / peer``:
    below 1 is ours cheaper), or ``None`` where no ``ours`` row reaches the peer's accuracy."""
    out: dict[str, list[dict]] = {}
    for name, problem in result["problems"].items():
        mine = [r for r in problem["rows"] if r["method"] == ours]
        lines = []
        for r in problem["rows"]:
            if r["method"].startswith("ours"):
                continue
            good = [m for m in mine if m["pearson"] >= r["pearson"]]
            best = min(good, key=lambda m: m["build_s"] + m["query_s"]) if good else None
            seconds = r["build_s"] + r["query_s"]
            lines.append({
                "peer": r["method"], "k": r["k"], "pearson": r["pearson"],
                "ours_k": None if best is None else best["k"],
                "ours_pearson": None if best is None else best["pearson"],
                "time_ratio": None if best is None else (best["build_s"] + best["query_s"]) / seconds,
                "build_ratio": None if best is None else best["build_s"] / r["build_s"],
                "query_ratio": None if best is None else best["query_s"] / r["query_s"],
                "bytes_ratio": None if best is None else best["bytes"] / r["bytes"],
            })  # fmt: skip
        out[name] = lines
    return out


def plot(result: dict, path: str | os.PathLike) -> None:
    """Time to accuracy: build + query seconds (log) against pooled Pearson, one panel per
    problem, one line per library across ``k`` (each point labelled with its ``k``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = list(result["problems"])
    order = ["ours", "ours-exact", "ours-fisher", "trak", "bergson", "dattri-llm", "logra (logix-ai)"]
    seen = {_family(r["method"]) for p in result["problems"].values() for r in p["rows"]}
    palette = plt.get_cmap("tab10").colors
    colors = {f: palette[i % len(palette)] for i, f in enumerate(order + sorted(seen - set(order)))}
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        problem = result["problems"][name]
        families: dict[str, list[dict]] = {}
        for r in problem["rows"]:
            families.setdefault(_family(r["method"]), []).append(r)
        for family, rows in families.items():
            rows = sorted(rows, key=lambda r: r["k"])
            x = [r["build_s"] + r["query_s"] for r in rows]
            y = [r["pearson"] for r in rows]
            style = "-o" if family.startswith("ours") else "--s"
            width = 2.2 if family == "ours" else 1.3
            (line,) = ax.plot(x, y, style, label=family, linewidth=width, color=colors[family])
            for xi, yi, r in zip(x, y, rows):
                ax.annotate(f"{r['k']:,}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=line.get_color())  # fmt: skip
        ref = problem["reference"]
        ax.axhline(ref["plain_dot"]["pearson"], color="grey", linestyle=":", linewidth=1, label="plain gradient dot")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels overlapped within a decade
        ax.set_xlabel("build + query seconds (log; 2-core machine, one run)")
        ax.set_ylabel("pooled Pearson vs exact GGN influence")
        ax.set_title(f"{name}: {ref['num_params']:,} parameters (points labelled with k)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cached_reference(problem: Problem, plan: Plan, cache: Path | None) -> dict[str, Any]:
    """:func:`reference`, kept in ``cache`` (the output folder) for a rerun of the same plan."""
    if cache is None:
        return reference(problem)
    sizes = {k: v for k, v in plan.__dict__.items() if k not in ("ks", "exact_lm", "ours_ks")}  # what it depends on
    digest = hashlib.sha256(json.dumps(sizes, sort_keys=True, default=str).encode()).hexdigest()[:12]
    key = f"{problem.name}-{digest}"
    path = cache / f"index_peers-reference-{key}.npz"
    if path.exists():
        stored = np.load(path, allow_pickle=False)
        return {**json.loads(str(stored["meta"])), "exact": stored["exact"]}
    ref = reference(problem)
    np.savez(path, exact=ref["exact"], meta=json.dumps({k: v for k, v in ref.items() if k != "exact"}))
    return ref


WARM = 64  # samples of the untimed warm-up builds


def _source() -> dict[str, Any]:
    """The commit measured, and the files under src/ that differed from it (others' work in
    progress in a shared tree is measured too)."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=BENCH.parent, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_changed": git("diff", "--name-only", "HEAD", "--", "src").split(),
    }


def _head(data: Any, n: int = WARM) -> Any:
    return tuple(a[:n] for a in data) if isinstance(data, tuple) else {k: v[:n] for k, v in data.items()}


def _line(r: dict) -> str:
    return f"  {r['method']} k={r['k']}: build {r['build_s']:.2f} s, query {r['query_s']:.3f} s, r {r['pearson']:.3f}"


def run(
    plan: Plan,
    problems: list[str],
    workdir: Path,
    log: Any = print,
    peers: tuple[str, ...] = tuple(PEERS),
    cache: Path | None = None,
) -> dict:
    torch.set_num_threads(1)
    log = functools.partial(print, flush=True) if log is print else log
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "source": _source(),
        "plan": plan.__dict__,
        "problems": {},
    }
    for name in problems:
        problem = mlp_problem(plan) if name == "mlp" else gpt2_problem(plan)
        ref = cached_reference(problem, plan, cache)
        log(f"{name}: p = {ref['num_params']:,}, lambda = {ref['lam']:.3g}, reference {ref['seconds']:.1f} s")
        rows: list[dict] = []
        notes: dict[str, str] = {}
        warm = Problem(problem.name, problem.model, problem.task, _head(problem.train), _head(problem.test))
        for method, options in methods(problem, plan, plan.ks[0]):  # untimed, as each peer driver warms up
            measure_ours(warm, {**ref, "exact": ref["exact"][:WARM, :WARM]}, plan.ks[0], method, options, workdir)
        for k in plan.ours_ks:  # the default index below the shared k: the cheapest at the peers' accuracy
            rows.append(measure_ours(problem, ref, k, "ours", {}, workdir))
            log(_line(rows[-1]))
        for k in plan.ks:  # alternating: every library at one k before the next k
            for method, options in methods(problem, plan, k):
                rows.append(measure_ours(problem, ref, k, method, options, workdir))
                log(_line(rows[-1]))
            for peer in peers:
                if peer in notes:  # skipped or failed at a smaller k: not tried again
                    continue
                got, note = measure_peer(peer, problem, ref, plan, (k,), workdir)
                if note:
                    notes[peer] = note
                    log(f"  {peer}: {note}")
                for r in got:
                    if any(q["method"] == r["method"] and q["k"] == r["k"] for q in rows):  # its k is capped
                        notes[peer] = f"k capped at {r['k']:,} (asked {k:,})"
                        log(f"  {peer}: {notes[peer]}")
                        continue
                    rows.append(r)
                    log(_line(r))
        result["problems"][name] = {
            "reference": {k: v for k, v in ref.items() if k != "exact"}, "rows": rows, "peers_not_run": notes,
        }  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke sizes")
    parser.add_argument("--problems", default="mlp,gpt2")
    parser.add_argument("--ks", default=None, help="comma-separated k (default: the plan's)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--peers", default=",".join(PEERS), help="comma-separated peers to run where installed ('' for none)"
    )
    parser.add_argument("--keep-reference", action="store_true", help="reuse the exact reference kept in --out")
    parser.add_argument("--plot", default=None, help="write the time-to-accuracy plot here (a .png)")
    parser.add_argument(
        "--from-json", default=None, help="comma-separated result files of earlier runs: merge them, print and plot"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        result = {"problems": {}, "runs": []}
        for path in args.from_json.split(","):
            earlier = json.loads(Path(path).read_text())
            result["problems"].update(earlier["problems"])
            result["runs"].append({k: earlier.get(k) for k in ("machine", "source", "plan")})
        result["at_equal_accuracy"] = at_equal_accuracy(result)
    else:
        plan = TINY if args.tiny else FULL
        if args.ks:
            plan = Plan(**{**plan.__dict__, "ks": tuple(int(k) for k in args.ks.split(","))})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            peers = tuple(p for p in args.peers.split(",") if p)
            cache = out if args.keep_reference else None
            result = run(plan, args.problems.split(","), Path(tmp), peers=peers, cache=cache)
        result["at_equal_accuracy"] = at_equal_accuracy(result)
        (out / ("index_peers-tiny.json" if args.tiny else "index_peers.json")).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(table(result))
    for name, lines in result["at_equal_accuracy"].items():
        for e in lines:
            if e["time_ratio"] is None:
                print(f"{name}: {e['peer']} k={e['k']:,} r={e['pearson']:.3f}: no 'ours' row reaches it")
            else:
                print(
                    f"{name}: {e['peer']} k={e['k']:,} r={e['pearson']:.3f} vs ours k={e['ours_k']:,} "
                    f"r={e['ours_pearson']:.3f}: time x{e['time_ratio']:.2f} (build x{e['build_ratio']:.2f}, "
                    f"query x{e['query_ratio']:.2f}), bytes x{e['bytes_ratio']:.2f}"
                )
    return result


if __name__ == "__main__":
    main()
