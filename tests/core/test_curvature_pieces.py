"""Curvature products split into pieces of samples and vectors (``CurvatureOperator.batch_matmat``).

A batched Hessian product of a CNN keeps every layer's activations for every sample and vector
it carries; past the caches it runs at memory speed (2x slower per sample and vector measured
on the digits CNN). The operator therefore splits a batch whose activations exceed
``ACTIVATION_BUDGET``: the pieces' products, weighted by their share of the batch, must equal
the product of the whole batch, for the Hessian and the GGN, with a ragged last piece.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dask_influence as di
from dask_influence.core import operators


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(45, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (45,), generator=gen)


def operator(curvature: str, data):
    solver = di.CgInfluence(small_cnn(), nn.CrossEntropyLoss(), regularization=0.1, curvature=curvature)
    solver.fit(data)
    return solver.block_curvature()


def test_activation_bytes_is_the_largest_module_output_of_one_sample(data):
    op = operator("hessian", data)
    # the convolution's (and tanh's, flatten's) output: 4 channels x 6 x 6 float64 numbers
    assert op.functions.activation_bytes(op.theta, data) == 4 * 36 * 8


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_split_products_equal_the_whole_batch_product(curvature, data, monkeypatch):
    op = operator(curvature, data)
    name = "hessian_matmat" if curvature == "hessian" else "ggn_matmat"
    v = torch.randn(op.size, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = op.batch_matmat(data, v)

    calls: list[tuple[int, int]] = []
    inner = getattr(op.functions, name)

    def spy(theta, batch, cols):
        calls.append((len(batch[0]), cols.shape[1]))
        return inner(theta, batch, cols)

    monkeypatch.setattr(op.functions, name, spy)
    per_sample = 4 * 36 * 8
    # 8 vectors are already at the fewest (16) before samples are split: 10 of 45 samples fit,
    # pieces of 10, 10, 10, 10 and 5
    monkeypatch.setattr(operators, "ACTIVATION_BUDGET", 10 * 8 * per_sample)
    monkeypatch.setattr(operators, "MIN_PIECE_SAMPLES", 4)
    split = op.batch_matmat(data, v)
    assert calls == [(10, 8)] * 4 + [(5, 8)]
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)

    # fewer vectors first: 45 samples x 2 vectors fit, the batch stays whole
    calls.clear()
    monkeypatch.setattr(operators, "MIN_PIECE_VECTORS", 2)
    monkeypatch.setattr(operators, "ACTIVATION_BUDGET", 45 * 2 * per_sample)
    split = op.batch_matmat(data, v)
    assert calls == [(45, 2)] * 4
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)

    # then fewer samples, down to the fewest: 4 samples x 2 vectors
    calls.clear()
    monkeypatch.setattr(operators, "ACTIVATION_BUDGET", 4 * 2 * per_sample)
    split = op.batch_matmat(data, v)
    assert calls[:4] == [(4, 2)] * 4 and len(calls) == 12 * 4
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)


def test_a_batch_within_the_budget_is_one_product(data, monkeypatch):
    op = operator("hessian", data)
    calls = []
    inner = op.functions.hessian_matmat
    monkeypatch.setattr(op.functions, "hessian_matmat", lambda t, b, c: calls.append(1) or inner(t, b, c))
    op.batch_matmat(data, torch.ones(op.size, 3, dtype=torch.float64))
    assert len(calls) == 1
