"""TRAK (``traker``) as a gradient index, for :mod:`benchmarks.index_peers`: run in its own
environment, where dask-influence is not installed.

    python3.11 -m venv benchmarks/.venv-trak
    benchmarks/.venv-trak/bin/python -m pip install -c constraints/cpu.txt torch traker==0.3.2 \
        numpy==2.4.6 transformers==5.25.0
    benchmarks/.venv-trak/bin/python -m benchmarks.peer_trak_index SPEC.json

(``transformers`` for the GPT-2; ``SPEC.json``: see :mod:`benchmarks.peer_problems_index`.)

Mapped onto our convention: the model output is each sample's loss (the MLP's cross-entropy;
the GPT-2's mean next-token cross-entropy, as our ``causal_lm`` task; so TRAK's features are
the projected loss gradients, as ours, with ``grad_wrt`` the trainable parameters: the GPT-2's
MLP projections) and the out-to-loss term is 1. TRAK's features are ``R g / sqrt(p)`` with
Rademacher entries +-1 (``E[R^T R / p] = (k / p) I``, where ours has ``E[P^T P] = I``), so its
``(Phi^T Phi + lambda_reg I)^-1`` with ``lambda_reg = n (k / p) lambda`` is our
``(Phi^T Phi / n + lambda I)^-1`` up to a constant: the empirical-Fisher index at the same
``lambda`` (TRAK also rescales its inverse by a constant: Pearson does not see either). The CPU
projector (``BasicProjector``, Rademacher) and float32 throughout.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .peer_problems_index import disk_bytes, load, save_scores, write


def main(spec_path: str) -> None:
    import trak
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    problem = load(spec_path)
    spec = problem.spec

    class LossOutput(AbstractModelOutput):
        """The per-sample loss as the model output (out-to-loss 1): the MLP's cross-entropy of
        ``(x, y)``; the GPT-2's mean next-token cross-entropy of ``(input_ids, labels)`` over its
        predicted positions (the padding is at the end, so the causal model needs no mask)."""

        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, inputs, target):  # type: ignore[no-untyped-def]
            if problem.name == "mlp":
                logits = torch.func.functional_call(model, (weights, buffers), (inputs.unsqueeze(0),))
                return nn.functional.cross_entropy(logits, target.unsqueeze(0))
            logits = torch.func.functional_call(model, (weights, buffers), (inputs.unsqueeze(0),)).logits[0, :-1]
            labels = target[1:]
            valid = (labels != -100).to(logits.dtype)
            token = nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none")
            return (token * valid).sum() / valid.sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):  # type: ignore[no-untyped-def]
            return torch.ones(batch[0].shape[0], 1)

    model = problem.model
    names = [name for name, q in model.named_parameters() if q.requires_grad]
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    keys = ("x", "y") if problem.name == "mlp" else ("input_ids", "labels")
    full = (problem.train[keys[0]], problem.train[keys[1]], problem.test[keys[0]], problem.test[keys[1]])
    warm = tuple(t[:64] for t in full)  # an untimed warm-up build (first-call costs), as ours runs warm
    rows = []
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
            grad_wrt=names,
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
        size = disk_bytes(save, skip=("scores",))
        if timed:
            rows.append({"k": k, "build_s": build, "query_s": query, "bytes": size,
                         "scores": save_scores(spec, "trak", k, scores)})  # fmt: skip
    write(spec, trak.__version__, rows)


if __name__ == "__main__":
    main(sys.argv[1])
