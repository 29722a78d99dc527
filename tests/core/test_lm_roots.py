"""The causal-LM task's closed-form roots of its loss Hessian in the logits (used by EK-FAC and
the gradient index instead of autograd Hessians and an eigendecomposition per sequence)."""

from __future__ import annotations

import pytest
import torch
from torch.func import hessian

import dask_influence as di
from cases import tiny_gpt2
from dask_influence.core.solvers.ekfac import EkfacInfluence


def lm_batch(n: int, length: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, -3:] = 0  # padding
    labels = ids.clone()
    labels[2, :4] = -100  # a prompt left out of the loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_roots_square_to_the_loss_hessian_per_sequence():
    n, length, vocab = 4, 6, 5
    batch = lm_batch(n, length, vocab, 0)
    logits = torch.randn(n, length, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = di.tasks.causal_lm().output_loss
    roots = loss.curvature_roots(logits, batch)  # (r, n, T, V)
    assert roots.shape == ((length - 1) * vocab, n, length, vocab)
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        exact = hessian(lambda o, one=one: loss(o[None], one))(logits[i]).reshape(length * vocab, length * vocab)
        s = roots[:, i].reshape(-1, length * vocab).T  # (c, r)
        assert torch.allclose(s @ s.T, exact, rtol=0, atol=1e-14), i


def test_ekfac_with_the_closed_form_equals_autograd_on_a_tiny_gpt2():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_gpt2()
    batch = lm_batch(12, 8, 16, 3)
    task = di.tasks.causal_lm()
    closed = EkfacInfluence(model, task, regularization=0.1).fit(batch)
    assert closed._output.closed_form is not None
    slow = EkfacInfluence(model, task, regularization=0.1, output_curvature="autograd").fit(batch)
    assert slow._output.closed_form is None
    test = {k: v[:3] for k, v in lm_batch(3, 8, 16, 4).items()}
    a, b = closed.influences(test, batch), slow.influences(test, batch)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-10


class _BigramLm(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 4)
        self.head = torch.nn.Linear(4, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def test_ekfac_refuses_closed_form_roots_too_many_to_back_propagate():
    batch = lm_batch(3, 80, 64, 5)  # (T, V) = (80, 64): 5,120 entries per sequence
    # fisher="exact" asks for the exact roots; the default ("auto") samples the Fisher here
    solver = EkfacInfluence(_BigramLm(64).double(), di.tasks.causal_lm(), regularization=0.1, fisher="exact")
    with pytest.raises(ValueError, match=r"outputs have 5,120 entries per sample.*backward passes.*CgInfluence"):
        solver.fit(batch)


def test_ekfac_refuses_autograd_hessians_of_too_many_outputs():
    batch = lm_batch(3, 80, 64, 5)
    solver = EkfacInfluence(
        _BigramLm(64).double(), di.tasks.causal_lm(), regularization=0.1, output_curvature="autograd"
    )
    with pytest.raises(ValueError, match=r"5,120 entries per sample.*by autograd, a 5,120 x 5,120 matrix.*closed form"):
        solver.fit(batch)
