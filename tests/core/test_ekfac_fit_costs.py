"""EK-FAC's fit at the real vocabulary (issue 29 items 2 and 5): the cheaper pieces of the fit give the
same numbers (square sums by tiles, labels by block sums, a tied embedding use captured as token ids),
the per-chunk memory estimate is the measured peak of a tied GPT-2's fit, and chunks halve to the
budget with one line saying so."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import dask_influence as di
from cases import tiny_gpt2
from dask_influence.core.kronecker import (
    GRAM_BAND,
    Capture,
    add_lower_gram,
    add_square_sum,
    eigen_factor,
    tied_layer_grads,
)
from dask_influence.core.sampled_fisher import CDF_TWO_LEVEL, _two_level_inverse_cdf, draw_categorical
from dask_influence.core.solvers.ekfac import EkfacInfluence

transformers = pytest.importorskip("transformers")


# -- the same numbers, fewer passes over memory -------------------------------------------------------
@pytest.mark.parametrize("shape", [(512, 3_000), (4, 70_000), (5_000, 7), (3, 5)])
def test_square_sums_by_tiles_are_the_float64_column_sums(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    total = torch.full((shape[1],), 2.0, dtype=torch.float64)  # added into, not overwritten
    add_square_sum(total, x)
    expected = 2.0 + x.double().square().sum(0)
    assert float(((total - expected).abs() / expected).max()) < 1e-6  # float32 sums of at most 64 + tiles
    exact = torch.zeros(shape[1], dtype=torch.float64)
    add_square_sum(exact, x.double())
    assert torch.allclose(exact, x.double().square().sum(0), rtol=1e-13, atol=0)


def test_labels_by_block_sums_are_those_of_one_cumulative_sum():
    """Over 50,257 classes the labels come from block sums and one block's cumulative sum: for the
    same uniforms, the same labels as the inverse of the whole cumulative sum (1,536 draws here;
    only a uniform within a float32 rounding of a class boundary could fall otherwise)."""
    g = torch.Generator().manual_seed(0)
    vocab = 50_257
    assert vocab >= CDF_TWO_LEVEL
    p = torch.softmax(3 * torch.randn(512, vocab, generator=g), dim=-1)
    p[:, 7] = 0.0  # a class of probability 0 is never drawn
    uniform = torch.rand(512, 3, generator=g)
    cdf = p.cumsum(-1)
    one = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=vocab - 1)
    two = _two_level_inverse_cdf(p, uniform)
    assert torch.equal(two, one)
    assert not bool((two == 7).any())
    # draw_categorical takes this route from CDF_TWO_LEVEL classes, with the generator's uniforms
    drawn = draw_categorical(p, 3, torch.Generator().manual_seed(5))
    again = torch.rand(512, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, _two_level_inverse_cdf(p, again))
    # and the frequencies are the probabilities (40,000 draws over 8,192 classes: 4 standard errors)
    row = torch.softmax(torch.randn(1, 8_192, generator=g) * 2, dim=-1)
    labels = draw_categorical(row.expand(20, -1).contiguous(), 2_000, torch.Generator().manual_seed(3))
    freq = torch.bincount(labels.reshape(-1), minlength=8_192).double() / 40_000
    top = row[0].double().topk(20).indices
    assert float((freq[top] - row[0, top].double()).abs().max()) < 4 * float(row[0].max().sqrt()) / 40_000**0.5


def test_a_tied_use_captured_as_token_ids_gives_the_one_hot_gradients():
    """GPT-2's ``wte`` use of the tied weight, captured as token ids (``-1`` at a padding index), gives
    the per-sample gradients of its one-hot inputs (which are ``(n, T, V)``: 100 MB for four
    sequences of 128 tokens over 50,257 tokens)."""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=40, n_embd=8, n_positions=8, attn_implementation="eager")
    model.transformer.wte.padding_idx = 3  # torch never updates the padding row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, tied="head")
    (head,) = [layer for layer in solver._layers if layer.tied_use is not None]
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    ids[0, 2] = 3
    theta = solver.trained_parameters()
    captured = {}
    for as_ids in (False, True):
        with torch.enable_grad():
            uses = [head.tied_use] if as_ids else []
            with Capture([head, head.tied_use], 3, ids=uses) as capture:
                outputs = solver._functions.outputs(theta, {"input_ids": ids})
            vectors = torch.randn(2, *outputs.shape, generator=torch.Generator().manual_seed(2), dtype=outputs.dtype)
            captured[as_ids] = capture.collect(outputs, vectors)
    (g_head, a_head), (g_use, token_ids) = captured[True]
    assert token_ids.dtype == torch.int64 and token_ids.shape == (3, 7) and int(token_ids[0, 2]) == -1
    assert torch.equal(token_ids[token_ids >= 0], ids[ids != 3])
    for r in range(2):
        expected = tied_layer_grads(*captured[False], r)
        assert torch.allclose(tied_layer_grads((g_head, a_head), (g_use, token_ids), r), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="embedding layers only"):
        Capture([head], 3, ids=[head])


# -- memory: the per-chunk estimate is the fit's measured peak -----------------------------------------
def _peak_bytes(fn) -> int:
    """The peak of the bytes torch allocates on the CPU during ``fn()`` above those allocated at its
    start (torch's profiler's memory timeline, every allocation and free)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def test_the_tied_fit_chunk_estimate_is_its_measured_peak():
    """A tied GPT-2 (V = 2,048, T = 32, width 16, float64), chunks of 4, the sampled Fisher: the
    estimate (the factors' :attr:`memory_` plus 4 x one sample's blocks) is within 10% above the
    peak torch allocates during the fit. The tied use holds its output gradients and token ids
    (``(16 x 8 + 8) x 32`` bytes) and the head only its own 32 positions; before, the estimate
    counted the use's one-hot inputs and its positions again with the head's (an upper bound
    about 2.4 logit-sized tensors per sample too high here)."""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=2_048, n_embd=16, n_head=2, n_positions=32, attn_implementation="eager")
    train = {"input_ids": torch.randint(0, 2_048, (8, 32), generator=torch.Generator().manual_seed(1))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make = lambda: EkfacInfluence(  # noqa: E731
            model, di.tasks.causal_lm(), regularization=0.1, tied="head", fisher="sampled", chunk_size=4
        )
        make().fit(train, progress=False)  # first calls (kernels, the sampled-Fisher check) outside the measure
        solver = make()
    pieces = dict(solver.chunk_pieces(solver.trained_parameters(), train))
    logits = 32 * 2_048 * 8
    assert pieces["the model outputs"] == pieces["the vectors back-propagated"] == logits
    assert pieces["the output gradients and inputs of layer 'lm_head'"] == (2_048 + 16) * 32 * 8
    assert pieces["the output gradients and token ids of the tied use 'transformer.wte'"] == (16 * 8 + 8) * 32
    assert pieces["the per-sample gradients of layer 'lm_head'"] == 2_048 * 16 * 8  # once: its G is diagonal
    assert ("lm_head", "the float64 sums of its G (2,048, its diagonal)", 2_048 * 8) in solver.memory_.pieces
    estimate = solver.memory_.fixed + 4 * sum(pieces.values())
    measured = _peak_bytes(lambda: solver.fit(train, progress=False))
    assert solver._fit_chunks == {(False, (32,)): 4}
    assert 0.9 * estimate <= measured <= estimate, (measured, estimate)


# -- chunks halve to the budget, said in one line --------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)


def test_the_default_chunk_halves_to_the_budget_with_an_info_line(caplog):
    x, y = _xy()
    free = EkfacInfluence(_mlp(), nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    per_sample = sum(size for _, size in free.chunk_pieces(free.trained_parameters(), (x, y)))
    assert per_sample == 3 * 8 + 9 * 8 + (3 * 6 + 5) * 8 + (3 * 3 + 7) * 8  # outputs, 3 roots, two layers
    budget = free.memory_.fixed + 20 * per_sample  # room for 20 samples: 256 halves to 16
    with caplog.at_level(logging.INFO, logger="dask_influence"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the default chunk_size: no warning
        tight = EkfacInfluence(_mlp(), nn.CrossEntropyLoss(), regularization=0.1, memory_budget=budget).fit((x, y))
    assert list(tight._fit_chunks.values()) == [16]
    lines = [r.getMessage() for r in caplog.records if "chunks of" in r.getMessage()]
    assert (free.memory_.fixed, budget) == (2_312, 10_472)
    assert lines == [  # 256 x 408 bytes
        "EK-FAC's fit runs in chunks of 16 samples: 256 (the default chunk_size) would hold 104,448 bytes "
        "(104.4 kB) of per-chunk blocks (the largest, the output gradients and inputs of layer '0', 184 bytes per "
        "sample) beside its factors (2,312 bytes (2.3 kB)), beyond memory_budget=10,472 bytes (10.5 kB); pass "
        "chunk_size=16 or a larger memory_budget to choose."
    ]
    for a, b in zip(tight.state_.layers, free.state_.layers):  # the same sums in smaller chunks
        assert float((a.corrected - b.corrected).abs().max()) < 1e-12 * float(b.corrected.abs().max())


def test_a_given_chunk_size_halves_to_the_budget_with_a_warning():
    x, y = _xy()
    free = EkfacInfluence(_mlp(), nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    per_sample = sum(size for _, size in free.chunk_pieces(free.trained_parameters(), (x, y)))
    budget = free.memory_.fixed + 5 * per_sample
    tight = EkfacInfluence(_mlp(), nn.CrossEntropyLoss(), regularization=0.1, memory_budget=budget, chunk_size=30)
    with pytest.warns(UserWarning, match=r"^EK-FAC's fit runs in chunks of 3 samples: 30 \(chunk_size\) would hold "):
        tight.fit((x, y))
    assert list(tight._fit_chunks.values()) == [3]  # 30 -> 15 -> 7 -> 3: at most 5 fit
    # one sample that does not fit is refused in one line, before any pass
    with pytest.raises(ValueError, match=r"^EK-FAC's fit cannot hold one sample's blocks \(") as info:
        EkfacInfluence(
            _mlp(), nn.CrossEntropyLoss(), regularization=0.1, memory_budget=free.memory_.fixed + per_sample - 1
        ).fit((x, y))
    assert "\n" not in str(info.value)


def test_factor_sums_hold_the_lower_triangle_of_the_gram_matrix():
    """A factor's sum is formed on and below its diagonal only (bands of GRAM_BAND rows: 58% of the products at
    3,072 wide), and eigh reads that triangle: the same eigenvalues as the full sum, for a width of one band,
    of several and of a partial last band."""
    g = torch.Generator().manual_seed(0)
    for m in (7, GRAM_BAND, 2 * GRAM_BAND + 37):
        x = torch.randn(300, m, generator=g, dtype=torch.float64)
        before = torch.full((m, m), 0.5, dtype=torch.float64).tril_()  # a sum so far: zero above the diagonal
        total = before.clone()
        add_lower_gram(total, x, scale=0.25)
        product = 0.25 * x.T @ x
        rows, cols = torch.arange(m)[:, None], torch.arange(m)[None, :]
        formed = cols < (rows // GRAM_BAND + 1) * GRAM_BAND  # each band up to and including its diagonal block
        assert int((~formed).sum()) == (0 if m <= GRAM_BAND else GRAM_BAND * (m - GRAM_BAND) + GRAM_BAND * 37)
        assert torch.allclose(total, before + torch.where(formed, product, 0.0), rtol=1e-12, atol=1e-12)
        _, values = eigen_factor(total.clone(), (2, torch.float64))  # reads the lower triangle
        lower = torch.tril(before + product)
        expected = torch.linalg.eigvalsh(lower + torch.tril(lower, -1).T) / 2
        assert torch.allclose(values, expected.clamp_min(0), rtol=1e-10, atol=1e-10)


def test_one_chunk_of_factors_is_solved_in_place_of_its_gradients():
    """One chunk's factors overwrite its test gradients (no second ``(n, p)``: 1 GB for two GPT-2-small
    sequences): the same numbers as the solve into a new tensor, and zero on the parameters no layer covers
    (a GPT-2's LayerNorms and position embeddings, left out)."""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=40, n_embd=8, n_positions=8, attn_implementation="eager")
    task = di.tasks.causal_lm()
    ids = torch.randint(0, 40, (6, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the left-out LayerNorms
        solver = EkfacInfluence(model, task, regularization=0.1, tied="head").fit({"input_ids": ids})
    assert solver.solves_in_place and solver._outside_layers()
    test = {"input_ids": ids[:3]}
    factors = solver.influence_factors(test)
    theta = solver._require_fitted()
    grads = torch.cat(list(solver._flat_grads(theta, solver.prepare_batch(test))))
    expected = solver._apply(grads, power=-1.0, regularization=0.1)  # into a new tensor
    assert expected.data_ptr() != grads.data_ptr()
    torch.testing.assert_close(factors, expected, rtol=1e-12, atol=1e-14)
    for start, stop in solver._outside_layers():
        assert not factors[:, start:stop].any()
    solved = grads.clone()
    assert solver._apply(solved, power=-1.0, regularization=0.1, out=solved) is solved
    torch.testing.assert_close(solved, expected, rtol=1e-12, atol=1e-14)
