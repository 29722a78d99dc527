"""The problems of :mod:`benchmarks.index_peers` rebuilt inside a peer library's own
environment (``benchmarks/.venv-<peer>``), where dask-influence is not installed: imports
only torch, numpy and (for the GPT-2) transformers. Shared by the ``peer_<name>_index.py``
drivers.

A driver is run as ``benchmarks/.venv-<peer>/bin/python -m benchmarks.peer_<name>_index
SPEC.json``. ``SPEC.json`` holds:

- ``problem``: ``"mlp"`` or ``"gpt2"``;
- ``data``: an ``.npz``; for the MLP ``x_train`` ``(n, 64)``, ``y_train`` ``(n,)``, ``x_test``,
  ``y_test``; for the GPT-2 ``input_ids_train`` ``(n, T)``, ``attention_mask_train``
  ``(n, T)``, ``input_ids_test``, ``attention_mask_test``;
- ``state``: the float32 model's ``state_dict`` (``torch.save``);
- ``hidden`` (MLP: its two hidden widths) or ``gpt2`` (``n_layer``, ``n_embd``,
  ``n_positions``, ``vocab_size``, ``n_head``);
- ``ks``, ``lam`` (our ``lambda``), ``workdir``, ``out``.

The driver writes ``out``: ``{"version": ..., "rows": [...], "skipped": reason or None}``,
each row ``{"k", "build_s", "query_s", "bytes", "scores"}`` where ``scores`` names an
``.npy`` of the ``(n_test, n_train)`` influence scores (higher = more helpful, our sign).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class PeerProblem:
    """One problem rebuilt from a spec: the float32 model (eval) and its data as tensors."""

    name: str
    model: nn.Module
    train: dict[str, torch.Tensor]  # MLP: x, y; GPT-2: input_ids, attention_mask, labels
    test: dict[str, torch.Tensor]
    spec: dict[str, Any]

    @property
    def n_train(self) -> int:
        return len(next(iter(self.train.values())))


def lm_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The tokens to predict, ``-100`` where masked: our ``causal_lm`` task's convention."""
    return torch.where(mask.bool(), ids, torch.full_like(ids, -100))


def gpt2_model(config: dict[str, Any]) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=config["vocab_size"], n_positions=config["n_positions"], n_embd=config["n_embd"],
        n_layer=config["n_layer"], n_head=config["n_head"], bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def mlp_model(hidden: list[int]) -> nn.Module:
    h1, h2 = hidden
    return nn.Sequential(nn.Linear(64, h1), nn.Tanh(), nn.Linear(h1, h2), nn.Tanh(), nn.Linear(h2, 10))


def load(spec_path: str) -> PeerProblem:
    """The spec's problem: its model with the trained weights (the GPT-2's trainable
    parameters are the MLP projections only, as in :mod:`benchmarks.index_peers`)."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    data = np.load(spec["data"])
    if spec["problem"] == "mlp":
        model = mlp_model(spec["hidden"])
        train = {"x": torch.from_numpy(data["x_train"]).float(), "y": torch.from_numpy(data["y_train"]).long()}
        test = {"x": torch.from_numpy(data["x_test"]).float(), "y": torch.from_numpy(data["y_test"]).long()}
    else:
        model = gpt2_model(spec["gpt2"])
        train, test = {}, {}
        for part, out in (("train", train), ("test", test)):
            ids = torch.from_numpy(data[f"input_ids_{part}"]).long()
            mask = torch.from_numpy(data[f"attention_mask_{part}"]).long()
            out.update(input_ids=ids, attention_mask=mask, labels=lm_labels(ids, mask))
    model.load_state_dict(torch.load(spec["state"]))
    model.eval()
    if spec["problem"] == "gpt2":
        for name, param in model.named_parameters():
            param.requires_grad_(".mlp." in name)
    return PeerProblem(spec["problem"], model, train, test, spec)


def per_sample_loss(problem: PeerProblem, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(b,)`` losses: the cross-entropy of each MLP sample; each sequence's mean
    next-token cross-entropy over its predicted (unmasked) positions (our ``causal_lm``)."""
    if problem.name == "mlp":
        return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    token = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=-100)
    valid = (target != -100).to(token.dtype)
    return (token * valid).sum(1) / valid.sum(1).clamp_min(1)


def subset(problem: PeerProblem, n: int) -> PeerProblem:
    """The first ``n`` training and test samples: a driver's untimed warm-up build and query
    (first-call costs: lazy imports, kernel and projector set-up) before the timed ones, as
    ours runs warm in the benchmark's long-lived process."""
    return PeerProblem(
        problem.name, problem.model, {k: v[:n] for k, v in problem.train.items()},
        {k: v[:n] for k, v in problem.test.items()}, problem.spec,
    )  # fmt: skip


WARM = 64  # samples of the warm-up


def disk_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under ``path``, except those under a folder named in ``skip``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not set(skip) & set(f.parts))


def write(spec: dict[str, Any], version: str, rows: list[dict], skipped: str | None = None) -> None:
    Path(spec["out"]).write_text(json.dumps({"version": version, "rows": rows, "skipped": skipped}))


def save_scores(spec: dict[str, Any], tag: str, k: int, scores: np.ndarray) -> str:
    """Save the ``(n_test, n_train)`` scores next to ``out``; returns the path."""
    out = Path(spec["out"]).with_name(f"{tag}-scores-{k}.npy")
    np.save(out, np.asarray(scores, dtype=np.float64))
    return str(out)


def run_ks(problem: PeerProblem, tag: str, one_k: Any, *, make_dir: bool = True) -> list[dict]:
    """A peer's timed rows, one per ``k`` of the spec, after an untimed warm-up on :data:`WARM`
    samples: ``one_k(data, k, root)`` builds and queries in a fresh folder ``root`` (removed
    after) and returns its row with ``scores``, which are saved beside ``out`` (:func:`save_scores`)."""
    import shutil

    spec = problem.spec
    rows = []
    runs = [(spec["ks"][0], subset(problem, WARM), False)] + [(k, problem, True) for k in spec["ks"]]
    for k, data, timed in runs:
        root = Path(spec["workdir"]) / f"{tag}-{k}"
        shutil.rmtree(root, ignore_errors=True)
        if make_dir:
            root.mkdir(parents=True)
        row = one_k(data, k, root)
        shutil.rmtree(root, ignore_errors=True)
        if timed:
            row["scores"] = save_scores(spec, tag, k, np.asarray(row["scores"], dtype=np.float64))
            rows.append(row)
    return rows
