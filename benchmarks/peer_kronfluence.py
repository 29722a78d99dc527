"""Runs Kronfluence for :mod:`benchmarks.peers`, inside Kronfluence's environment.

    benchmarks/.venv-kronfluence/bin/python -m benchmarks.peer_kronfluence   (started by benchmarks.peers)

``make bench-env-kronfluence`` creates the environment (kronfluence 1.0.1). Protocol and our
score convention: :mod:`benchmarks.peer_common`. Only Kronfluence's public API is used
(``Analyzer``, ``prepare_model``, ``Task``, ``FactorArguments``, ``ScoreArguments``).

Method: ``EK-FAC`` only (Kronfluence's strategies are identity, diagonal, K-FAC and EK-FAC),
``strategy="ekfac"`` with the TRUE Fisher (``use_empirical_fisher=False``: ``compute_train_loss``
draws each label from the model's predictive distribution, Kronfluence's default and its
documented contract for ``sample=True``), every training point in the covariance and
eigenvalue passes, and ``damping_factor = lambda``. Ours takes the same Fisher exactly (in
expectation over the labels) instead of sampling it.

Conventions: the training loss is summed over the batch, so Kronfluence's per-sample gradients
are those of the per-sample losses and its covariances are means over the training points (the
Fisher of the MEAN loss); its damping is added to the eigenvalues, ``(F + lambda I)^-1``. Scores
are ``grad measurement(test)^T (F + lambda I)^-1 grad loss(train)`` with the test loss as the
measurement: ours, same sign and scale. Kronfluence tracks ``nn.Linear`` and ``nn.Conv2d``; the
GPT-2 model's ``Conv1D`` layers are converted to ``nn.Linear`` (the same numbers) as
Kronfluence's documentation asks, and its embeddings and layer norms are not tracked. Factors
and scores go through Kronfluence's files in a temporary folder, as in any use of it.
"""

from __future__ import annotations

import shutil
import tempfile

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.peer_common import Clock, Problem, is_lm, load_model, save_scores, sequence_losses, serve


def conv1d_as_linear(model: nn.Module) -> None:
    """Replace every Hugging Face ``Conv1D`` (``y = x W + b``, ``W`` is ``(in, out)``) by an equal ``nn.Linear``."""
    for name, child in list(model.named_children()):
        if type(child).__name__ == "Conv1D":
            weight = child.weight.detach()
            linear = nn.Linear(weight.shape[0], weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                linear.bias.copy_(child.bias.detach())
            setattr(model, name, linear)
        else:
            conv1d_as_linear(child)


def make_task(arch: str):
    from kronfluence.task import Task

    lm = is_lm(arch)

    class BenchTask(Task):
        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> Tensor:
            *inputs, target = batch
            out = model(*inputs)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(out.detach().double(), dim=-1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:-1])
                    if lm:  # logits at t predict the token at t + 1; keep the positions not predicted
                        drawn = torch.cat([target[:, :1], drawn[:, :-1]], dim=1)
                        drawn = drawn.masked_fill(target == -100, -100)
                target = drawn
            if lm:
                return sequence_losses(out, target).sum()
            return F.cross_entropy(out, target.long(), reduction="sum")

        def compute_measurement(self, batch, model: nn.Module) -> Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_attention_mask(self, batch):
            return batch[1] if lm else None

    return BenchTask()


class Driver:
    def load(self, msg: dict) -> dict:
        self.pb = Problem(msg)
        import kronfluence

        return {"kronfluence": kronfluence.__version__, "torch": torch.__version__}

    def run(self, msg: dict) -> dict:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        pb, method, p = self.pb, msg["method"], msg["params"]
        if method != "EK-FAC":
            raise ValueError(f"Kronfluence has no {method} method")
        model = load_model(pb.arch, pb.state_path)
        if is_lm(pb.arch):
            conv1d_as_linear(model)
        task = make_task(pb.arch)
        torch.manual_seed(0)
        out_dir = tempfile.mkdtemp(prefix="kronfluence-")
        try:
            clock = Clock()
            with clock("fit_s"):
                model = prepare_model(model, task)
                analyzer = Analyzer(
                    analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out_dir
                )
                train = TensorDataset(*pb.train_tuples())
                analyzer.fit_all_factors(
                    factors_name="ekfac",
                    dataset=train,
                    per_device_batch_size=pb.batch_size,
                    factor_args=FactorArguments(
                        strategy="ekfac",
                        use_empirical_fisher=False,
                        covariance_max_examples=None,
                        lambda_max_examples=None,
                    ),
                    overwrite_output_dir=True,
                )
            with clock("scoring_s"):
                analyzer.compute_pairwise_scores(
                    scores_name="scores",
                    factors_name="ekfac",
                    query_dataset=TensorDataset(*pb.test_tuples()),
                    train_dataset=train,
                    per_device_query_batch_size=pb.n_test,
                    per_device_train_batch_size=pb.batch_size,
                    score_args=ScoreArguments(damping_factor=p["regularization"]),
                    overwrite_output_dir=True,
                )
                scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        save_scores(msg["out"], scores)
        return {**clock.times, "factors_s": None, "normalization": "none: same sign and scale as ours"}


if __name__ == "__main__":
    serve(Driver())
