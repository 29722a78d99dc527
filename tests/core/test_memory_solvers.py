"""Memory known up front (issue 29 item 2) for Direct, CG, LiSSA, Arnoldi and Nystroem: the estimate
from the shapes, the one-line refusal before any pass, and a budget that changes the chunking
(products in pieces, CG's right-hand sides per block), not the numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dask_influence as di
from cases import TinyLm
from dask_influence.core import memory
from dask_influence.core.operators import CurvatureOperator
from dask_influence.core.solvers.arnoldi import TRACE_PROBES
from dask_influence.core.solvers.cg import CG_VECTORS

DT = torch.float64
V, T = 50, 6
LOGITS = T * V * 8  # one sequence's logits in float64: the largest module output of the tiny LM


def lm_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(n, T, dtype=torch.long), "labels": ids.clone()}


@pytest.fixture(scope="module")
def lm():
    model = TinyLm(V).to(DT).eval()
    p = sum(t.numel() for t in model.parameters())
    return model, p, lm_batch(12, 0), lm_batch(3, 1)


def _fixed(solver) -> int:
    """Bytes of the estimate beside its product piece."""
    return solver.estimated_memory_.total - solver.estimated_memory_.bytes_of(memory.PRODUCT_PIECE)


# -- Direct ----------------------------------------------------------------------------------------
def test_direct_refuses_a_dense_matrix_beyond_the_budget_at_construction():
    model = nn.Linear(100, 100)  # p = 10,100 in float32
    with pytest.raises(ValueError) as err:
        di.DirectInfluence(model, nn.MSELoss(), regularization=0.1, memory_budget=10**8)
    assert str(err.value) == (
        "DirectInfluence needs the dense (p, p) curvature: 408.0 MB in float32 for p = 10,100 (2.9 GB with its "
        "float64 Cholesky factor), beyond memory_budget=100,000,000 bytes (100.0 MB). Use CgInfluence, "
        "ArnoldiInfluence or EkfacInfluence (or blocks='layer', or a larger memory_budget)."
    )
    assert "\n" not in str(err.value)
    # per layer: 5,050 and 2,550 parameters, a float64 factor of the larger
    two = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 50))
    blocks = di.DirectInfluence(two, nn.MSELoss(), regularization=0.1, memory_budget=10**9, blocks="layer")
    assert blocks._dense_pieces("layer") == [
        ("the dense curvature (5,050^2 + 2,550^2)", 4 * (5_050**2 + 2_550**2)),
        ("the float64 Cholesky factor and workspace (3 x 5,050 x 5,050)", 3 * 8 * 5_050**2),
    ]


def test_direct_estimate_is_the_dense_matrix_plus_its_pieces(lm):
    model, p, train, _ = lm
    solver = di.DirectInfluence(model, di.tasks.causal_lm(), regularization=0.1, curvature="ggn").fit(train)
    est = solver.estimated_memory_
    assert est.bytes_of("the dense curvature") == p * p * 8
    assert est.bytes_of("the float64 Cholesky factor") == 2 * 8 * p * p  # float64 model: no extra copy
    assert est.bytes_of("the parameters") == 2 * p * 8
    assert est.bytes_of("a chunk's per-sample gradients") == 2 * 12 * p * 8
    # the product of 64 unit vectors over the 12 sequences: 5 x the logits per sequence and vector
    assert est.bytes_of(memory.PRODUCT_PIECE) == memory.PRODUCT_COPIES * LOGITS * 12 * 64
    assert est.total == p * p * 8 + 2 * 8 * p * p + 2 * p * 8 + 2 * 12 * p * 8 + 5 * LOGITS * 12 * 64


# -- refusals before any pass -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "largest"),
    [
        (di.CgInfluence, {}, "a chunk's per-sample gradients and factors (2 x (12, P))"),
        (di.LissaInfluence, {}, "LiSSA's iterates (10 x (P, 12))"),
        (di.ArnoldiInfluence, {"rank": 10}, "the Krylov basis (p, m) = (P, 30) in float64"),
        (di.NystroemSketchInfluence, {"rank": 40}, "the sketch's test matrix, its product and their float64"),
    ],
)
def test_solvers_refuse_in_one_line_before_any_pass(lm, cls, kwargs, largest):
    model, p, train, _ = lm
    solver = cls(model, di.tasks.causal_lm(), regularization=0.1, curvature="ggn", memory_budget=20_000, **kwargs)
    with pytest.raises(ValueError) as err:
        solver.fit(train)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{cls.__name__} (torch.float64, p = {p:,}) needs ")
    assert (
        "beyond memory_budget=20,000 bytes (20.0 kB); the largest piece is " + largest.replace("P", f"{p:,}") in message
    )
    assert message.endswith("Pass a larger memory_budget, smaller batches or chunk_size, or another solver.")
    assert not solver.is_fitted


def test_a_product_that_cannot_hold_one_sample_and_one_vector_is_refused(lm):
    model, p, train, _ = lm
    operator = CurvatureOperator(
        di.CgInfluence(model, di.tasks.causal_lm())._functions, _theta(model), None, "ggn", memory_room=LOGITS
    )
    with pytest.raises(
        ValueError,
        match=r"^One curvature product of one sample and one vector holds 12,000 bytes "
        r"\(12.0 kB\) \(5 x the largest module output of a sample, 2,400 bytes \(2.4 kB\)\), beyond "
        r"the 2,400 bytes \(2.4 kB\) the solver's memory_budget leaves for it\.",
    ):
        operator.batch_matmat(train, torch.zeros(p, 1, dtype=DT))


def _theta(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in model.parameters()])


# -- a budget changes the chunking, not the numbers ----------------------------------------------------
def test_products_in_pieces_equal_one_product(lm):
    """The product is linear: pieces of 1 sample x 1 vector give the numbers of one product."""
    model, p, train, _ = lm
    functions = di.CgInfluence(model, di.tasks.causal_lm())._functions
    v = torch.randn(p, 1 + TRACE_PROBES, dtype=DT, generator=torch.Generator().manual_seed(0))
    whole = CurvatureOperator(functions, _theta(model), None, "ggn")
    small = CurvatureOperator(functions, _theta(model), None, "ggn", memory_room=memory.product_bytes(LOGITS, 1, 1))
    assert small._piece(train, 12, 1 + TRACE_PROBES) == (1, 1)
    assert whole._piece(train, 12, 1 + TRACE_PROBES) == (12, 9)
    expected = whole.batch_matmat(train, v)
    assert float((small.batch_matmat(train, v) - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_arnoldi_pushes_its_trace_probes_in_pieces_that_fit(lm):
    """Arnoldi's first product carries 1 + 8 probe vectors; a budget between "fits 2 vectors" and "fits
    all 9" pushes them in pieces of 2, with the same fit."""
    model, p, train, test = lm
    task = di.tasks.causal_lm()
    big = di.ArnoldiInfluence(model, task, regularization=0.1, curvature="ggn", rank=6).fit(train)
    assert f"12 samples x 9 of 9 vectors x 5 x {memory.short(LOGITS)}" in str(big.estimated_memory_)
    budget = _fixed(big) + memory.product_bytes(LOGITS, 12, 2)
    small = di.ArnoldiInfluence(model, task, regularization=0.1, curvature="ggn", rank=6, memory_budget=budget)
    small.fit(train)
    assert small.estimated_memory_.total <= budget
    assert small._product_room == memory.product_bytes(LOGITS, 12, 2)
    assert small.block_curvature()._piece(train, 12, 1 + TRACE_PROBES) == (12, 2)
    assert big.block_curvature()._piece(train, 12, 1 + TRACE_PROBES) == (12, 9)
    torch.testing.assert_close(small.eigenvalues_, big.eigenvalues_, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(small.influences(test, train), big.influences(test, train), rtol=1e-6, atol=1e-9)


def test_cg_takes_fewer_right_hand_sides_per_block_within_its_budget(lm):
    model, p, train, test = lm
    task = di.tasks.causal_lm()
    kwargs = dict(regularization=0.1, curvature="ggn", rtol=1e-10, maxiter=300)
    big = di.CgInfluence(model, task, **kwargs).fit(train)
    assert big._rhs_per_block(12) == 12
    one = CG_VECTORS * p * 8
    assert big.estimated_memory_.bytes_of("block CG's vectors for one right-hand side") == one
    # room for the fit's pieces (one right-hand side's vectors among them) and 11 more: blocks of 12
    small = di.CgInfluence(model, task, memory_budget=big.estimated_memory_.total + 11 * one, **kwargs).fit(train)
    assert small._rhs_per_block(24) == 12
    assert small._rhs_per_block(5) == 5
    tight = di.CgInfluence(model, task, memory_budget=big.estimated_memory_.total, **kwargs).fit(train)
    assert tight._rhs_per_block(3) == 1  # room for one right-hand side's vectors
    torch.testing.assert_close(tight.influences(test, train), big.influences(test, train), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cls", [di.LissaInfluence, di.NystroemSketchInfluence])
def test_small_budgets_give_the_same_numbers(lm, cls):
    model, p, train, test = lm
    task = di.tasks.causal_lm()
    kwargs = {"rank": 20} if cls is di.NystroemSketchInfluence else {"maxiter": 50}
    big = cls(model, task, regularization=0.1, curvature="ggn", **kwargs).fit(train)
    budget = _fixed(big) + memory.product_bytes(LOGITS, 3, 1)
    small = cls(model, task, regularization=0.1, curvature="ggn", memory_budget=budget, **kwargs).fit(train)
    assert small._product_room == memory.product_bytes(LOGITS, 3, 1)
    assert small.block_curvature()._piece(train, 12, 12) == (3, 1)
    torch.testing.assert_close(small.influences(test, train), big.influences(test, train), rtol=1e-6, atol=1e-9)


def test_memory_budget_leaves_fingerprints_as_they_were_before_it():
    """``memory_budget`` sizes the work, not the numbers (a resource field): the fingerprints (which
    stores record and resume against) are those of the code before the field existed (pinned from
    commit 05ae181) whatever the budget, and a store's recorded parameters leave it out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = {
        di.DirectInfluence: ({}, "fac19aecbbd13ce4816c3a6ea93f3569"),
        di.CgInfluence: ({}, "a42c6292b302c141799a99d6da46e357"),
        di.LissaInfluence: ({}, "efa1aec758a4a20890841a663cc2c7a6"),
        di.ArnoldiInfluence: ({"rank": 3}, "aa2190445e958858f2623b98cdb3c138"),
        di.NystroemSketchInfluence: ({"rank": 3}, "17b4d2baa0afe414c121146b69e770f4"),
    }
    for cls, (kw, pinned) in before.items():
        for budget in (None, 10**9):
            solver = cls(model, nn.CrossEntropyLoss(), regularization=0.1, curvature="ggn", memory_budget=budget, **kw)
            assert solver.fingerprint() == pinned, (cls.__name__, budget)
            assert "memory_budget" in solver.config.resource_fields
