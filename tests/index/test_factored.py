"""The factored storage's pieces against dense references (dask_influence.index.factored): the
positions' own pairs are the layer's projected gradient, the truncation is the best rank-r part
(Eckart-Young, from the SVD of the formed matrix) by both of its routes, and densify lays the
layers out as the dense index does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dask_influence.index import factored


def _pieces(n, t, ko, ki, seed=0, zero=()):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, t, ko, generator=gen, dtype=torch.float64)
    v = torch.randn(n, t, ki, generator=gen, dtype=torch.float64)
    for sample, position in zero:  # a padding position: its output gradient is 0
        u[sample, position] = 0
    return u, v


def _dense(u, v):
    return torch.einsum("nto,nti->noi", u, v)


def test_positions_own_pairs_are_the_layer_gradient_and_padding_is_dropped():
    u, v = _pieces(4, 5, 6, 7, zero=[(0, 1), (0, 3), (2, 0), (2, 2), (2, 4)])
    fu, fv, dropped, total = factored.layer_factors(u, v, 3)  # sample 0: 3 positions left, sample 2: 2
    assert fu.shape == (4, 3, 6) and fv.shape == (4, 3, 7)
    m = _dense(u, v)
    got = _dense(fu, fv)
    for sample in (0, 2):  # their own pairs: exact
        assert torch.allclose(got[sample], m[sample], rtol=0, atol=1e-12)
        assert float(dropped[sample]) == 0.0
    np.testing.assert_allclose(total.numpy(), (m * m).sum((1, 2)).numpy(), rtol=1e-12)
    assert torch.equal(fu[2, 2], torch.zeros(6)) and torch.equal(fv[2, 2], torch.zeros(7))  # padded pair
    own = (fu[0].norm(dim=1), fv[0].norm(dim=1))  # balanced: |u| = |v| per pair
    np.testing.assert_allclose(own[0].numpy(), own[1].numpy(), rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 9, 10), (12, 5, 6)], ids=["qr-core", "formed"])
def test_truncation_is_the_best_rank_r_part(shape):
    t, ko, ki = shape  # T < min(k_o, k_i): the QR core; else M formed
    u, v = _pieces(5, t, ko, ki, seed=1)
    m = _dense(u, v)
    w, s, zh = torch.linalg.svd(m, full_matrices=False)
    for rank in (1, 2, 3):
        fu, fv, dropped, total = factored.layer_factors(u, v, rank)
        best = w[:, :, :rank] @ torch.diag_embed(s[:, :rank]) @ zh[:, :rank]
        assert torch.allclose(_dense(fu, fv), best, rtol=0, atol=1e-10 * float(s.max()))
        np.testing.assert_allclose(dropped.numpy(), (s[:, rank:] ** 2).sum(1).numpy(), rtol=1e-10, atol=1e-20)
        np.testing.assert_allclose(total.numpy(), (s * s).sum(1).numpy(), rtol=1e-10)
    full = factored.layer_factors(u, v, min(t, ko, ki))  # the exact rank: nothing dropped
    assert torch.allclose(_dense(full[0], full[1]), m, rtol=0, atol=1e-10 * float(s.max()))
    assert float(full[2].max()) < 1e-20 * float(full[3].min())


def test_float32_factors_and_mixed_samples_in_one_chunk():
    u, v = _pieces(3, 4, 8, 8, seed=2, zero=[(1, 0), (1, 1), (1, 2)])  # sample 1: one position, exact
    fu, fv, dropped, _ = factored.layer_factors(u.float(), v.float(), 2)
    assert fu.dtype == torch.float32
    m = _dense(u, v)
    assert torch.allclose(_dense(fu, fv)[1].double(), m[1], rtol=0, atol=1e-5 * float(m[1].abs().max()))
    assert float(dropped[1]) == 0.0 and float(dropped[0]) > 0


def test_densify_lays_the_layers_out_as_the_dense_index():
    dims = [(3, 4), (2, 5), (1, 1)]
    t = 2
    layers = [_pieces(6, t, ko, ki, seed=i) for i, (ko, ki) in enumerate(dims)]
    dense = torch.cat([_dense(u, v).reshape(6, -1) for u, v in layers], dim=1).numpy()
    rank = factored.exact_rank(dims, [t] * len(dims))
    assert rank == 2
    fo, fi, dropped, _ = factored.factorize(layers, rank)
    assert fo.shape == (6, 2, 6) and fi.shape == (6, 2, 10)
    got = factored.densify(fo.numpy(), fi.numpy(), dims, np.float64)
    assert got.dtype == np.float64 and got.shape == (6, factored.dense_dim(dims)) == (6, 23)
    np.testing.assert_allclose(got, dense, rtol=0, atol=1e-12)
    assert float(dropped.max()) < 1e-24
    half = factored.densify(fo.numpy().astype(np.float16), fi.numpy().astype(np.float16), dims)
    assert half.dtype == np.float32 and np.abs(half - dense).max() < 1e-2 * np.abs(dense).max()
    assert factored.factored_numbers(dims, 2) == 2 * (7 + 7 + 2)


def test_storage_arguments_are_checked():
    with pytest.raises(
        ValueError,
        match=r"^storage='factored' stores each layer's Kronecker-projected gradient as low-rank factors and needs "
        r"projection='kronecker'; got projection='sjlt'\. Pass projection='kronecker' or storage='dense'\.$",
    ):
        factored.check_storage("factored", None, "sjlt")
    with pytest.raises(ValueError, match=r"^storage must be 'dense' or 'factored'; got 'lowrank'\.$"):
        factored.check_storage("lowrank", None, "kronecker")
    with pytest.raises(ValueError, match=r"^factor_rank must be None \(exact\) or a positive int; got 0\.$"):
        factored.check_storage("factored", 0, "kronecker")
    with pytest.raises(ValueError, match=r"^factor_rank=2 applies to storage='factored' only"):
        factored.check_storage("dense", 2, "kronecker")
    factored.check_storage("factored", 3, {"kind": "kronecker"})
