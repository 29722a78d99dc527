"""Runs dattri's influence functions for :mod:`benchmarks.peers`, inside dattri's environment.

    benchmarks/.venv-dattri/bin/python -m benchmarks.peer_dattri   (started by benchmarks.peers)

``make bench-env-dattri`` creates the environment (dattri 0.3.0). Protocol and our score
convention: :mod:`benchmarks.peer_common`. Only dattri's public API is used
(``dattri.task.AttributionTask``, ``dattri.algorithm.influence_function.IFAttributor*``).

dattri's loss function is ``f(params, data)`` on a batch, here the MEAN per-sample loss, so its
Hessian is ours; every attributor adds ``regularization * I`` (LiSSA: ``damping``, below). Its
scores are ``g_train^T (H + lambda I)^-1 g_test`` as ``(n_train, n_test)``: ours, transposed
(the driver transposes; no change of sign or scale).

Methods and how their hyperparameters map onto ours:

- ``Direct``: ``IFAttributorExplicit`` (the dense Hessian, inverted);
- ``CG``: ``IFAttributorCG``. dattri's CG runs exactly ``max_iter`` iterations (its ``tol``
  is documented as not supported under vmap): it gets the number of iterations our CG needed
  to reach ``rtol`` on the same problem (``params["iterations"]``);
- ``LiSSA``: ``IFAttributorLiSSA`` with ``recursion_depth = maxiter``, our ``batch_size`` and
  ``scaling = scale``; its recursion ``x <- v + (1 - d) x - H x / s`` returns ``x / s``, whose
  fixed point is ``(H + d s I)^-1 v``: ``damping = lambda / scale``. Each test gradient draws
  its own batches (dattri vmaps the recursion over them);
- ``Arnoldi``: ``IFAttributorArnoldi`` with ``proj_dim = rank`` and
  ``max_iter = krylov_dimension + 1`` (``max_iter`` counts the start vector);
- ``EK-FAC``: ``IFAttributorEKFAC`` with ``damping = lambda``. It factors ``nn.Linear``
  modules only and estimates the EMPIRICAL Fisher (the training labels), where ours takes the
  exact Fisher of the model's predictive distribution: not the same method.

The whole training set goes in one batch (dattri sums the inverse-Hessian products of the
batches of its full-training loader, and transforms the test gradients once per training
batch of ``attribute``), as dattri's own examples do; EK-FAC's statistics go batch by batch.
Hessian-vector products use ``mode="rev-fwd"`` (forward over reverse, as ours), falling back to
``"rev-rev"`` where forward mode fails.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.peer_common import Clock, Problem, load_model, save_scores, serve


class Driver:
    def __init__(self) -> None:
        self.reverse_only: set[str] = set()

    def load(self, msg: dict) -> dict:
        self.pb = Problem(msg)
        self.reverse_only.clear()
        import dattri

        return {"dattri": getattr(dattri, "__version__", "0.3.0"), "torch": torch.__version__}

    def _task(self, model: nn.Module):
        from dattri.task import AttributionTask

        loss = self.pb.loss

        def f(params, data):
            *inputs, target = data
            out = torch.func.functional_call(model, params, tuple(inputs))
            return loss(out, target).mean()

        return AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())

    def run(self, msg: dict) -> dict:
        method = msg["method"]
        if method not in ("CG", "LiSSA"):  # the attributors that take dattri's autodiff mode
            return self._run(msg, None)
        mode = "rev-rev" if method in self.reverse_only else msg["params"].get("mode", "rev-fwd")
        try:
            return self._run(msg, mode)
        except Exception as err:  # forward mode not supported here: dattri's other mode, from now on
            if mode != "rev-fwd":
                raise
            self.reverse_only.add(method)
            out = self._run(msg, "rev-rev")
            out["note"] = f"rev-fwd failed ({type(err).__name__}); rev-rev"
            return out

    def _run(self, msg: dict, mode: str | None) -> dict:
        from dattri.algorithm.influence_function import (
            IFAttributorArnoldi,
            IFAttributorCG,
            IFAttributorEKFAC,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )

        pb, method, p = self.pb, msg["method"], msg["params"]
        lam = p["regularization"]
        model = load_model(pb.arch, pb.state_path)
        task = self._task(model)
        whole = TensorDataset(*pb.train_tuples())
        train_all = DataLoader(whole, batch_size=pb.n_train)
        test_all = DataLoader(TensorDataset(*pb.test_tuples()), batch_size=pb.n_test)
        if method == "Direct":
            attributor = IFAttributorExplicit(task, regularization=lam)
        elif method == "CG":
            attributor = IFAttributorCG(task, max_iter=int(p["iterations"]), regularization=lam, mode=mode)
        elif method == "LiSSA":
            attributor = IFAttributorLiSSA(
                task,
                batch_size=int(p["batch_size"]),
                num_repeat=1,
                recursion_depth=int(p["maxiter"]),
                damping=lam / p["scale"],
                scaling=p["scale"],
                mode=mode,
            )
        elif method == "Arnoldi":
            attributor = IFAttributorArnoldi(
                task,
                proj_dim=int(p["rank"]),
                max_iter=int(p["krylov_dimension"]) + 1,
                regularization=lam,
                seed=0,
            )
        elif method == "EK-FAC":
            attributor = IFAttributorEKFAC(task, damping=lam)
        else:
            raise ValueError(f"dattri has no {method} attributor")
        clock = Clock()
        with clock("fit_s"):
            if method == "EK-FAC":
                attributor.cache(DataLoader(whole, batch_size=pb.batch_size))
            else:
                attributor.cache(train_all)
        with clock("scoring_s"), torch.no_grad():
            scores = attributor.attribute(train_all, test_all)
        save_scores(msg["out"], scores.T)
        return {
            **clock.times,
            "factors_s": None,
            **({"mode": mode} if mode else {}),
            "normalization": "transposed (dattri returns n_train x n_test); same sign and scale",
        }


if __name__ == "__main__":
    serve(Driver())
