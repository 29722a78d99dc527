"""EK-FAC at the sizes people bring (issue 29 items 2 and 4): memory known before any pass (a
diagonal fallback, chunks sized to the budget, one-line refusals) and a definiteness check that
holds for real widths in float32."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import dask_influence as di
from dask_influence.core.kronecker import LayerFactors, check_layer_positive
from dask_influence.core.solvers.ekfac import EkfacInfluence, FitMemory
from dask_influence.errors import NotPositiveDefiniteError

DT = torch.float64


def mlp(classes: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, classes)).to(DT).eval()


def data(n: int, classes: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


# -- memory known up front ---------------------------------------------------------------------
def test_a_factor_beyond_the_budget_is_kept_diagonal_with_a_warning(tmp_path):
    model = mlp(200)
    x, y = data(30, 200)
    budget = 900_000
    dense = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1)
    assert FitMemory.of(dense._layers, 8, set(), True).fixed > budget  # the dense G (200 x 200) does not fit
    with pytest.warns(UserWarning, match=r"keeps the G of layer '2' \(200 x 200: 960,000 bytes .*\) DIAGONAL") as w:
        ek = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, memory_budget=budget)
    assert "memory_budget=900,000 bytes" in str(w[0].message)
    ek.fit((x, y))
    first, last = ek.state_.layers
    assert first.q_g is not None and last.q_g is None  # only the wide side went diagonal
    # reference for the last layer (its output gradients are the roots of H_out directly):
    # G's diagonal is mean_j diag(H_j) = mean_j (p_j - p_j^2), and the corrected eigenvalues in the
    # basis I (x) Q_A are mean_j (p_j - p_j^2)[o] (a_j Q_A)[i]^2 with a_j = [tanh(W0 x_j + b0), 1]
    with torch.no_grad():
        hidden = torch.tanh(model[0](x))
        p = torch.softmax(model[2](hidden), dim=1)
    a = torch.cat([hidden, torch.ones(len(x), 1, dtype=DT)], dim=1)
    curv = p - p * p
    assert torch.allclose(last.lambda_g, curv.mean(0), rtol=1e-12, atol=0)
    expected = torch.einsum("no,ni->oi", curv, (a @ last.q_a) ** 2) / len(x)
    assert torch.allclose(last.corrected, expected, rtol=1e-10, atol=1e-15)
    # and the dense fit's G has the same diagonal
    dense.fit((x, y))
    assert torch.allclose(torch.diagonal(dense.state_.layers[1].g_factor), last.lambda_g, rtol=1e-10, atol=1e-15)
    scores = ek.influences(x[:3], y[:3], x, y)
    assert torch.isfinite(scores).all()
    # a diagonal side saves, loads and pickles like an embedding's
    path = tmp_path / "fit.pt"
    ek.save(path)
    loaded = EkfacInfluence.load(path, model, nn.CrossEntropyLoss())
    assert loaded.state_.layers[1].q_g is None
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), scores)
    assert torch.equal(pickle.loads(pickle.dumps(ek)).influences(x[:3], y[:3], x, y), scores)


def test_factors_beyond_any_fallback_are_refused_in_one_line():
    with pytest.raises(ValueError) as info:
        EkfacInfluence(mlp(3), nn.CrossEntropyLoss(), regularization=0.1, memory_budget=1_000)
    # all sides diagonal: (sums 168 + state 744) or (state 744 + corrected sums 408) = 1,152 bytes
    assert str(info.value) == (
        "EK-FAC's factors need 1,152 bytes (1.2 kB) even with every wide factor kept diagonal, beyond "
        "memory_budget=1,000 bytes (1.0 kB); the largest piece is the float64 sums of its corrected eigenvalues "
        "(6 x 5) of layer '0', 240 bytes. Pass a larger memory_budget, or leave the layer out with layers=[...]."
    )


def test_chunks_shrink_to_the_budget_with_the_same_factors():
    model = mlp(3)
    x, y = data(20, 3)
    free = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    fixed = free.memory_.fixed
    tight = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, memory_budget=fixed + 3_000).fit((x, y))
    (chunk,) = tight._fit_chunks.values()
    assert 1 <= chunk < tight.chunk_size  # fewer samples per chunk ...
    for a, b in zip(tight.state_.layers, free.state_.layers):  # ... the same sums
        for u, v in ((a.corrected, b.corrected), (a.g_factor, b.g_factor)):
            assert float((u - v).abs().max()) < 1e-12 * float(v.abs().max())


def test_scoring_chunks_shrink_to_the_budget_with_the_same_influences():
    model = mlp(3)
    x, y = data(20, 3)
    free = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    budget = free.memory_.fixed + 2_000
    tight = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, memory_budget=budget).fit((x, y))
    expected, actual = free.influences(x[:5], y[:5], x, y), tight.influences(x[:5], y[:5], x, y)
    assert float((actual - expected).abs().max()) < 1e-12 * float(expected.abs().max())
    assert torch.allclose(tight.self_influences(x, y), free.self_influences(x, y), rtol=1e-12, atol=0)
    scoring = [chunk for key, chunk in tight._fit_chunks.items() if key[0]]
    assert scoring and all(1 <= chunk < tight.chunk_size for chunk in scoring)


class _BigramLm(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def test_one_sample_beyond_the_budget_is_refused_before_any_pass():
    ids = torch.randint(0, 64, (3, 80), generator=torch.Generator().manual_seed(0))
    solver = EkfacInfluence(
        _BigramLm(64).double(), di.tasks.causal_lm(), regularization=0.1, fisher="exact", memory_budget=50_000_000
    )
    with pytest.raises(ValueError) as info:
        solver.fit({"input_ids": ids})
    message = str(info.value)
    assert "\n" not in message
    # the model outputs (80 x 64 x 8 = 40,960 bytes), 5,120 exact roots of 5,120 float64 entries per
    # sequence (209,715,200 bytes), per root the head's output gradients at 80 positions with its
    # inputs ((5,120 x 64 + 5) x 80 x 8 bytes), the embedding's ((5,120 x 4 + 64) x 80 x 8) and the
    # head's per-sample gradients (2 x 64 x 5 x 8)
    assert message.startswith("EK-FAC's fit cannot hold one sample's blocks (432,627,840 bytes (432.6 MB); ")
    assert "the largest, the output gradients and inputs of layer 'head', 209,718,400 bytes (209.7 MB)" in message
    assert "memory_budget=50,000,000 bytes (50.0 MB)" in message and "fisher='sampled'" in message
    assert not solver.is_fitted and solver.state_ is None
    # the sampled Fisher needs one vector per draw: it fits the same budget
    sampled = EkfacInfluence(
        _BigramLm(64).double(), di.tasks.causal_lm(), regularization=0.1, memory_budget=50_000_000
    ).fit({"input_ids": ids})
    assert sampled.is_fitted


@pytest.mark.slow
def test_gpt2_with_the_real_vocabulary_fits_without_asking_for_terabytes():
    """GPT2Config(n_layer=2, n_embd=128, vocab_size=50257) on 4 sequences of 32 tokens: the fit
    completes (the exact causal-LM roots asked for 8e13 bytes before the sampled Fisher)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50257, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="leaves out"):  # the tied embedding / LM head, the LayerNorms
        solver = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.01)
    assert solver.memory_.fixed < 100_000_000
    solver.fit({"input_ids": ids})
    scores = solver.influences({"input_ids": ids[:2]}, {"input_ids": ids})
    assert scores.shape == (2, 4) and torch.isfinite(scores).all()
    assert bool((scores.diagonal() > 0).all())  # a sequence helps itself


# -- the definiteness check --------------------------------------------------------------------
def _c_fc_factors(seed: int = 0) -> LayerFactors:
    """GPT-2-small's c_fc (768 -> 3,072, bias) in float32, corrected eigenvalues spread over 12 decades."""
    g = torch.Generator().manual_seed(seed)
    o, i = 3072, 769
    corrected = (torch.randn(o, i, generator=g) * torch.logspace(0, -6, i)).square()
    return LayerFactors(
        "transformer.h.0.mlp.c_fc",
        q_a=torch.eye(i),
        lambda_a=torch.ones(i),
        q_g=torch.eye(o),
        lambda_g=torch.ones(o),
        corrected=corrected,
    )


def test_usual_regularizations_are_accepted_on_gpt2_small_widths_in_float32():
    factors = _c_fc_factors()
    values = factors.corrected.double()
    mean, largest = float(values.mean()), float(values.max())
    for regularization in (0.1 * mean, 1e-3 * mean, 1e-9 * largest):
        check_layer_positive(factors, regularization, True, "EkfacInfluence")  # no refusal
    # regularization=0 with a direction of zero curvature is refused, suggesting 0.1 x the mean
    zero = LayerFactors(
        factors.name, factors.q_a, factors.lambda_a, factors.q_g, factors.lambda_g, factors.corrected.clone()
    )
    zero.corrected[5, 7] = 0.0
    with pytest.raises(NotPositiveDefiniteError) as info:
        check_layer_positive(zero, 0.0, True, "EkfacInfluence")
    suggestion = float(f"{0.1 * float(zero.corrected.double().mean()):.1g}")
    assert info.value.suggested_regularization == suggestion
    assert f"regularization={suggestion:g} (0.1 x the mean eigenvalue)" in str(info.value)
    assert "layer 'transformer.h.0.mlp.c_fc'" in str(info.value)


@pytest.mark.slow
def test_a_c_fc_sized_float32_fit_is_not_refused_after_the_fact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 3072), nn.Tanh(), nn.Linear(3072, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 768, generator=g), torch.randint(0, 3, (48,), generator=g)
    solver = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=1e-6).fit((x, y))
    assert solver.is_fitted
    scores = solver.self_influences(x[:4], y[:4])
    assert torch.isfinite(scores).all() and bool((scores > 0).all())


class _UntiedLm(nn.Module):
    def __init__(self, vocab: int, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(input_ids)))


@pytest.mark.slow
def test_an_untied_lm_head_of_the_real_vocabulary_keeps_its_output_factor_diagonal():
    """The LM head's G is V x V = 50,257^2: 20 GB of float64 sums (60.6 GB with its eigendecomposition)."""
    model = _UntiedLm(50257).eval()
    ids = torch.randint(0, 50257, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"keeps the G of layer 'head' \(50,257 x 50,257: 60,618,385,176 bytes"):
        solver = EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.01, memory_budget=2_000_000_000)
    assert solver.memory_.fixed < 50_000_000
    solver.fit({"input_ids": ids})
    embed, head = solver.state_.layers
    assert embed.q_a is None and embed.q_g is not None  # one-hot inputs: A diagonal by nature
    assert head.q_g is None and head.q_a is not None  # the memory fallback: G diagonal
    scores = solver.influences({"input_ids": ids[:2]}, {"input_ids": ids})
    assert scores.shape == (2, 4) and bool((scores.diagonal() > 0).all())
