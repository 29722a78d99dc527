"""Accuracy at scale (issue 29 item 7): sampled vs exact EK-FAC vs CG vs the gradient index against the exact
solve, on a 2-layer GPT-2 with a vocabulary of 512 (and 2,048).

    python -m benchmarks.scale_accuracy [--vocab 512 2048] [--n-train 48] [--n-test 4] [--seq-len 8]

The model: ``GPT2LMHeadModel`` (2 layers x 32, 2 heads, ``T = --seq-len``, tied ``wte``/``lm_head``), float64,
random weights trained ``--train-steps`` Adam steps on Zipf-distributed tokens (:mod:`benchmarks.scale_lm`),
the causal-LM task. The reference is the exact solve ``(GGN + lambda I)^-1 grad`` of every test sequence: CG in
float64 on the exact GGN (closed-form output products) at ``rtol = 1e-10`` (Direct's dense GGN would need
``p^2`` numbers, 2 GB at ``p = 16k``, and ``n T V`` Jacobian rows). Compared, by the Pearson correlation of all
``n_test x n_train`` influences with the reference's:

- EK-FAC (``tied="head"``) with the exact Fisher (``fisher="exact"``: the roots back-propagated; EK-FAC
  refuses it beyond ``T x V = 4,096`` outputs per sequence, recorded as refused) and the sampled Fisher
  with 1 and 16 draws; also ``tied="exclude"``;
- CG as a user runs it: float32, ``rtol = 1e-3``, at most 50 iterations;
- the gradient index: ``projection="sjlt"`` with ``k = 256`` and ``1,024``, ``preconditioner="curvature"``
  (the GGN's projection, sampled Fisher ``ggn_draws="auto"``), ``client="sync"``.

LDS (``di.evaluate``) is not run: it retrains the model on hundreds of subsets, beyond a few minutes at this
size on a 2-core machine. Writes ``benchmarks/results/scale_accuracy.json`` and ``.md``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import dask_influence as di
from benchmarks.scale_lm import make_model, make_tokens, train_a_few_steps


def pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def one_vocabulary(vocab: int, args: argparse.Namespace, log) -> dict:
    config = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": vocab, "seq_len": args.seq_len}
    model = make_model(config)
    train_ids = make_tokens(args.n_train, args.seq_len, vocab, seed=1)
    test_ids = make_tokens(args.n_test, args.seq_len, vocab, seed=2)
    train_a_few_steps(model, train_ids, args.train_steps)
    model = model.double()
    p = sum(t.numel() for t in model.parameters())
    task = di.tasks.causal_lm()
    train = {"input_ids": torch.as_tensor(train_ids)}
    test = {"input_ids": torch.as_tensor(test_ids)}
    lam = args.regularization
    rows = []

    def add(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = np.asarray(fn(), dtype=np.float64)
        except ValueError as error:  # a one-line refusal (e.g. EK-FAC's exact roots of a large output)
            rows.append({"method": name, "refused": str(error).split(". ")[0] + "."})
            log(f"  V={vocab:,} {name}: refused: {rows[-1]['refused']}")
            return
        seconds = time.perf_counter() - start
        rows.append({"method": name, "pearson": round(pearson(scores, reference), 4), "seconds": round(seconds, 1)})
        log(f"  V={vocab:,} {name}: Pearson {rows[-1]['pearson']:.4f} ({seconds:.1f} s)")

    start = time.perf_counter()
    exact = di.CgInfluence(model, task, regularization=lam, curvature="ggn", rtol=1e-10, maxiter=args.reference_maxiter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = exact.fit(train).influences(test, train).numpy()
    unconverged = [str(w.message) for w in caught if "converge" in str(w.message).lower()]
    log(f"V={vocab:,}: p={p:,}; reference CG float64 rtol 1e-10 in {time.perf_counter() - start:.1f} s")
    roots = (args.seq_len - 1) * vocab

    def ekfac(**kw):
        return lambda: (
            di.EkfacInfluence(model, task, regularization=lam, chunk_size=8, **kw).fit(train).influences(test, train)
        )

    add("EK-FAC exact Fisher (tied=head)", ekfac(tied="head", fisher="exact"))
    add("EK-FAC sampled, 1 draw (tied=head)", ekfac(tied="head", fisher="sampled", fisher_draws=1))
    add("EK-FAC sampled, 16 draws (tied=head)", ekfac(tied="head", fisher="sampled", fisher_draws=16))
    add("EK-FAC sampled, 16 draws (tied=exclude)", ekfac(tied="exclude", fisher="sampled", fisher_draws=16))
    model32 = make_model(config)
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    add(
        "CG float32, rtol 1e-3, <= 50 iterations",
        lambda: (
            di.CgInfluence(model32, task, regularization=lam, curvature="ggn", rtol=1e-3, maxiter=50)
            .fit(train)
            .influences(test, train)
        ),
    )
    for k in (256, 1024):

        def index(k=k):
            with tempfile.TemporaryDirectory() as tmp:
                built = di.GradientIndex.build(
                    model32,
                    task,
                    {"input_ids": train_ids},
                    Path(tmp) / "index",
                    projection_dim=k,
                    projection="sjlt",
                    preconditioner="curvature",
                    regularization=lam,
                    client="sync",
                    progress=False,
                )
                return built.influences({"input_ids": test_ids}, progress=False)

        add(f"index sjlt k={k}, GGN preconditioner", index)
    return {
        "vocab_size": vocab,
        "num_params": p,
        "exact_roots_per_sequence": roots,
        "reference_unconverged": unconverged,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-test", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--regularization", type=float, default=0.01)
    parser.add_argument("--reference-maxiter", type=int, default=2000)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    results = [one_vocabulary(v, args, lambda line: print(line, flush=True)) for v in args.vocab]
    lines = [
        f"2-layer GPT-2 (n_embd 32, tied wte/lm_head), {args.n_train} training x {args.n_test} test sequences of "
        f"{args.seq_len} tokens, lambda = {args.regularization}; Pearson of all influences against CG float64 "
        "rtol 1e-10 (the exact GGN solve)",
        "",
        "| method | " + " | ".join(f"V = {r['vocab_size']:,} (p = {r['num_params']:,})" for r in results) + " |",
        "| --- |" + " --- |" * len(results),
    ]
    methods = list(dict.fromkeys(row["method"] for r in results for row in r["rows"]))
    for m in methods:
        cells = []
        for r in results:
            found = [row for row in r["rows"] if row["method"] == m]
            if not found:
                cells.append("not run")
            elif "refused" in found[0]:
                cells.append("refused (exact roots: T x V > 4,096 outputs)")
            else:
                cells.append(f"{found[0]['pearson']:.3f} ({found[0]['seconds']:.0f} s)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": vars(args), "results": results}
    (out / "scale_accuracy.json").write_text(json.dumps(payload, indent=1))
    (out / "scale_accuracy.md").write_text(table)
    print(table)
    return payload


if __name__ == "__main__":
    main()
