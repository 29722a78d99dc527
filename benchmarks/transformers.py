"""Transformers: per-sample gradient throughput and end-to-end time on GPT-2 models built
from a config (nothing downloaded), against the lower bound, and the attention backend's cost.

    python -m benchmarks.transformers [--repeats 3] [--out benchmarks/results/transformers.json]
    python -m benchmarks.transformers --tiny          # a seconds-long smoke run (the tests use it)

Models: ``tiny`` (GPT-2, 1 layer, 16 dims, vocabulary 16, T = 8: 3,696 parameters) and
``1e6`` (4 layers, 128 dims, vocabulary 1,000, T = 32: about 0.93M parameters), float32,
random weights, the causal-LM task (``di.tasks.causal_lm()``), dict batches with an
attention mask. Measured, in one run, the fastest of ``--repeats`` (read ratios; this
machine is small and shared):

- **per-sample gradients** ``(n, p)`` of the library (``solver.per_sample_grads``) with
  Hugging Face's SDPA attention (vmap refuses its mask check, so one sample at a time) and
  with ``attn_implementation="eager"`` (vmapped), against the lower bound: ONE forward and
  backward of the batch's mean loss (what any per-sample method must at least do);
- **the attention backend**: a forward and backward of the batch on SDPA's math backend
  (what every curvature pass uses) against the default fused kernel;
- **end to end**: fit + factors + scoring of ``n_test x n_train`` influences for CG
  (GGN, ``rtol=1e-4``) and EK-FAC, against the lower bound of scoring (per-sample gradients
  of train and test points plus one product).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import dask_influence as di

SIZES = {
    "tiny": {"vocab_size": 16, "n_positions": 8, "n_embd": 16, "n_layer": 1, "n_head": 2},
    "1e6": {"vocab_size": 1000, "n_positions": 32, "n_embd": 128, "n_layer": 4, "n_head": 4},
}


def make(size: str, attention: str, n: int, seed: int = 0):
    """The model (eval, float32) and ``n`` sequences as a dict batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = SIZES[size]
    torch.manual_seed(seed)
    config = GPT2Config(**cfg, bos_token_id=0, eos_token_id=0, attn_implementation=attention)
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg["vocab_size"], (n, cfg["n_positions"]), generator=g)
    mask = torch.ones_like(ids)
    mask[::5, -2:] = 0  # some padded sequences
    return model, {"input_ids": ids, "attention_mask": mask}


def best(fn, repeats: int, label: str = "") -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if label:
        print(f"  {label}: {min(times):.3f} s", flush=True)
    return min(times)


def batch_backward(model, batch, task) -> None:
    """The lower bound of per-sample gradients: one forward and backward of the mean loss."""
    model.zero_grad(set_to_none=True)
    task.loss(model, batch).backward()


def measure(size: str, n_train: int, n_test: int, repeats: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    task = di.tasks.causal_lm()
    out: dict = {"size": size, "n_train": n_train, "n_test": n_test}
    model, train = make(size, "sdpa", n_train)
    test = {k: v[:n_test] for k, v in train.items()}
    out["params"] = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cg = di.CgInfluence(model, task, regularization=0.1, curvature="ggn", rtol=1e-4, maxiter=200)
    print(f"GPT-2 {size}: {out['params']:,} parameters, {n_train} x {n_test}", flush=True)
    lower = best(lambda: batch_backward(model, train, task), repeats, "batch forward+backward (bound)")
    out["grads_lower_bound_s"] = lower
    sliver = {k: v[:2] for k, v in train.items()}
    cg.fit(sliver)  # fitted on a sliver: per_sample_grads needs a fit
    out["grads_sdpa_s"] = best(lambda: cg.per_sample_grads(train), repeats, "per-sample grads, SDPA")
    eager_model, _ = make(size, "eager", n_train)
    eager = di.CgInfluence(eager_model, task, regularization=0.1, curvature="ggn").fit(
        {k: v[:2] for k, v in train.items()}
    )
    out["grads_eager_s"] = best(lambda: eager.per_sample_grads(train), repeats, "per-sample grads, eager")

    def math_backward() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            batch_backward(model, train, task)

    out["attention_fused_s"] = lower
    out["attention_math_s"] = best(math_backward, repeats, "batch forward+backward, math attention")

    def scoring_bound() -> None:
        g_train = eager.per_sample_grads(train)
        g_test = eager.per_sample_grads(test)
        g_test @ g_train.T

    out["scoring_lower_bound_s"] = best(scoring_bound, repeats, "scoring bound")
    solvers = [("cg", lambda m: di.CgInfluence(m, task, regularization=0.1, curvature="ggn", rtol=1e-4, maxiter=100))]
    if out["params"] < 100_000:  # EK-FAC's exact output Fisher of a causal LM: T * V backward passes
        solvers.append(("ekfac", lambda m: di.EkfacInfluence(m, task, regularization=0.1)))
    for name, build in solvers:
        for attention, m in (("sdpa", model), ("eager", eager_model)):

            def end_to_end(build=build, m=m) -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    solver = build(m)
                    solver.fit(train)
                    solver.influences(test, train)

            out[f"{name}_{attention}_end_to_end_s"] = best(end_to_end, repeats, f"{name} end to end, {attention}")
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | n_train x n_test | per-sample grads: SDPA (loop) / eager (vmap) / bound | "
        "math attention / fused | CG end to end (SDPA / eager) | EK-FAC end to end (SDPA / eager) | scoring bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["grads_lower_bound_s"]
        lines.append(
            f"| GPT-2 {r['size']} | {r['params']:,} | {r['n_train']} x {r['n_test']} | "
            f"{r['grads_sdpa_s']:.2f} s ({r['grads_sdpa_s'] / b:.0f}x) / {r['grads_eager_s']:.2f} s "
            f"({r['grads_eager_s'] / b:.1f}x) / {b:.3f} s | "
            f"{r['attention_math_s'] / r['attention_fused_s']:.2f}x | "
            f"{r['cg_sdpa_end_to_end_s']:.1f} / {r['cg_eager_end_to_end_s']:.1f} s | "
            + (
                f"{r['ekfac_sdpa_end_to_end_s']:.1f} / {r['ekfac_eager_end_to_end_s']:.1f} s | "
                if "ekfac_sdpa_end_to_end_s" in r
                else "n/a (T x V output columns) | "
            )
            + f"{r['scoring_lower_bound_s']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny model only, few points (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    plan = [("tiny", 16, 4)] if args.tiny else [("tiny", 256, 16), ("1e6", 32, 4)]
    rows = [measure(size, n_train, n_test, 1 if args.tiny else args.repeats) for size, n_train, n_test in plan]
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
