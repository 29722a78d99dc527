"""Large output spaces (issue 29 item 1): GGN-vector products with the closed form of the softmax
cross-entropy Hessian, and EK-FAC's sampled Fisher, against dense references on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev

import dask_influence as di
from cases import TinyLm
from dask_influence import tasks as tasks_module
from dask_influence.core.gradients import ModelFunctions
from dask_influence.core.sampled_fisher import generator_for, softmax_sampled_roots
from dask_influence.core.solvers.ekfac import EkfacInfluence
from dask_influence.core.task import as_task

DT = torch.float64


def lm_batch(n: int, length: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, -2:] = 0  # padding
    labels = ids.clone()
    labels[2, :3] = -100  # a prompt left out of the loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def dense_ggn(functions: ModelFunctions, theta: torch.Tensor, batch) -> torch.Tensor:
    """``J^T H_out J`` of the batch's mean loss: ``J`` by jacrev, ``H_out`` by autograd's hessian."""
    task = functions.task
    outputs = functions.outputs(theta, batch).detach()
    jac = jacrev(lambda t: functions.outputs(t, batch))(theta).reshape(outputs.numel(), -1)  # (c, p)
    h = hessian(lambda o: task.output_loss(o.reshape(outputs.shape), batch))(outputs.reshape(-1))
    return jac.T @ h @ jac


class CountingLmLoss(tasks_module._LmLoss):
    """The causal-LM output loss, counting its evaluations (its closed-form methods are inherited)."""

    calls = 0

    def __call__(self, logits, batch):
        CountingLmLoss.calls += 1
        return super().__call__(logits, batch)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- GGN-vector products: the closed form of H_out -----------------------------------------------
def test_causal_lm_ggn_products_use_the_closed_form_and_equal_the_dense_ggn():
    model = TinyLm(vocab=7).to(DT)
    task = tasks_module.causal_lm()
    task = di.Task(loss=task.loss, outputs=task.outputs, output_loss=CountingLmLoss(), name="lm")
    functions = ModelFunctions(model, task)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch = lm_batch(4, 5, 7, seed=0)
    expected = dense_ggn(functions, theta, batch)
    CountingLmLoss.calls = 0
    product = functions.ggn_matmat(theta, batch, torch.eye(theta.numel(), dtype=DT))
    assert CountingLmLoss.calls == 0  # H_out u in closed form: the loss is never differentiated
    assert _rel(product, expected) < 1e-10


@pytest.mark.parametrize("form", ["pair", "pair-ignore", "task", "regression", "pair-mse"])
def test_classification_and_regression_ggn_products_equal_the_dense_ggn(form):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).to(DT)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 3, generator=g, dtype=DT), torch.randint(0, 6, (9,), generator=g)
    if form == "pair-ignore":
        y[[1, 4]] = -100  # left out of the mean, as F.cross_entropy does
    if form in ("regression", "pair-mse"):
        y = torch.randn(9, 6, generator=g, dtype=DT)
    task = {
        "task": di.tasks.classification(),
        "regression": di.tasks.regression(),
        "pair-mse": as_task(nn.MSELoss()),
    }.get(form, as_task(nn.CrossEntropyLoss()))
    functions = ModelFunctions(model, task)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch = (x, y)
    expected = dense_ggn(functions, theta, batch)
    product = functions.ggn_matmat(theta, batch, torch.eye(theta.numel(), dtype=DT))
    assert _rel(product, expected) < 1e-10


@pytest.mark.parametrize("method", ["cg", "arnoldi", "nystroem"])
def test_product_solvers_with_ggn_on_a_causal_lm_match_direct(method):
    """CG, Arnoldi and Nystroem (at full rank) with curvature="ggn" reach Direct's dense GGN
    through the closed-form products."""
    model = TinyLm(vocab=7).to(DT)
    batch = lm_batch(6, 5, 7, seed=3)
    task = di.tasks.causal_lm()
    p = sum(t.numel() for t in model.parameters())
    direct = di.DirectInfluence(model, task, regularization=0.05, curvature="ggn").fit(batch)
    solver = {
        "cg": lambda: di.CgInfluence(model, task, regularization=0.05, curvature="ggn", rtol=1e-12, maxiter=200),
        "arnoldi": lambda: di.ArnoldiInfluence(model, task, regularization=0.05, curvature="ggn", rank=p),
        "nystroem": lambda: di.NystroemSketchInfluence(model, task, regularization=0.05, curvature="ggn", rank=p),
    }[method]().fit(batch)
    test = {k: v[:2] for k, v in lm_batch(3, 5, 7, seed=4).items()}
    assert _rel(solver.influences(test, batch), direct.influences(test, batch)) < 1e-8


# -- the sampled Fisher --------------------------------------------------------------------------
def test_sampled_softmax_roots_have_the_exact_hessian_as_expectation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, dtype=DT, generator=g)
    weight = torch.tensor([1.0, 0.5, 0.0], dtype=DT)
    roots = softmax_sampled_roots(logits, 200_000, generator_for(0, 0, logits.device), weight)  # (d, 3, 5)
    estimate = torch.einsum("dni,dnj->nij", roots, roots)
    p = torch.softmax(logits, dim=1)
    exact = weight[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    assert float((estimate - exact).abs().max()) < 5e-3  # Monte Carlo: 200,000 draws
    assert torch.equal(roots[:, 2], torch.zeros_like(roots[:, 2]))  # weight 0: nothing


def _lm_fits(draws: int, seed: int, batch, model):
    return EkfacInfluence(
        model, di.tasks.causal_lm(), regularization=0.1, fisher="sampled", fisher_draws=draws, seed=seed
    ).fit(batch)


def _fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_sampled_factors_converge_to_the_exact_ones_like_one_over_sqrt_draws():
    model = TinyLm(vocab=6).to(DT)
    batch = lm_batch(16, 5, 6, seed=5)
    exact = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, fisher="exact").fit(batch)
    g_exact = [f.g_factor for f in exact.state_.layers]
    c_exact = exact.curvature_matrix()
    draws, seeds = [4, 64, 1024], range(8)
    g_err, c_err = [], []
    for d in draws:
        ge, ce = 0.0, 0.0
        for seed in seeds:  # mean over eight seeds: one realization is noisy
            fit = _lm_fits(d, seed, batch, model)
            ge += sum(_fro(f.g_factor, e) for f, e in zip(fit.state_.layers, g_exact)) / len(g_exact) / len(seeds)
            ce += _fro(fit.curvature_matrix(), c_exact) / len(seeds)
            # A (the inputs' second moment) does not depend on the output curvature
            for f, e in zip(fit.state_.layers, exact.state_.layers):
                assert torch.allclose(f.a_factor, e.a_factor, rtol=0, atol=1e-12)
        g_err.append(ge)
        c_err.append(ce)
    # each 16x more draws: the (Frobenius) error shrinks about 4x (1/sqrt(draws)); allow 2.5x-6.5x
    for errs in (g_err, c_err):
        for a, b in zip(errs, errs[1:]):
            assert 2.5 < a / b < 6.5, errs
    slope = math.log(g_err[-1] / g_err[0]) / math.log(draws[-1] / draws[0])
    assert -0.65 < slope < -0.35, (g_err, slope)


@pytest.mark.slow
def test_auto_samples_where_the_exact_roots_cost_more_than_the_budget():
    # (T, V) = (80, 64): 5,120 exact roots per sequence, beyond EXACT_ROOTS_BUDGET = 256
    big = lm_batch(3, 80, 64, seed=6)
    model = TinyLm(vocab=64).to(DT)
    auto = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1).fit(big)
    sampled = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, fisher="sampled").fit(big)
    for a, b in zip(auto.state_.layers, sampled.state_.layers):
        assert torch.equal(a.corrected, b.corrected)
    with pytest.raises(ValueError, match=r"5,120 entries per sample.*fisher='sampled'"):
        EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, fisher="exact").fit(big)
    # (T, V) = (5, 6): 30 roots, within the budget: exact, as fisher="exact"
    small = lm_batch(4, 5, 6, seed=7)
    model = TinyLm(vocab=6).to(DT)
    auto = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1).fit(small)
    exact = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, fisher="exact").fit(small)
    for a, b in zip(auto.state_.layers, exact.state_.layers):
        assert torch.equal(a.corrected, b.corrected)


def test_sampled_classification_fisher_converges_and_is_checked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g, dtype=DT), torch.randint(0, 5, (40,), generator=g)
    exact = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    sampled = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, fisher="sampled", fisher_draws=4000)
    sampled.fit((x, y))
    assert _rel(sampled.curvature_matrix(), exact.curvature_matrix()) < 0.05
    with pytest.raises(ValueError, match=r"sampled Fisher assumes .*diag\(p\) - p p\^T.*differs"):
        wrong = EkfacInfluence(
            model, lambda o, t: F.cross_entropy(2 * o, t), output_curvature="classification", fisher="sampled"
        )
        wrong.fit((x, y))
    with pytest.raises(ValueError, match=r"fisher='sampled' draws labels.*has none\. Use fisher='exact'"):
        EkfacInfluence(model, lambda o, t: F.cross_entropy(o, t), fisher="sampled").fit((x, y))


def test_sampled_draws_do_not_depend_on_the_chunking():
    model = TinyLm(vocab=6).to(DT)
    batch = lm_batch(10, 5, 6, seed=8)
    fits = [
        EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, fisher="sampled", chunk_size=c).fit(batch)
        for c in (3, 256)
    ]
    for a, b in zip(fits[0].state_.layers, fits[1].state_.layers):
        for u, v in ((a.g_factor, b.g_factor), (a.corrected, b.corrected)):
            assert float((u - v).abs().max()) < 1e-12 * float(v.abs().max())
    other = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, fisher="sampled", seed=1).fit(batch)
    assert _rel(other.state_.layers[-1].g_factor, fits[1].state_.layers[-1].g_factor) > 1e-3  # the seed matters
