"""dattri-llm (TRAIS Lab, ``dattri-llm`` 0.1.0) as a gradient index, for
:mod:`benchmarks.index_peers`: run in its own environment, where dask-influence is not installed.

    python3.11 -m venv benchmarks/.venv-dattri-llm
    benchmarks/.venv-dattri-llm/bin/python -m pip install -c constraints/cpu.txt \\
        torch numpy==2.4.6 dattri-llm==0.1.0 dattri==0.3.0 transformers==5.25.0 accelerate
    benchmarks/.venv-dattri-llm/bin/python -m benchmarks.peer_dattri_index SPEC.json

(``dattri`` supplies the random projectors, ``transformers`` the live gradient streamer;
``SPEC.json``: see :mod:`benchmarks.peer_problems_index`. This is dattri's LLM-scale library;
``benchmarks/peer_dattri.py`` runs the general ``dattri`` against the exact solvers.)

Its store-then-attribute path with a projected capture: ``HookManagerConfig(linear_io=[...],
projection_kwargs={"__default__": {"style": "dense", "proj_dim": k / L, "proj_type":
"rademacher", ...}})`` materializes each of the ``L`` hooked layers' per-sample weight
gradients (weights and biases) and projects them to ``k / L`` numbers (``k`` in all);
``KFACAttributor``: such materialized layers are preconditioned by the direct dense
empirical Fisher of each layer's projected gradients (a block-diagonal projected Fisher;
``direct_fim_max_params`` raised above ``k / L``), ``damping = lambda`` (ours). Build:
``cache`` of the training set (with a one-sample test set) and ``fit`` (the persisted
Fisher factors); query: ``cache`` of the test set (with a one-sample training set) and
``attribute_from_cache(train, test, fisher_dir=..., damping=lambda)``. The loss is the sum of
the batch's per-sample losses, so each captured gradient is one sample's. dattri's CPU
projector is used (its ``sjlt`` is CUDA-only).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .peer_problems_index import PeerProblem, disk_bytes, load, per_sample_loss, run_ks, write


class Rows(Dataset):
    """Samples of a dict of tensors (``rows`` of them)."""

    def __init__(self, data: dict[str, torch.Tensor], rows: list[int] | None = None) -> None:
        self.data = data
        self.rows = rows if rows is not None else list(range(len(next(iter(data.values())))))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        return {key: value[row] for key, value in self.data.items()}


def identities(problem: str, data: dict[str, torch.Tensor]) -> list[str]:
    """dattri-llm's identity of each sample: the content hash of the tensors the model is
    called with (the MLP's positional input; the GPT-2's ``input_ids`` and
    ``attention_mask``). Unique on these data (checked: 1,600 digits, 356 sequences)."""
    from dattri_llm import hash_sample

    if problem == "mlp":
        return [hash_sample({"_arg0": x}) for x in data["x"]]
    return [
        hash_sample({"input_ids": i, "attention_mask": m}) for i, m in zip(data["input_ids"], data["attention_mask"])
    ]


def one_k(problem: PeerProblem, k: int, root: Path) -> dict:
    """Build dattri-llm's projected store and Fisher at ``k`` under ``root`` and score the
    test set: seconds, bytes and the ``(n_test, n_train)`` scores."""
    from dattri_llm import AttributionArguments, AttributionTask, HookManagerConfig, KFACAttributor

    def loss_func(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return per_sample_loss(problem, model, batch).sum()

    if problem.name == "mlp":
        layers, n_layers = [r"^0$", r"^2$", r"^4$"], 3
    else:
        layers, n_layers = [r"transformer\.h\.\d+\.mlp\.c_(fc|proj)$"], 2 * problem.spec["gpt2"]["n_layer"]
    per_layer = max(1, k // n_layers)
    config = HookManagerConfig(
        linear_io=layers,
        projection_kwargs={"__default__": {
            "style": "dense", "proj_dim": per_layer, "proj_type": "rademacher", "proj_seed": 0,
            "proj_max_batch_size": 64, "include_bias": True, "device": "cpu",
        }},
    )  # fmt: skip
    args = AttributionArguments(
        output_dir=str(root / "out"), per_device_train_batch_size=64, per_device_eval_batch_size=64, use_cpu=True
    )
    attributor = KFACAttributor(args, task=AttributionTask(loss_func=loss_func, model=problem.model))
    options = {"direct_fim_max_params": 10 * per_layer + 10, "covariances_at_capture": False}
    start = time.perf_counter()
    ((train_dir, _),) = attributor.cache(
        Rows(problem.train), Rows(problem.test, [0]), cache_dir=str(root / "build"), hook_config=config,
        covariances_at_capture=False,
    )  # fmt: skip
    fisher_dir = attributor.fit(train_dir, str(root / "fisher"), **options)
    build = time.perf_counter() - start
    start = time.perf_counter()
    ((_, test_dir),) = attributor.cache(
        Rows(problem.train, [0]), Rows(problem.test), cache_dir=str(root / "query"), hook_config=config,
        covariances_at_capture=False,
    )  # fmt: skip
    score = attributor.attribute_from_cache(
        train_dir, test_dir, fisher_dir=fisher_dir, damping=problem.spec["lam"], **options
    )
    train_ids, matrix = score.agnostic_matrix()  # (n_train, n_test), rows in the store's order
    query = time.perf_counter() - start
    where = {h: i for i, h in enumerate(train_ids)}
    test_cols = [score.test_index[h] for h in identities(problem.name, problem.test)]
    order = [where[h] for h in identities(problem.name, problem.train)]
    scores = matrix[order][:, test_cols].T.numpy()  # (n_test, n_train)
    size = disk_bytes(Path(train_dir)) + disk_bytes(Path(fisher_dir))
    return {"k": per_layer * n_layers, "build_s": build, "query_s": query, "bytes": size, "scores": scores}


def main(spec_path: str) -> None:
    import dattri_llm

    problem = load(spec_path)
    spec = problem.spec
    rows = run_ks(problem, "dattri", one_k, make_dir=False)
    write(spec, dattri_llm.__version__, rows)


if __name__ == "__main__":
    main(sys.argv[1])
