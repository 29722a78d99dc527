"""TRAK (``traker``) as a gradient index, for :mod:`benchmarks.index_peers`: run in its own
environment (``benchmarks/.venv-trak``, see docs/benchmarks.md), where dask-influence is not
installed; imports only torch, numpy and ``trak``.

    python3.11 -m venv benchmarks/.venv-trak
    benchmarks/.venv-trak/bin/python -m pip install -c constraints/cpu.txt torch traker==0.3.2
    benchmarks/.venv-trak/bin/python -m benchmarks.peer_trak_index SPEC.json

(The GPT-2 is not mapped: the answer says ``skipped``.)

``SPEC.json``: ``data`` (an ``.npz`` of ``x_train``, ``y_train``, ``x_test``, ``y_test``),
``state`` (the MLP's ``state_dict``), ``hidden`` (its two hidden widths), ``ks``, ``lam``
(our ``lambda``), ``workdir``, ``out`` (where the answer goes: JSON, one ``.npy`` of scores
per ``k``).

Mapped onto our convention: the model output is each sample's cross-entropy loss (so TRAK's
features are the projected loss gradients, as ours) and the out-to-loss term is 1. TRAK's
features are ``R g / sqrt(p)`` with Rademacher entries +-1 (``E[R^T R / p] = (k / p) I``,
where ours has ``E[P^T P] = I``), so its ``(Phi^T Phi + lambda_reg I)^-1`` with
``lambda_reg = n (k / p) lambda`` is our
``(Phi^T Phi / n + lambda I)^-1`` up to a constant: the empirical-Fisher index at the same
``lambda`` (TRAK also rescales its inverse by a constant: Pearson does not see either). The CPU projector
(``BasicProjector``, Rademacher) and float32 throughout.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _mlp(hidden: list[int]) -> nn.Module:
    h1, h2 = hidden
    return nn.Sequential(nn.Linear(64, h1), nn.Tanh(), nn.Linear(h1, h2), nn.Tanh(), nn.Linear(h2, 10))


def main(spec_path: str) -> None:
    import trak
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class LossOutput(AbstractModelOutput):
        """The per-sample cross-entropy loss as the model output; out-to-loss 1."""

        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, x, y):  # type: ignore[no-untyped-def]
            logits = torch.func.functional_call(model, (weights, buffers), x.unsqueeze(0))
            return nn.functional.cross_entropy(logits, y.unsqueeze(0))

        def get_out_to_loss_grad(self, model, weights, buffers, batch):  # type: ignore[no-untyped-def]
            return torch.ones(batch[0].shape[0], 1)

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    if spec.get("problem", "mlp") != "mlp":
        reason = "the driver maps TRAK onto the MLP only (its model output is one loss per sample of (x, y) tensors)"
        Path(spec["out"]).write_text(json.dumps({"version": trak.__version__, "rows": [], "skipped": reason}))
        return
    data = np.load(spec["data"])
    x, y = torch.from_numpy(data["x_train"]).float(), torch.from_numpy(data["y_train"])
    xt, yt = torch.from_numpy(data["x_test"]).float(), torch.from_numpy(data["y_test"])
    model = _mlp(spec["hidden"])
    model.load_state_dict(torch.load(spec["state"]))
    model.eval()
    p = sum(q.numel() for q in model.parameters())
    n = len(x)
    rows = []
    full = (x, y, xt, yt)
    warm = (x[:64], y[:64], xt[:64], yt[:64])  # an untimed warm-up build (first-call costs), as ours runs warm
    for k, (x, y, xt, yt), timed in [(spec["ks"][0], warm, False)] + [(k, full, True) for k in spec["ks"]]:
        n = len(x)
        save = Path(spec["workdir"]) / f"trak-{k}"
        shutil.rmtree(save, ignore_errors=True)
        start = time.perf_counter()
        # at least 2 blocks: with one, traker 0.3.2 frees its matrix after featurizing and fails to score
        blocks = min(100, max(1, k // 2))
        projector = BasicProjector(p, k, 0, ProjectionType.rademacher, "cpu", block_size=blocks, dtype=torch.float32)
        traker = TRAKer(
            model=model, task=LossOutput(), train_set_size=n, save_dir=str(save), device="cpu", projector=projector,
            proj_dim=k, use_half_precision=False, lambda_reg=n * k / p * spec["lam"], logging_level=40,
        )  # fmt: skip
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for s in range(0, n, 200):
            traker.featurize(batch=(x[s : s + 200], y[s : s + 200]), num_samples=len(x[s : s + 200]))
        traker.finalize_features()
        build = time.perf_counter() - start
        start = time.perf_counter()
        traker.start_scoring_checkpoint("q", model.state_dict(), model_id=0, num_targets=len(xt))
        traker.score(batch=(xt, yt), num_samples=len(xt))
        scores = np.asarray(traker.finalize_scores("q")).T  # (n_test, n_train)
        query = time.perf_counter() - start
        size = sum(f.stat().st_size for f in save.rglob("*") if f.is_file() and "scores" not in f.parts)
        if not timed:
            continue
        out = Path(spec["out"]).with_name(f"trak-scores-{k}.npy")
        np.save(out, scores.astype(np.float64))
        rows.append({"k": k, "build_s": build, "query_s": query, "bytes": size, "scores": str(out)})
    Path(spec["out"]).write_text(json.dumps({"version": trak.__version__, "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1])
