"""LDS and leave-one-out faithfulness of every solver, by retraining (``dask_influence.evaluate``).

    python -m benchmarks.evaluation                       # digits MLP and digits CNN
    python -m benchmarks.evaluation --problems tiny-gpt2  # a tiny GPT-2 (causal LM, dict batches)
    python -m benchmarks.evaluation --tiny                # a smoke run (a minute on 2 cores)
    python -m benchmarks.evaluation --problems digits-mlp --subsets 100 --seeds 2 --out eval.json

Per problem (scikit-learn's 8x8 digits; a tanh MLP or a small CNN, float64) the model is
trained on the objective ``mean cross-entropy + (lambda / 2) |theta|^2`` by full-batch
L-BFGS, and every solver gets ``regularization = lambda`` (so ``H + lambda I`` is the
Hessian of that objective). Then:

- **LDS**: ``--subsets`` random halves of the training set, ``--seeds`` retrainings each
  from a seeded initialization (the datamodel setting); the retrainings are run once and
  recorded in a zarr store, and every solver's LDS is computed from the same measurements
  (the second and later solvers find every run done: the resume path).
- **LOO**: ``--loo`` random training points left out one at a time, each retraining warm
  started from the trained weights; Pearson of predicted and actual test-loss changes over
  all (test point, left-out point) pairs.
- **Cost**: seconds per retraining, and the same retrainings on a LocalCluster of 1 and of
  2 worker processes (cluster start-up not counted): the speed-up of 2 workers over 1.

Prints a markdown table; ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import dask_influence as di

SOLVERS = ("Direct", "CG", "LiSSA", "Arnoldi", "Nystroem", "EK-FAC")


def build(arch: str, hidden: int) -> nn.Module:
    """The model of a problem, float64 (its initialization follows torch's global seed)."""
    if arch == "digits-mlp":
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    if arch == "digits-cnn":
        return nn.Sequential(
            nn.Conv2d(1, hidden, 3),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(hidden * 9, 10),
        ).double()
    raise ValueError(f"unknown problem {arch!r}; choose digits-mlp or digits-cnn.")


class Trainer:
    """``train(train_indices, seed, init=None) -> nn.Module``: full-batch L-BFGS on the L2 objective.

    The initialization comes from ``seed`` (or ``init``, a state dict: warm start); the result
    is deterministic given both.
    """

    def __init__(self, arch: str, hidden: int, x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int):
        self.arch, self.hidden, self.x, self.y, self.lam, self.max_iter = arch, hidden, x, y, lam, max_iter

    def __call__(self, train_indices, seed, init=None) -> nn.Module:
        torch.manual_seed(int(seed))
        model = build(self.arch, self.hidden)
        if init is not None:
            model.load_state_dict(init)
        idx = torch.as_tensor(np.asarray(train_indices), dtype=torch.long)
        x, y = self.x[idx], self.y[idx]
        params = list(model.parameters())
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.max_iter,
            history_size=30,
            tolerance_grad=1e-9,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            value = nn.functional.cross_entropy(model(x), y) + 0.5 * self.lam * sum((p * p).sum() for p in params)
            value.backward()
            return value

        opt.step(closure)
        return model.eval()


class LmTrainer:
    """``train(train_indices, seed, init=None) -> GPT2LMHeadModel``: full-batch Adam on the mean
    causal-LM loss plus ``(lambda / 2) |theta|^2`` (a tiny GPT-2 built from a config, float64)."""

    def __init__(self, batch: dict, lam: float, steps: int):
        self.batch, self.lam, self.steps, self.last_seconds = batch, lam, steps, 0.0

    def build(self) -> nn.Module:
        import transformers

        settings: dict[str, Any] = {"attn_implementation": "eager"}  # vectorized per-sample gradients
        config = transformers.GPT2Config(
            vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0, **settings
        )
        return transformers.GPT2LMHeadModel(config).double()

    def __call__(self, train_indices, seed, init=None) -> nn.Module:
        t0 = time.perf_counter()
        torch.manual_seed(int(seed))
        model = self.build()
        if init is not None:
            model.load_state_dict(init)
        idx = torch.as_tensor(np.asarray(train_indices), dtype=torch.long)
        batch = {k: v[idx] for k, v in self.batch.items()}
        task = di.tasks.causal_lm()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=0.05)
        model.train()
        for _ in range(self.steps):
            opt.zero_grad()
            value = task.loss(model, batch) + 0.5 * self.lam * sum((p * p).sum() for p in params)
            value.backward()
            opt.step()
        self.last_seconds = time.perf_counter() - t0
        return model.eval()


def lm_problem(cfg: Config):
    """A tiny GPT-2 trained on sequences of a random Markov chain over 16 tokens (length 8):
    ``(trainer, model, task, train_batch, test_batch, test_loss)``."""
    rng = np.random.default_rng(0)
    transition = rng.dirichlet(np.full(16, 0.3), size=16)
    n = cfg.n_train + cfg.n_test
    ids = np.zeros((n, 8), dtype=np.int64)
    ids[:, 0] = rng.integers(0, 16, n)
    for t in range(1, 8):
        ids[:, t] = [rng.choice(16, p=transition[i]) for i in ids[:, t - 1]]
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(n, 8, dtype=torch.long)}
    train = {k: v[: cfg.n_train] for k, v in batch.items()}
    test = {k: v[cfg.n_train :] for k, v in batch.items()}
    trainer = LmTrainer(train, cfg.lam, cfg.lm_steps)
    model = trainer(np.arange(cfg.n_train), 0)
    task = di.tasks.causal_lm()
    with torch.no_grad():
        quality = float(task.loss(model, test))
    return trainer, model, task, train, test, quality


@dataclass
class Config:
    problems: tuple[str, ...] = ("digits-mlp", "digits-cnn")
    n_train: int = 400
    n_test: int = 40
    hidden: int = 16
    lam: float = 1e-2
    subsets: int = 50
    seeds: int = 1
    loo: int = 30
    max_iter: int = 500
    scaling_runs: int = 16
    solvers: tuple[str, ...] = SOLVERS
    index_dims: tuple[int, ...] = (32, 128, 512)  # gradient-index rows: k (capped at p)
    index_preconditioners: tuple[str, ...] = ("curvature", "fisher")
    lm_steps: int = 150  # Adam steps of each tiny-GPT-2 retraining
    extra: dict = field(default_factory=dict)


TINY = Config(
    problems=("digits-mlp",),
    n_train=60,
    n_test=8,
    hidden=6,
    subsets=6,
    loo=4,
    max_iter=100,
    scaling_runs=8,
    index_dims=(16, 64),
)


def digits(n_train: int, n_test: int, arch: str):
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))[: n_train + n_test]
    images = torch.tensor(data.images[order] / 16.0, dtype=torch.float64)
    x = images.reshape(len(order), 64) if arch == "digits-mlp" else images[:, None]
    y = torch.tensor(data.target[order], dtype=torch.long)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_solver(
    name: str, model: nn.Module, lam: float, loss: Any = None, curvature: str = "hessian"
) -> di.InfluenceModel:
    """A solver of ``name``; ``curvature="ggn"`` for a model away from a minimum (the tiny GPT-2)."""
    loss = nn.CrossEntropyLoss() if loss is None else loss
    p = sum(q.numel() for q in model.parameters())
    rank = min(30, p - 1)
    common = {"regularization": lam, "curvature": curvature}
    if name == "Direct":
        return di.DirectInfluence(model, loss, **common)
    if name == "CG":
        return di.CgInfluence(model, loss, **common)
    if name == "LiSSA":
        return di.LissaInfluence(model, loss, **common)
    if name == "Arnoldi":
        return di.ArnoldiInfluence(model, loss, rank=rank, **common)
    if name == "Nystroem":
        return di.NystroemSketchInfluence(model, loss, rank=rank, **common)
    if name == "EK-FAC":
        return di.EkfacInfluence(model, loss, regularization=lam)
    raise ValueError(name)


def run_problem(arch: str, cfg: Config, workdir: str) -> dict:
    if arch == "tiny-gpt2":
        trainer, model, loss, train, test, quality = lm_problem(cfg)
        base_seconds = trainer.last_seconds
    else:
        x, y, xt, yt = digits(cfg.n_train, cfg.n_test, arch)
        trainer = Trainer(arch, cfg.hidden, x, y, cfg.lam, cfg.max_iter)
        t0 = time.perf_counter()
        model = trainer(np.arange(cfg.n_train), 0)
        base_seconds = time.perf_counter() - t0
        with torch.no_grad():
            quality = float((model(xt).argmax(1) == yt).double().mean())
        loss, train, test = nn.CrossEntropyLoss(), (x, y), (xt, yt)
    n_train, n_test = len(next(iter(train.values())) if isinstance(train, dict) else train[0]), cfg.n_test
    out: dict = {
        "problem": arch,
        "params": sum(p.numel() for p in model.parameters()),
        "n_train": n_train,
        "n_test": n_test,
        "test_accuracy": quality,
        "training_seconds": base_seconds,
        "solvers": {},
    }
    scores = {}
    for name in cfg.solvers:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                curvature = "ggn" if arch == "tiny-gpt2" else "hessian"  # Adam stops short of a minimum there
                solver = make_solver(name, model, cfg.lam, loss, curvature).fit(train)
                scores[name] = solver.influences(test, train)
            out["solvers"][name] = {"influence_seconds": time.perf_counter() - t0}
        except Exception as exc:  # a solver that fails is reported, the others still run
            out["solvers"][name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"}
    p = out["params"]
    for k in sorted({min(k, p) for k in cfg.index_dims}):
        for preconditioner in cfg.index_preconditioners:
            name = f"Index k={k} ({preconditioner})"
            t0 = time.perf_counter()
            try:
                index = di.GradientIndex.build(
                    model, loss, train, os.path.join(workdir, f"{arch}-{k}-{preconditioner}.zarr"),
                    projection_dim=k, preconditioner=preconditioner, regularization=cfg.lam, dtype="float32",
                    overwrite=True, client="sync",
                )  # fmt: skip
                scores[name] = torch.from_numpy(index.influences(test))
                out["solvers"][name] = {"influence_seconds": time.perf_counter() - t0}
            except Exception as exc:
                out["solvers"][name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"}
    store = os.path.join(workdir, f"{arch}-evaluation.zarr")
    points = di.evaluate.random_points(n_train, cfg.loo, seed=0)
    common = {"retrain": trainer, "test": test, "task": loss, "model": model, "store": store, "client": False}
    for name, s in scores.items():
        row = out["solvers"][name]
        t0 = time.perf_counter()
        r = di.evaluate.lds(s, n_subsets=cfg.subsets, seeds=cfg.seeds, **common)
        lds_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        left_out = di.evaluate.loo(s, points=points, warm_start=True, **common)
        loo_seconds = time.perf_counter() - t0
        row.update(
            lds=r.mean,
            lds_interval=list(r.interval),
            loo_pearson=left_out.pearson,
            loo_pearson_per_test=float(np.nanmean(left_out.per_test)),
        )
        if r.retrained:  # the first solver retrains; the others find every run recorded
            out["lds_runs"], out["lds_seconds_per_run"] = r.retrained, lds_seconds / r.retrained
        if left_out.retrained:
            out["loo_runs"], out["loo_seconds_per_run"] = left_out.retrained, loo_seconds / left_out.retrained
    if "Direct" in scores and cfg.scaling_runs:
        out["scaling"] = scaling(scores["Direct"], trainer, test, loss, cfg)
    return out


def scaling(scores, trainer, test, loss, cfg: Config) -> dict:
    """The same ``cfg.scaling_runs`` LDS retrainings on 1 and on 2 worker processes (start-up not counted)."""
    from distributed import Client, LocalCluster

    seconds = {}
    for workers in (1, 2):
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(_warm_up, trainer)  # imports, lazy set-up, one thread per worker: before the clock
            t0 = time.perf_counter()
            r = di.evaluate.lds(
                scores, retrain=trainer, test=test, task=loss, n_subsets=cfg.scaling_runs, seed=99, client=client
            )
            seconds[workers] = time.perf_counter() - t0
            assert r.retrained == cfg.scaling_runs
    return {
        "runs": cfg.scaling_runs,
        "seconds_1": seconds[1],
        "seconds_2": seconds[2],
        "speedup": seconds[1] / seconds[2],
    }


def _warm_up(trainer: Trainer) -> None:
    """On a worker: one torch thread, and one small retraining (imports and lazy set-up of torch)."""
    import dask_influence.evaluate  # noqa: F401

    torch.set_num_threads(1)
    trainer(np.arange(10), 0)


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; torch {report['torch']}.", ""]
    for res in report["problems"]:
        lines += [
            f"### {res['problem']}: {res['params']:,} parameters, n_train = {res['n_train']}, "
            f"n_test = {res['n_test']}, "
            + (
                f"test loss {res['test_accuracy']:.3f}"
                if res["problem"] == "tiny-gpt2"
                else f"test accuracy {res['test_accuracy']:.3f}"
            ),
            "",
            f"LDS over {report['config']['subsets']} subsets of 0.5 x {report['config']['seeds']} seed(s); "
            f"LOO over {report['config']['loo']} left-out points (warm start).",
            "",
            "| solver | LDS mean | LDS 95% interval | LOO Pearson | LOO Pearson per test point | influences (s) |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for name, row in res["solvers"].items():
            if "error" in row:
                lines.append(f"| {name} | - | - | - | - | {row['error']} |")
                continue
            lo, hi = row["lds_interval"]
            lines.append(
                f"| {name} | {row['lds']:.3f} | [{lo:.3f}, {hi:.3f}] | {row['loo_pearson']:.3f} | "
                f"{row['loo_pearson_per_test']:.3f} | {row['influence_seconds']:.2f} |"
            )
        lines.append("")
        cost = [f"training on all points {res['training_seconds']:.2f} s"]
        if "lds_seconds_per_run" in res:
            cost.append(f"LDS retraining {res['lds_seconds_per_run']:.2f} s/run ({res['lds_runs']} runs)")
        if "loo_seconds_per_run" in res:
            cost.append(f"LOO retraining (warm start) {res['loo_seconds_per_run']:.2f} s/run ({res['loo_runs']} runs)")
        lines.append("Retraining cost: " + "; ".join(cost) + ".")
        if "scaling" in res:
            s = res["scaling"]
            lines.append(
                f"Cluster: {s['runs']} retrainings in {s['seconds_1']:.2f} s on 1 worker, {s['seconds_2']:.2f} s on 2 "
                f"workers: speed-up {s['speedup']:.2f}x."
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="A smoke run: tiny problem, few retrainings.")
    parser.add_argument("--problems", default=None, help="Comma-separated: digits-mlp, digits-cnn, tiny-gpt2.")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--subsets", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--loo", type=int, default=None)
    parser.add_argument("--scaling-runs", type=int, default=None, help="Retrainings timed on 1 vs 2 workers (0: skip).")
    parser.add_argument("--solvers", default=None, help="Comma-separated subset of " + ", ".join(SOLVERS))
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    cfg = TINY if args.tiny else Config()
    for key in ("n_train", "n_test", "subsets", "seeds", "loo", "scaling_runs"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    if args.problems:
        cfg.problems = tuple(p.strip() for p in args.problems.split(","))
    if args.solvers:
        cfg.solvers = tuple(s.strip() for s in args.solvers.split(","))
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        problems = [run_problem(arch, cfg, workdir) for arch in cfg.problems]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "config": {"subsets": cfg.subsets, "seeds": cfg.seeds, "loo": cfg.loo, "n_train": cfg.n_train},
        "problems": problems,
        "wall_seconds": time.perf_counter() - start,
    }
    print(markdown(report))
    print(f"Total {report['wall_seconds']:.1f} s.")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
