"""Forming the GGN ``sum_i J_i^T H_i J_i`` as a Gram matrix of ``R_i^T J_i`` (``H_i = R_i R_i^T``).

The roots must square back to each sample's output Hessian (leaving out only directions of
zero curvature), the blocked Gram product must equal ``A^T A``, and DirectInfluence's GGN must
equal the dense matrix of GGN-vector products, for a convex loss (roots) and a loss that is not
convex in the outputs (the general product)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dask_influence as di
from dask_influence.core import gradients
from dask_influence.core.gradients import add_gram_, psd_roots


def test_cross_entropy_roots_square_back_and_drop_the_ones_direction():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = logits.softmax(dim=1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (7, 5, 5), rank 4 each
    roots = psd_roots(h)
    assert roots is not None and roots.shape == (7, 5, 4)
    torch.testing.assert_close(roots @ roots.transpose(1, 2), h, rtol=0, atol=1e-15)


def test_an_indefinite_output_hessian_has_no_roots():
    h = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64)).expand(3, 2, 2)
    assert psd_roots(h) is None


@pytest.mark.parametrize("q", [100, 256, 600])
def test_blocked_gram_equals_the_full_product(q):
    a = torch.randn(50, q, generator=torch.Generator().manual_seed(q), dtype=torch.float64)
    total = torch.eye(q, dtype=torch.float64)
    add_gram_(total, a)
    torch.testing.assert_close(total, torch.eye(q, dtype=torch.float64) + a.T @ a, rtol=1e-14, atol=1e-12)


class _Cubed(nn.Module):
    """A loss whose Hessian in the outputs is indefinite: sum (o - y)^3 / 3 (curvature 2 (o - y))."""

    def forward(self, o, y):
        return ((o - y) ** 3).sum(dim=1).mean() / 3


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), _Cubed()], ids=["cross-entropy", "indefinite"])
def test_direct_ggn_equals_the_dense_ggn_vector_products(loss, monkeypatch):
    monkeypatch.setattr(gradients, "GRAM_BLOCK", 16)  # several blocks on a small model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,)) if isinstance(loss, nn.CrossEntropyLoss) else torch.randn(30, 3, dtype=torch.float64)
    direct = di.DirectInfluence(model, loss, regularization=10.0, curvature="ggn").fit((x, y))
    cg = di.CgInfluence(model, loss, regularization=10.0, curvature="ggn").fit((x, y))
    dense = cg.block_curvature().batch_matmat((x, y), torch.eye(direct.num_params, dtype=torch.float64))
    torch.testing.assert_close(direct.hessian, 0.5 * (dense + dense.T), rtol=1e-12, atol=1e-13)
