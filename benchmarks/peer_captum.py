"""Runs captum's influence functions for :mod:`benchmarks.peers`, inside captum's environment.

    benchmarks/.venv-captum/bin/python -m benchmarks.peer_captum   (started by benchmarks.peers)

``make bench-env-captum`` creates the environment (captum 0.9.0). Protocol and our score
convention: :mod:`benchmarks.peer_common`. Only captum's public API is used
(``captum.influence``; ``ArnoldiInfluenceFunction`` is exported from its ``_core`` module).

Methods and how their hyperparameters map onto ours:

- ``Arnoldi``: ``ArnoldiInfluenceFunction`` with ``projection_dim = rank`` and
  ``arnoldi_dim = krylov_dimension + 1`` (captum keeps ``arnoldi_dim - 1`` Krylov vectors),
  no early stop (``arnoldi_tol`` tiny);
- ``Direct``: ``NaiveInfluenceFunction`` (the dense Hessian, every eigenpair kept).

Conventions: captum's Hessian is that of the SUMMED training loss, ``n H``, and its
``hessian_reg`` is added to it: ``hessian_reg = n * lambda`` gives ``n (H + lambda I)``, so its
scores are ours divided by ``n`` (same sign: ``g_test^T (.)^-1 g_train``, positive = helpful).
The driver multiplies them by ``n``. Per-sample gradients use captum's batched hook trick
(``sample_wise_grads_per_batch=True``, a summed loss) where every trainable layer is a Linear
or Conv2d, else its per-sample loop (the GPT-2 model).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.peer_common import Clock, PerSampleLoss, Problem, load_model, save_scores, serve


def _no_checkpoint(model: nn.Module, path: str) -> float:
    """captum loads a checkpoint into the model first; ours already holds the trained state."""
    return 1.0


def _hook_layers_only(model: nn.Module) -> bool:
    """Whether every trainable parameter sits in a Linear or Conv2d (captum's per-batch trick)."""
    covered = {
        id(p) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d) for p in m.parameters(recurse=False)
    }
    return all(id(p) in covered for p in model.parameters() if p.requires_grad)


class Driver:
    def load(self, msg: dict) -> dict:
        self.pb = Problem(msg)
        import captum

        return {"captum": captum.__version__, "torch": torch.__version__}

    def run(self, msg: dict) -> dict:
        from captum.influence import NaiveInfluenceFunction
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        pb, method, p = self.pb, msg["method"], msg["params"]
        model = load_model(pb.arch, pb.state_path)
        n = pb.n_train
        batched = _hook_layers_only(model)
        loss = PerSampleLoss(pb.arch, "sum" if batched else "none")
        train = DataLoader(TensorDataset(*pb.train_tuples()), batch_size=pb.batch_size)
        common = dict(
            checkpoint="in-memory",
            checkpoints_load_func=_no_checkpoint,
            loss_fn=loss,
            sample_wise_grads_per_batch=batched,
            hessian_reg=n * p["regularization"],
            projection_on_cpu=True,
            show_progress=False,
        )
        clock = Clock()
        with clock("fit_s"):
            if method == "Arnoldi":
                influence = ArnoldiInfluenceFunction(
                    model,
                    train,
                    projection_dim=int(p["rank"]),
                    arnoldi_dim=int(p["krylov_dimension"]) + 1,
                    arnoldi_tol=1e-12,
                    seed=0,
                    **common,
                )
            elif method == "Direct":
                influence = NaiveInfluenceFunction(model, train, projection_dim=pb.num_params, **common)
            else:
                raise ValueError(f"captum has no {method} influence function")
        with clock("scoring_s"):
            scores = influence.influence(pb.test_tuples())
        save_scores(msg["out"], scores * n)
        return {
            **clock.times,
            "factors_s": None,
            "normalization": f"x n_train ({n}): captum's Hessian is of the summed loss, hessian_reg = n * lambda",
            "per_sample_gradients": "batched hooks" if batched else "per-sample loop",
        }


if __name__ == "__main__":
    serve(Driver())
