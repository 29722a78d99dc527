"""Tied weights (issue 29 item 3): GPT-2's token embedding ``wte`` and LM head ``lm_head`` share one
``(V, d)`` weight. What each solver and the gradient index do with it, on a tiny GPT-2, against the
exact dense GGN ``J^T H_out J`` computed here by autograd."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.func import hessian, jacrev

import dask_influence as di
from cases import tiny_gpt2
from dask_influence.core.solvers import ekfac as ekfac_module
from dask_influence.core.solvers.ekfac import EkfacInfluence
from dask_influence.index.projector import Projector

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # the dense GGN references and LiSSA's iterations: about 2 minutes on the loaded machine

V, D, LAM = 48, 16, 0.1
TIED = "transformer.wte.weight"


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.reshape(-1).numpy(), b.reshape(-1).numpy())[0, 1])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def tied():
    """A 1-layer GPT-2 (V = 48, n_embd 16, float64) with lm_head tied to wte; 12 training
    sequences of 6 tokens, 3 test sequences; Direct with the exact GGN."""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=8, attn_implementation="eager")
    assert model.lm_head.weight is model.transformer.wte.weight
    g = torch.Generator().manual_seed(1)
    train = {"input_ids": torch.randint(0, V, (12, 6), generator=g)}
    test = {"input_ids": torch.randint(0, V, (3, 6), generator=g)}
    task = di.tasks.causal_lm()
    direct = di.DirectInfluence(model, task, regularization=LAM, curvature="ggn").fit(train)
    return model, task, train, test, direct, direct.influences(test, train)


def _span(solver) -> slice:
    (start, stop) = next((s, e) for name, s, e in solver._functions.spec.offsets() if name == TIED)
    return slice(start, stop)


def test_direct_ggn_is_the_autograd_dense_ggn_with_both_uses_of_the_tied_weight(tied):
    """The flat parameter holds the tied weight ONCE; Direct's GGN equals ``J^T H_out J`` by
    jacrev and autograd's Hessian, and its tied block is not the head use's alone."""
    model, task, train, _, direct, _ = tied
    unique = sum(p.numel() for p in model.parameters())  # named_parameters counts the shared weight once
    assert direct.num_params == unique
    functions, theta = direct._functions, direct.trained_parameters()
    outputs = functions.outputs(theta, train).detach()
    jac = jacrev(lambda t: functions.outputs(t, train))(theta).reshape(outputs.numel(), -1)
    h_out = hessian(lambda o: task.output_loss(o.reshape(outputs.shape), train))(outputs.reshape(-1))
    dense = jac.T @ h_out @ jac
    assert _rel(direct.hessian, dense) < 1e-10
    # the head use alone: the Jacobian through lm_head only (wte's input use held fixed)
    span = _span(direct)
    weight = model.lm_head.weight
    hidden = model.transformer(**train).last_hidden_state.detach()

    def head_only(w: torch.Tensor) -> torch.Tensor:
        return (hidden @ w.reshape(weight.shape).T).reshape(-1)

    j_head = jacrev(head_only)(weight.detach().reshape(-1))
    head_block = j_head.T @ h_out @ j_head
    assert _rel(head_block, direct.hessian[span, span]) > 0.05  # the embedding use adds curvature


@pytest.mark.parametrize("method", ["cg", "arnoldi", "nystroem", "lissa"])
def test_flat_solvers_include_both_uses_and_match_direct(tied, method):
    """CG, Arnoldi and Nystroem (full rank) and LiSSA see one flat parameter: their GGN products
    include both uses, and their influences equal Direct's exact-GGN influences."""
    model, task, train, test, direct, expected = tied
    p = direct.num_params
    solver = {
        "cg": lambda: di.CgInfluence(model, task, regularization=LAM, curvature="ggn", rtol=1e-12, maxiter=500),
        "arnoldi": lambda: di.ArnoldiInfluence(model, task, regularization=LAM, curvature="ggn", rank=p),
        "nystroem": lambda: di.NystroemSketchInfluence(model, task, regularization=LAM, curvature="ggn", rank=p),
        "lissa": lambda: di.LissaInfluence(model, task, regularization=LAM, curvature="ggn", maxiter=3000, rtol=1e-9),
    }[method]().fit(train)
    got = solver.influences(test, train)
    assert _rel(got, expected) < (1e-3 if method == "lissa" else 1e-7)


def test_ekfac_exclude_leaves_the_tied_weight_out_and_says_how_to_factor_it(tied):
    model, task, train, test, direct, expected = tied
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ek = EkfacInfluence(model, task, regularization=LAM)  # tied="exclude", the default
    messages = [str(w.message) for w in record if "EK-FAC" in str(w.message)]
    assert len(messages) == 1
    assert f"'{TIED}' is tied (shared by 'transformer.wte' and 'lm_head'): pass tied='head'" in messages[0]
    assert [layer.name for layer in ek._layers][:1] == ["transformer.wpe"]
    ek.fit(train)
    factors = ek.influence_factors(test)
    assert bool((factors[:, _span(ek)] == 0).all())
    pearson = _pearson(ek.influences(test, train), expected)
    assert 0.2 < pearson < 0.5  # 0.35 measured: the tied weight's curvature and gradients are missing


def test_ekfac_tied_head_factors_the_lm_head_use_and_counts_both_gradients(tied):
    """tied="head": one warning names the tied weight; the layer is 'lm_head' (A d x d from the head's
    inputs, the vocabulary side G diagonal); gradients from the factors are torch.func's on the tied
    weight (both uses); the corrected eigenvalues are the exact GGN block's diagonal in the basis
    (both uses); influences track Direct's far better than with the weight left out."""
    model, task, train, test, direct, expected = tied
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ek = EkfacInfluence(model, task, regularization=LAM, tied="head", fisher="exact")
    notes = [str(w.message) for w in record if "factors the tied parameter" in str(w.message)]
    assert notes == [
        f"EK-FAC factors the tied parameter '{TIED}' (shared by 'transformer.wte' and 'lm_head') through its "
        "'lm_head' use (tied='head'): K-FAC's factors come from the head's inputs and output gradients, with "
        "the vocabulary side (48) kept DIAGONAL; the 'transformer.wte' use's gradient is still counted in every "
        "gradient and in the corrected eigenvalues. tied='exclude' leaves it out instead."
    ]
    head = ek._layers[0]
    assert (head.name, head.kind, head.shape, head.tied_use.name) == ("lm_head", "linear", (V, D), "transformer.wte")
    assert ("lm_head", "G") in ek._diagonal
    ek.fit(train)
    span = _span(ek)
    grads = ek.per_sample_grads(train)
    assert _rel(ek.per_sample_grads_from_factors(train)[:, span], grads[:, span]) < 1e-12
    f = ek.state_.layers[0]
    assert f.q_g is None and f.q_a.shape == (D, D)
    order = head.to_matrix(torch.arange(ek.num_params)[None]).reshape(-1)
    block = direct.hessian[order][:, order].reshape(V, D, V, D)
    within = torch.einsum("ojok->ojk", block)  # the diagonal G: the (o, o) blocks
    expected_diag = torch.einsum("ji,ojk,ki->oi", f.q_a, within, f.q_a)
    assert _rel(f.corrected, expected_diag) < 1e-10
    scores = ek.influences(test, train)
    pearson = _pearson(scores, expected)
    assert pearson > 0.85  # 0.886 measured (0.350 with tied="exclude")
    # the layer-by-layer scoring of large models (tied_layer_grads in up_contract / self_contract) agrees
    original = ekfac_module.FLAT_SCORING_MAX_PARAMS
    try:
        ekfac_module.FLAT_SCORING_MAX_PARAMS = 0
        assert _rel(ek.influences(test, train), scores) < 1e-10
    finally:
        ekfac_module.FLAT_SCORING_MAX_PARAMS = original
    assert _rel(ek.self_influences(train), ek.influences(train, train).diagonal()) < 1e-10


def test_ekfac_tied_head_saves_and_loads_its_choice(tied, tmp_path):
    model, task, train, test, *_ = tied
    with pytest.warns(UserWarning, match="factors the tied parameter"):
        ek = EkfacInfluence(model, task, regularization=LAM, tied="head", fisher="sampled").fit(train)
    ek.save(tmp_path / "ekfac.pt")
    with pytest.warns(UserWarning, match="factors the tied parameter"):
        loaded = EkfacInfluence.load(tmp_path / "ekfac.pt", model, task)
    assert loaded.config.tied == "head" and loaded._layers[0].name == "lm_head"
    assert _rel(loaded.influences(test, train), ek.influences(test, train)) < 1e-12


def test_ekfac_tied_head_with_the_sampled_fisher_and_a_refused_layer_choice(tied):
    model, task, train, test, _, expected = tied
    with pytest.warns(UserWarning, match="factors the tied parameter"):
        ek = EkfacInfluence(model, task, regularization=LAM, tied="head", fisher="sampled", fisher_draws=16)
    ek.fit(train)
    assert _pearson(ek.influences(test, train), expected) > 0.85  # 0.884 measured with 16 draws
    with pytest.raises(ValueError, match="layers names 'transformer.wte', whose weight 'transformer.wte.weight' is"):
        EkfacInfluence(model, task, regularization=LAM, tied="head", layers=["transformer.wte"])
    with pytest.raises(ValueError, match="tied must be 'exclude' or 'head'; got 'lm_head'"):
        EkfacInfluence(model, task, regularization=LAM, tied="lm_head")


def test_gradient_index_sjlt_projects_both_uses_and_kronecker_leaves_the_tied_weight_out(tied):
    """The index today: projection='sjlt' projects the whole flat gradient (the tied weight's
    gradient through both uses); projection='kronecker' leaves the tied weight out, saying so."""
    model, task, train, *_ = tied
    sjlt = Projector(model, task, "sjlt", 32, seed=3)
    grads = sjlt.functions.per_sample_grads(sjlt.theta, sjlt.batch(train))
    dense = (grads @ sjlt.columns(0, sjlt.dim)).numpy()
    got = sjlt.project(train)
    assert np.abs(got - dense).max() < 1e-10 * np.abs(dense).max()
    with pytest.warns(UserWarning, match=r"left out of the index.*transformer\.wte\.weight"):
        kron = Projector(model, task, "kronecker", 32, seed=3)
    assert "lm_head" not in [layer.name for layer in kron.layers]


class _TiedBiasLm(torch.nn.Module):
    """An embedding and an LM head WITH a bias of its own, the head's weight tied to the embedding's."""

    def __init__(self, vocab: int = 11, width: int = 5):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


def test_ekfac_tied_head_with_its_own_bias_gives_torch_func_gradients():
    """The head's bias column gets nothing from the embedding's use (tied_layer_grads):
    gradients from the factors equal torch.func's on the tied weight and the bias."""
    model = _TiedBiasLm().double()
    ids = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match="factors the tied parameter 'embed.weight'"):
        ek = EkfacInfluence(model, di.tasks.causal_lm(), regularization=LAM, tied="head", fisher="exact")
    assert [(layer.name, layer.shape) for layer in ek._layers] == [("head", (11, 6)), ("mix", (5, 6))]
    ek.fit({"input_ids": ids})
    grads = ek.per_sample_grads({"input_ids": ids})
    assert _rel(ek.per_sample_grads_from_factors({"input_ids": ids}), grads) < 1e-12


def _joined_positions(head, use, r):
    """The reference: both uses of the tied weight as positions of the head, ``(g (n, P + Q, V),
    a (n, P + Q, i))``: the embedding's one-hot inputs as output gradients and its output
    gradients as inputs (zero in the head's bias column), so that ``layer_grads`` of them is the
    whole per-sample gradient (the joined form the library used before ``tied_layer_grads``)."""
    g_head, a_head = head
    g_use, a_use = use
    rows = torch.nn.functional.pad(g_use[:, r], (0, a_head.shape[-1] - g_use.shape[-1]))
    return torch.cat([g_head[:, r], a_use], dim=1), torch.cat([a_head, rows], dim=1)


def test_tied_layer_grads_equal_the_joined_positions_product():
    """The tied head's per-sample gradient with the embedding's share scattered into token rows
    equals the product over the joined positions (the one-hot inputs as output gradients), with a
    padding position (all-zero one-hot) and a head bias column."""
    from dask_influence.core.kronecker import layer_grads, tied_layer_grads

    g = torch.Generator().manual_seed(3)
    n, r, p, q, vocab, d = 3, 2, 5, 4, 11, 6
    g_head = torch.randn(n, r, p, vocab, generator=g, dtype=torch.float64)
    a_head = torch.randn(n, p, d + 1, generator=g, dtype=torch.float64)  # d inputs and the bias's 1
    g_use = torch.randn(n, r, q, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, vocab, (n, q), generator=g)
    ids[0, 1] = ids[0, 2]  # a token seen twice in one sample adds both rows
    a_use = torch.nn.functional.one_hot(ids, vocab).to(torch.float64)
    a_use[1, 3] = 0.0  # padding
    for vector in range(r):
        joined = layer_grads(*_joined_positions((g_head, a_head), (g_use, a_use), vector))
        fast = tied_layer_grads((g_head, a_head), (g_use, a_use), vector)
        torch.testing.assert_close(fast, joined, rtol=1e-12, atol=1e-12)
        basis = torch.linalg.qr(torch.randn(d + 1, d + 1, generator=g, dtype=torch.float64))[0]
        rotated = tied_layer_grads((g_head, a_head), (g_use, a_use), vector, inputs_basis=basis)
        torch.testing.assert_close(rotated, joined @ basis, rtol=1e-12, atol=1e-12)


def test_drawn_labels_follow_the_probabilities_and_each_sample_its_own_generator():
    """Inverse-CDF draws: frequencies within sampling noise of p (total variation over 20,000
    draws of 50 classes well under 0.05), and drawing rows in groups with one generator per group
    gives each group the draws it gets alone."""
    from dask_influence.core.sampled_fisher import draw_categorical

    p = torch.softmax(torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2, -1)
    labels = draw_categorical(p.expand(20_000, 50).contiguous(), 1, torch.Generator().manual_seed(1))
    freq = torch.bincount(labels.flatten(), minlength=50).double() / 20_000
    assert 0.5 * float((freq - p[0].double()).abs().sum()) < 0.05
    rows = torch.softmax(torch.randn(6, 50, generator=torch.Generator().manual_seed(2)), -1)
    grouped = draw_categorical(rows, 3, [torch.Generator().manual_seed(s) for s in (10, 11)])
    alone = [draw_categorical(rows[3 * j : 3 * j + 3], 3, torch.Generator().manual_seed(10 + j)) for j in range(2)]
    assert torch.equal(grouped, torch.cat(alone))
