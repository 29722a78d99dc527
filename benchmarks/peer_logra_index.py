"""LoGra (LogIX, ``logix-ai`` 0.1.1) as a gradient index, for :mod:`benchmarks.index_peers`: run in
its own environment, where dask-influence is not installed.

    python3.11 -m venv benchmarks/.venv-logix
    benchmarks/.venv-logix/bin/python -m pip install --ignore-requires-python -c constraints/cpu.txt \\
        torch numpy==2.4.6 logix-ai==0.1.1 transformers==5.25.0
    benchmarks/.venv-logix/bin/python -m benchmarks.peer_logra_index SPEC.json

(``logix-ai`` 0.1.1 declares ``Requires-Python <3.11``, and pip finds no version for 3.11
without ``--ignore-requires-python``; this machine's torch is a local 3.11 wheel. It imports
and runs on 3.11. ``numpy==2.4.6``: without the pin pip picks numpy 2.5.5, which needs Python
3.12 to build. ``SPEC.json``: see :mod:`benchmarks.peer_problems_index`.)

LogIX's LoGra: ``LogIX.add_lora()`` puts a rank-``r`` bottleneck (encoder ``A``, zero
bottleneck ``B``, decoder ``C``, random init, so the model's function is unchanged) beside
each watched linear layer; the per-sample gradient of ``B`` is the layer's gradient
projected on both sides, ``r^2`` numbers per layer (``r`` capped at the layer's smaller
width, so ``k = sum_l min(r, in_l, out_l)^2``: the ``r`` nearest each asked ``k`` is used and
the row reports the ``k`` it gave). The build logs those projected gradients to disk and
their per-layer covariance (``setup({"grad": ["log", "covariance"]})``); the query logs the
test gradients and calls ``compute_influence_all(test_log, loader, hessian="raw")``: each
layer's ``(C_l + d_l I)^-1`` applied to the test gradient, dotted with every logged training
gradient. The damping ``d_l`` is LogIX's default, ``0.1 x`` the mean eigenvalue of each
layer's covariance: its random ``A`` and ``C`` do not preserve norms (Kaiming-uniform
entries), so our ``lambda`` has no fixed counterpart in its projected space. Biases are not
projected (LoRA covers weights only).

LogIX watches ``nn.Linear``/``Conv1d``/``Conv2d`` only; GPT-2's MLP projections are
Hugging Face ``Conv1D`` layers (``x W + b``, ``W`` stored ``(in, out)``), so the driver
replaces each with the ``nn.Linear`` holding ``W^T`` and ``b`` (the same function and
parameters) before LogIX watches them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from .peer_problems_index import PeerProblem, disk_bytes, load, per_sample_loss, run_ks, write


def as_linear(model: nn.Module) -> list[str]:
    """Replace the GPT-2 MLP projections (HF ``Conv1D``) by equal ``nn.Linear`` layers;
    returns their names."""
    names = []
    for block_name, block in model.transformer.h.named_children():
        for attr in ("c_fc", "c_proj"):
            conv = getattr(block.mlp, attr)
            fan_in, fan_out = conv.weight.shape
            linear = nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.T)
                linear.bias.copy_(conv.bias)
            setattr(block.mlp, attr, linear)
            names.append(f"transformer.h.{block_name}.mlp.{attr}")
    return names


def rank_for(k: int, shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """The LoRA rank whose ``sum min(r, in, out)^2`` is nearest ``k``, and that sum."""
    best = min(range(1, 1 + max(min(s) for s in shapes)), key=lambda r: abs(sum(min(r, *s) ** 2 for s in shapes) - k))
    return best, sum(min(best, *s) ** 2 for s in shapes)


def batches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def take(data: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    return {key: value[idx] for key, value in data.items()}


def one_k(problem: PeerProblem, k: int, root: Path) -> dict:
    from logix import LogIX

    model = load_model(problem)
    names = as_linear(model) if problem.name == "gpt2" else None
    layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (names is None or n in names)]
    rank, k_got = rank_for(k, [(m.in_features, m.out_features) for m in layers])
    config = root / "logix.yaml"
    config.write_text(yaml.safe_dump({"root_dir": str(root), "lora": {"init": "random", "rank": rank}}))
    torch.manual_seed(0)
    start = time.perf_counter()
    run = LogIX(project="train", config=str(config))
    run.watch(model, name_filter=names)
    run.add_lora()
    run.setup({"grad": ["log", "covariance"]})
    run.save(True)
    for idx in batches(problem.n_train, 64):
        batch = take(problem.train, idx)
        with run(data_id=[str(i) for i in idx], mask=batch.get("attention_mask")):
            model.zero_grad()
            per_sample_loss(problem, model, batch).sum().backward()
    run.finalize()
    build = time.perf_counter() - start
    start = time.perf_counter()
    run.setup({"grad": ["log"]})
    run.eval()
    loader = run.build_log_dataloader(batch_size=256)
    test = problem.test
    n_test = len(next(iter(test.values())))
    with run(data_id=[f"test-{i}" for i in range(n_test)], mask=test.get("attention_mask")):
        model.zero_grad()
        per_sample_loss(problem, model, test).sum().backward()
    result = run.compute_influence_all(run.get_log(), loader, hessian="raw")
    scores = np.empty((n_test, problem.n_train))
    scores[:, [int(i) for i in result["tgt_ids"]]] = result["influence"].numpy()  # the log's order -> ours
    query = time.perf_counter() - start
    return {
        "k": k_got,
        "k_asked": k,
        "rank": rank,
        "build_s": build,
        "query_s": query,
        "bytes": disk_bytes(root),
        "scores": scores,
    }


def load_model(problem: PeerProblem) -> nn.Module:
    """A fresh copy of the trained model (LogIX modifies the one it watches)."""
    import copy

    return copy.deepcopy(problem.model)


def main(spec_path: str) -> None:
    import logix

    problem = load(spec_path)
    spec = problem.spec
    rows = run_ks(problem, "logra", one_k)
    write(spec, logix.__version__, rows)


if __name__ == "__main__":
    main(sys.argv[1])
