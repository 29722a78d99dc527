"""Bergson as a gradient index, for :mod:`benchmarks.index_peers`: run in its own environment,
where dask-influence is not installed.

    python3.11 -m venv benchmarks/.venv-bergson
    benchmarks/.venv-bergson/bin/python -m pip install -c constraints/cpu.txt torch bergson==2.5.1
    benchmarks/.venv-bergson/bin/python -m pip uninstall -y torchvision torchaudio
    benchmarks/.venv-bergson/bin/python -m benchmarks.peer_bergson_index SPEC.json

(The ``torchvision``/``torchaudio`` wheels Bergson pulls from PyPI do not load with the local
CPU torch, ``RuntimeError: operator torchvision::nms does not exist``, and then
``transformers`` cannot import ``GPT2LMHeadModel``; Bergson's code imports neither.
``SPEC.json``: see :mod:`benchmarks.peer_problems_index`.)

Bergson's TRAK-style path (its ``trak`` command, in-process): a global Rademacher projection
of the MLP projections' per-sequence gradients to ``k`` (``projection_target="global"``, biases
included, the loss each sequence's mean next-token cross-entropy: ``loss_reduction="mean"``),
written to an on-disk index by ``collect_gradients``; the projected Gram ``Phi^T Phi / n``
(its ``JointAutocorrelationCollector``, a second pass over the data, counted in the build);
the query through ``Attributor(..., hessian_path=...)`` with ``inversion="absolute_damped_inverse"``
and ``damping_factor = lambda``: ``q^T (Phi^T Phi / n + lambda I)^-1 phi``, the empirical-Fisher
index at our ``lambda`` (Bergson's JL projection has ``E[P^T P] = I``, as ours). The test
gradients are taken by ``Attributor.trace`` around one backward pass of the test losses.

Bergson collects from a Hugging Face ``PreTrainedModel`` over a ``datasets.Dataset`` of token
ids (its forward is ``model(input_ids).logits``): the MLP on the digits has no such path, so
only the GPT-2 runs (the answer says ``skipped`` for the MLP).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .peer_problems_index import PeerProblem, disk_bytes, load, run_ks, write


def token_dataset(data: dict[str, torch.Tensor]) -> Any:
    """Bergson's input: a ``datasets.Dataset`` of token ids, labels and lengths."""
    from datasets import Dataset

    n, length = data["input_ids"].shape
    return Dataset.from_dict({
        "input_ids": data["input_ids"].tolist(), "labels": data["labels"].tolist(), "length": [length] * n,
    })  # fmt: skip


def one_k(problem: PeerProblem, k: int, root: Path) -> dict:
    """Build Bergson's index at ``k`` under ``root`` and score the test set: seconds, bytes
    and the ``(n_test, n_train)`` scores."""
    from bergson import Attributor, GradientProcessor, IndexConfig, collect_gradients
    from bergson.collector.collector import CollectorComputer
    from bergson.config import InversionConfig
    from bergson.data import column_offsets, load_gradients
    from bergson.hessians.autocorrelation import JointAutocorrelationCollector

    model = problem.model
    targets = {name for name, _ in model.transformer.named_modules() if name.endswith(("mlp.c_fc", "mlp.c_proj"))}

    def config(part: str) -> Any:
        return IndexConfig(
            run_path=str(root / part), projection_dim=k, projection_target="global", include_bias=True,
            loss_reduction="mean", projection_seed=0,
        )  # fmt: skip

    def processor() -> Any:
        return GradientProcessor(projection_dim=k, projection_target="global", include_bias=True, projection_seed=0)

    start = time.perf_counter()
    ds = token_dataset(problem.train)
    batches = blocks(len(ds), 32)
    cfg = config("index")
    collect_gradients(model, ds, processor(), cfg, batches=batches, target_modules=targets)
    index_path = cfg.partial_run_path
    hessian_path = root / "hessian"
    collector = JointAutocorrelationCollector(
        model=model.base_model, data=ds, path=str(hessian_path), processor=processor(), target_modules=targets,
        attention_cfgs={},
    )  # fmt: skip
    CollectorComputer(model=model, data=ds, collector=collector, batches=batches, cfg=cfg).run_with_collector_hooks()
    build = time.perf_counter() - start
    start = time.perf_counter()
    attributor = Attributor(
        index_path, device="cpu", hessian_path=hessian_path,
        inversion_cfg=InversionConfig(inversion="absolute_damped_inverse", damping_factor=problem.spec["lam"]),
    )  # fmt: skip
    test_ds = token_dataset(problem.test)
    query_cfg = config("query")
    collect_gradients(
        model, test_ds, GradientProcessor.load(index_path), query_cfg, batches=blocks(len(test_ds), 32),
        target_modules=targets,
    )  # fmt: skip
    flat = load_gradients(query_cfg.partial_run_path)
    sizes = json.loads((query_cfg.partial_run_path / "info.json").read_text())["grad_sizes"]
    queries = {name: torch.from_numpy(np.array(flat[:, lo:hi])) for name, (lo, hi) in column_offsets(sizes).items()}
    top, order = attributor.search(queries, k=None)
    scores = torch.empty_like(top).scatter_(1, order, top)
    query = time.perf_counter() - start
    size = disk_bytes(index_path) + disk_bytes(hessian_path)
    return {"k": k, "build_s": build, "query_s": query, "bytes": size, "scores": scores.numpy()}


def blocks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def main(spec_path: str) -> None:
    import bergson

    problem = load(spec_path)
    spec = problem.spec
    if problem.name != "gpt2":
        reason = "Bergson collects from a Hugging Face PreTrainedModel over token ids; no path for an MLP on features"
        write(spec, bergson.__version__, [], skipped=reason)
        return
    rows = run_ks(problem, "bergson", one_k)
    write(spec, bergson.__version__, rows)


if __name__ == "__main__":
    main(sys.argv[1])
