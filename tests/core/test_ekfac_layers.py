"""EK-FAC on transformer layers: Hugging Face ``Conv1D``, ``nn.Embedding``, and left-out parameters.

Ground truth as in test_ekfac.py: dense GGN/Hessian of the mean loss from DirectInfluence and
per-sample gradients from ``torch.func`` (``per_sample_grads``), never the solver's own
Kronecker code. Float64 throughout; errors are relative to the largest reference entry.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cases import tiny_gpt2_config
from dask_influence.core.solvers.direct import DirectInfluence
from dask_influence.core.solvers.ekfac import EkfacInfluence, left_out_parameters

DT = torch.float64
LEFT_OUT = "EK-FAC leaves out"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def layer_block(solver: EkfacInfluence, index: int, dense: torch.Tensor) -> torch.Tensor:
    """The block of a flat ``(p, p)`` matrix for one layer, in the layer's row-major ``(o, i)`` order of ``M``."""
    order = solver._layers[index].to_matrix(torch.arange(solver.num_params)[None]).reshape(-1)
    return dense[order][:, order]


def kron_diag(factors, block: torch.Tensor) -> torch.Tensor:
    """``diag(Q^T B Q)`` with ``Q = Q_G (x) Q_A`` (``Q_A = I`` when ``q_a`` is None), as ``(o, i)``."""
    q_a = torch.eye(factors.shape[1], dtype=DT) if factors.q_a is None else factors.q_a
    q = torch.kron(factors.q_g.contiguous(), q_a.contiguous())
    return torch.diagonal(q.T @ block @ q).reshape(factors.shape)


def no_left_out_warning(build):
    """``build()`` with the left-out warning turned into an error (it must not be emitted)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=LEFT_OUT)
        return build()


def left_out_warnings(record) -> list[str]:
    return [str(w.message) for w in record if LEFT_OUT in str(w.message)]


# -- Hugging Face Conv1D ----------------------------------------------------------------------------
def conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(nf, nx)


def test_conv1d_is_recognized_without_transformers_imports():
    """Detection reads the class name and module: kronecker.py does not import transformers."""
    from dask_influence.core import kronecker

    layer = conv1d(3, 4)
    assert kronecker.layer_kind(layer) == "conv1d"
    assert "transformers" not in kronecker.__dict__

    class Conv1D(nn.Module):  # a look-alike outside transformers is not supported
        def __init__(self):
            super().__init__()
            self.nf, self.weight = 3, nn.Parameter(torch.zeros(4, 3))

    assert kronecker.layer_kind(Conv1D()) is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1e-7])  # 1e-7: near-uniform softmax predictions
@pytest.mark.parametrize("update_diagonal", [False, True])
def test_conv1d_single_sample_cross_entropy_is_exact(bias, scale, update_diagonal):
    """On ONE sample of a lone Conv1D with cross-entropy, K-FAC and EK-FAC are exact.

    Why (as for nn.Linear, test_ekfac.py): the layer is linear in ``M = W^T``, so the
    sample's GGN (= Hessian) is ``H_out (x) a a^T = G (x) A``; EK-FAC's eigenvalues are the
    diagonal of that matrix in its own eigenbasis. This also checks that the transposed
    storage is read and written in the right order (a wrong order permutes the blocks).
    """
    torch.manual_seed(1)
    model = conv1d(3, 4).to(DT).eval()
    with torch.no_grad():
        model.weight.mul_(50 * scale)  # Conv1D's init has std 0.02: make the logits O(1)
        model.bias.normal_().mul_(scale)
    model.bias.requires_grad_(bias)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 4, generator=g, dtype=DT), torch.randint(0, 3, (1,), generator=g)
    x_test, y_test = torch.randn(5, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    loss = nn.CrossEntropyLoss()
    ek = EkfacInfluence(model, loss, regularization=1e-3, update_diagonal=update_diagonal).fit((x, y))
    assert ek._layers[0].kind == "conv1d" and ek.state_.layers[0].shape == (3, 4 + bias)
    for curvature in ("ggn", "hessian"):
        direct = DirectInfluence(model, loss, regularization=1e-3, curvature=curvature).fit((x, y))
        assert rel_err(ek.curvature_matrix(), direct.hessian) < 1e-10
        assert rel_err(ek.influence_factors(x_test, y_test), direct.influence_factors(x_test, y_test)) < 1e-9
        assert rel_err(ek.influences(x_test, y_test, x, y), direct.influences(x_test, y_test, x, y)) < 1e-9


class Conv1dNet(nn.Module):
    """GPT-2-style: Conv1D at every position of a sequence ``(n, T, 4)``, mean-pooled, Conv1D head."""

    def __init__(self):
        super().__init__()
        self.c_fc = conv1d(5, 4)
        self.c_proj = conv1d(3, 5)
        with torch.no_grad():
            for layer in (self.c_fc, self.c_proj):
                layer.weight.mul_(25)
                layer.bias.normal_()

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)).mean(1))


def test_conv1d_eigenvalues_are_the_exact_ggn_diagonal_and_gradients_from_factors_are_exact(scoring):
    """Per-sample gradients ``sum_t g_t a_t^T`` written back through the transposed layout equal
    ``torch.func``'s; EK-FAC's eigenvalues are ``diag(Q^T B Q)`` of the exact GGN block ``B``
    of each layer, and EK-FAC is no further from ``B`` than K-FAC (25 samples of 6 positions,
    ragged batches, chunks of 4)."""
    torch.manual_seed(3)
    model = Conv1dNet().to(DT).eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(25, 6, 4, generator=g, dtype=DT), torch.randint(0, 3, (25,), generator=g)
    batches = [(x[s : s + 10], y[s : s + 10]) for s in range(0, 25, 10)]
    loss = nn.CrossEntropyLoss()
    ek = EkfacInfluence(model, loss, regularization=0.1, chunk_size=4).fit(batches)
    kf = EkfacInfluence(model, loss, regularization=0.1, update_diagonal=False).fit(batches)
    assert rel_err(ek.per_sample_grads_from_factors(x, y), ek.per_sample_grads(x, y)) < 1e-12
    ggn = DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(batches).hessian
    for index, factors in enumerate(ek.state_.layers):
        block = layer_block(ek, index, ggn)
        assert rel_err(factors.corrected, kron_diag(factors, block)) < 1e-10
        error_ek = torch.linalg.norm(layer_block(ek, index, ek.curvature_matrix()) - block)
        error_kf = torch.linalg.norm(layer_block(kf, index, kf.curvature_matrix()) - block)
        assert error_ek <= error_kf * (1 + 1e-12)
    factors = ek.influence_factors(x[:3], y[:3])
    assert rel_err(ek.influences_from_factors(factors, x, y), factors @ ek.per_sample_grads(x, y).T) < 1e-12
    assert rel_err(ek.self_influences(x, y), torch.diagonal(ek.influences(x, y))) < 1e-12


class LinearNet(nn.Module):
    """Conv1dNet with nn.Linear layers holding the transposed weights."""

    def __init__(self, other: Conv1dNet):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(4, 5), nn.Linear(5, 3)
        with torch.no_grad():
            for mine, theirs in ((self.c_fc, other.c_fc), (self.c_proj, other.c_proj)):
                mine.weight.copy_(theirs.weight.T)
                mine.bias.copy_(theirs.bias)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)).mean(1))


@pytest.mark.parametrize("update_diagonal", [False, True])
def test_conv1d_gives_the_influences_of_the_equivalent_linear(update_diagonal, scoring):
    """A Conv1D model and the nn.Linear model with the transposed weights have the same
    factors A and G, the same influences and self-influences, and influence factors that
    are the same numbers in the two storage orders."""
    torch.manual_seed(5)
    conv = Conv1dNet().to(DT).eval()
    lin = LinearNet(conv).to(DT).eval()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(17, 3, 4, generator=g, dtype=DT), torch.randint(0, 3, (17,), generator=g)
    loss = nn.CrossEntropyLoss()
    kwargs = dict(regularization=0.05, update_diagonal=update_diagonal, chunk_size=5)
    a = EkfacInfluence(conv, loss, **kwargs).fit((x, y))
    b = EkfacInfluence(lin, loss, **kwargs).fit((x, y))
    for fa, fb in zip(a.state_.layers, b.state_.layers):
        assert rel_err(fa.a_factor, fb.a_factor) < 1e-12 and rel_err(fa.g_factor, fb.g_factor) < 1e-12
    assert rel_err(a.influences(x[:4], y[:4], x, y), b.influences(x[:4], y[:4], x, y)) < 1e-10
    assert rel_err(a.self_influences(x, y), b.self_influences(x, y)) < 1e-10
    fa, fb = a.influence_factors(x[:4], y[:4]), b.influence_factors(x[:4], y[:4])
    for la, lb in zip(a._layers, b._layers):
        assert rel_err(la.to_matrix(fa), lb.to_matrix(fb)) < 1e-10
    # the weight in the flat vector: Conv1D stores (d_in, d_out), Linear (d_out, d_in)
    w = a._layers[0].weight
    assert rel_err(fa[:, w[0] : w[1]].reshape(4, 4, 5), fb[:, w[0] : w[1]].reshape(4, 5, 4).transpose(1, 2)) < 1e-10


# -- nn.Embedding -----------------------------------------------------------------------------------------
V, D, T, C = 7, 3, 5, 4


class EmbedNet(nn.Module):
    """Token ids ``(n, T)`` -> ``nn.Embedding(V, D)`` -> mean or flatten over positions -> ``Linear`` -> C classes."""

    def __init__(self, pool: str, **embedding_args):
        super().__init__()
        self.embed = nn.Embedding(V, D, **embedding_args)
        self.pool = pool
        self.head = nn.Linear(D if pool == "mean" else T * D, C)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(h.mean(1) if self.pool == "mean" else h.flatten(1))


def tokens(n: int, seed: int, *, unused: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, T)`` in ``[0, V)`` (never ``unused``), labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T), generator=g)
    if unused is not None:
        x[x == unused] = (unused + 1) % V
    return x, torch.randint(0, C, (n,), generator=g)


def embed_model(pool: str = "mean", seed: int = 7, **embedding_args) -> EmbedNet:
    torch.manual_seed(seed)
    return EmbedNet(pool, **embedding_args).to(DT).eval()


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_embedding_gradients_from_factors_and_eigenvalues_are_exact(pool, padding_idx, scoring):
    """For an embedding, the input at a position is the one-hot of its token (zero for
    ``padding_idx``), so ``A`` is diagonal: the token frequencies per position. Checked:

    - ``A`` is kept diagonal (``q_a is None``) and equals the brute-force counts / (n T),
      zero for the padding token and for a token that never occurs (6 here);
    - per-sample gradients from factors equal ``torch.func``'s (the padding row's is zero
      in both);
    - EK-FAC's eigenvalues are the exact GGN block's diagonal in the basis ``Q_G (x) I``;
    - the factored up-influence equals the flat one, self-influences the diagonal.
    """
    model = embed_model(pool, padding_idx=padding_idx)
    x, y = tokens(21, seed=8, unused=6)
    x[:3, :2] = 0  # the padding token (when padding_idx=0) occurs in some samples
    loss = nn.CrossEntropyLoss()
    ek = EkfacInfluence(model, loss, regularization=0.05, chunk_size=4).fit((x, y))
    emb = ek.state_.layers[0]
    assert ek._layers[0].kind == "embedding" and emb.name == "embed"
    assert emb.q_a is None and emb.shape == (D, V)
    counts = torch.bincount(x.reshape(-1), minlength=V).to(DT) / x.numel()
    if padding_idx is not None:
        counts[padding_idx] = 0
    assert rel_err(emb.lambda_a, counts) < 1e-14
    assert emb.lambda_a[6] == 0
    grads = ek.per_sample_grads(x, y)
    assert rel_err(ek.per_sample_grads_from_factors(x, y), grads) < 1e-12
    if padding_idx is not None:
        w = ek._layers[0].weight
        assert torch.all(grads[:, w[0] : w[1]].reshape(21, V, D)[:, padding_idx] == 0)
    ggn = DirectInfluence(model, loss, regularization=0.05, curvature="ggn").fit((x, y)).hessian
    for index, factors in enumerate(ek.state_.layers):
        assert rel_err(factors.corrected, kron_diag(factors, layer_block(ek, index, ggn))) < 1e-10
    factors = ek.influence_factors(x[:5], y[:5])
    assert rel_err(ek.influences_from_factors(factors, x, y), factors @ grads.T) < 1e-12
    assert rel_err(ek.self_influences(x, y), torch.diagonal(ek.influences(x, y))) < 1e-12


@pytest.mark.parametrize("update_diagonal", [False, True])
def test_embedding_lookup_single_sample_is_exact(update_diagonal):
    """A bare embedding whose rows are the logits (``x`` of shape ``(n,)``, one token per
    sample): on ONE sample the GGN (= Hessian, the model being linear in ``W``) is
    ``H_out (x) e_v e_v^T``, exactly ``G (x) A`` with a diagonal ``A``."""
    torch.manual_seed(9)
    model = nn.Embedding(V, C).to(DT).eval()
    x, y = torch.tensor([3]), torch.tensor([1])
    x_test, y_test = torch.tensor([3, 0, 3, 5]), torch.tensor([0, 1, 2, 3])
    loss = nn.CrossEntropyLoss()
    ek = EkfacInfluence(model, loss, regularization=1e-3, update_diagonal=update_diagonal).fit((x, y))
    assert ek.state_.layers[0].q_a is None
    for curvature in ("ggn", "hessian"):
        direct = DirectInfluence(model, loss, regularization=1e-3, curvature=curvature).fit((x, y))
        assert rel_err(ek.curvature_matrix(), direct.hessian) < 1e-10
        assert rel_err(ek.influence_factors(x_test, y_test), direct.influence_factors(x_test, y_test)) < 1e-9
        assert rel_err(ek.influences(x_test, y_test, x, y), direct.influences(x_test, y_test, x, y)) < 1e-9


def test_embedding_state_is_small_and_saves(tmp_path):
    """The embedding's ``A`` is stored as its diagonal ``(V,)``, with no ``(V, V)`` eigenbasis,
    and the fitted state (``q_a=None``) survives save/load and pickling."""
    import pickle

    model = embed_model()
    x, y = tokens(12, seed=10)
    ek = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    sizes = [(D, V, True), (C, D + 1, False)]  # (o, i, diagonal A)
    expected = sum(o * o + o + (i if diag else i * i + i) + o * i for o, i, diag in sizes) * 8
    assert ek.state_.nbytes == expected
    path = tmp_path / "ekfac.pt"
    ek.save(path)
    loaded = EkfacInfluence.load(path, embed_model(), nn.CrossEntropyLoss(), train=(x, y))
    assert loaded.state_.layers[0].q_a is None
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), ek.influences(x[:3], y[:3], x, y))
    clone = pickle.loads(pickle.dumps(ek))
    assert torch.equal(clone.influences(x[:3], y[:3], x, y), ek.influences(x[:3], y[:3], x, y))


@pytest.mark.parametrize(
    "args,match", [(dict(max_norm=1.0), "max_norm"), (dict(scale_grad_by_freq=True), "scale_grad")]
)
def test_embedding_settings_that_change_the_gradient_are_refused(args, match):
    model = embed_model(**args)
    with pytest.raises(ValueError, match=rf"'embed'.*{match}.*requires_grad_\(False\)"):
        EkfacInfluence(model, nn.CrossEntropyLoss())
    # left out of layers=, the embedding is not refused
    with pytest.warns(UserWarning, match=r"embed\.weight"):
        EkfacInfluence(model, nn.CrossEntropyLoss(), layers=["head"])


def test_sparse_embedding_is_refused_with_the_fix():
    """``sparse=True`` makes torch's weight gradient sparse, which ``torch.func`` cannot take per
    sample (DirectInfluence fails inside torch); the error names the fix, ``sparse = False``,
    after which the influences equal those of a dense embedding."""
    x, y = tokens(13, seed=11)
    model = embed_model(sparse=True)
    with pytest.raises(ValueError, match=r"'embed'.*sparse=True.*get_submodule\('embed'\)\.sparse = False"):
        EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1)
    with pytest.raises(ValueError, match="sparse=True"):  # also when it would be left out
        EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, layers=["head"])
    model.embed.sparse = False
    fixed = EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    dense = EkfacInfluence(embed_model(), nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    assert torch.equal(fixed.influences(x[:3], y[:3], x, y), dense.influences(x[:3], y[:3], x, y))


# -- default layer selection: parameters EK-FAC cannot factor are left out ---------------------------------
class Block(nn.Module):
    """Embedding + position parameter, LayerNorm, attention, Linear head: a small transformer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 4)
        self.pos = nn.Parameter(0.1 * torch.randn(T, 4))
        self.ln = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        h = self.ln(self.embed(x) + self.pos)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


LEFT_OUT_OF_BLOCK = [
    "pos",
    "ln.weight",
    "ln.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
]


def block_model() -> Block:
    torch.manual_seed(12)
    return Block().to(DT).eval()


def freeze_left_out(model: Block) -> Block:
    for name in LEFT_OUT_OF_BLOCK:
        model.get_parameter(name).requires_grad_(False)
    return model


def test_default_selection_leaves_out_what_it_cannot_factor_as_if_frozen(scoring):
    """With ``layers=None`` the supported layers (embedding, head) are factored and the rest
    (a bare position parameter, LayerNorm, MultiheadAttention, whose out_proj Linear is never
    called) is left out: ONE warning names every left-out parameter; their entries of the
    influence factors and rows/columns of the curvature are exactly zero; and influences,
    self-influences and the other factor entries equal those of the same model with those
    parameters frozen (which warns nothing)."""
    x, y = tokens(15, seed=13)
    loss = nn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ek = EkfacInfluence(block_model(), loss, regularization=0.1, chunk_size=6)
    messages = left_out_warnings(record)
    assert len(messages) == 1
    assert f"leaves out {len(LEFT_OUT_OF_BLOCK)} trainable parameters" in messages[0]
    for name in LEFT_OUT_OF_BLOCK:
        assert name in messages[0]
    assert "freeze" in messages[0] and "layers=" in messages[0]
    assert [w.filename for w in record if LEFT_OUT in str(w.message)] == [__file__]  # the caller's line
    assert [layer.name for layer in ek._layers] == ["embed", "head"]
    assert left_out_parameters(ek._functions.spec, ek._layers) == LEFT_OUT_OF_BLOCK
    ek.fit((x, y))

    frozen = no_left_out_warning(
        lambda: EkfacInfluence(freeze_left_out(block_model()), loss, regularization=0.1, chunk_size=6).fit((x, y))
    )
    names = ek._functions.spec.names
    offsets = {name: (start, stop) for name, start, stop in ek._functions.spec.offsets()}
    kept = torch.cat([torch.arange(*offsets[n]) for n in names if n not in LEFT_OUT_OF_BLOCK])
    dropped = torch.cat([torch.arange(*offsets[n]) for n in LEFT_OUT_OF_BLOCK])
    assert frozen.num_params == kept.numel()

    factors = ek.influence_factors(x[:4], y[:4])
    assert torch.all(factors[:, dropped] == 0)
    assert rel_err(factors[:, kept], frozen.influence_factors(x[:4], y[:4])) < 1e-12
    curvature = ek.curvature_matrix()
    assert torch.all(curvature[dropped] == 0) and torch.all(curvature[:, dropped] == 0)
    assert rel_err(curvature[kept][:, kept], frozen.curvature_matrix()) < 1e-12
    assert rel_err(ek.influences(x[:4], y[:4], x, y), frozen.influences(x[:4], y[:4], x, y)) < 1e-12
    assert rel_err(ek.self_influences(x, y), frozen.self_influences(x, y)) < 1e-12


def test_explicit_layers_leave_out_the_rest_and_refuse_attention_projections():
    """``layers=[...]`` leaves every other trainable parameter out with the same single
    warning; naming MultiheadAttention's out_proj (used without its forward) or a LayerNorm
    is an error."""
    x, y = tokens(15, seed=14)
    loss = nn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ek = EkfacInfluence(block_model(), loss, regularization=0.1, layers=["head"]).fit((x, y))
    messages = left_out_warnings(record)
    assert len(messages) == 1 and "embed.weight" in messages[0] and "head.weight" not in messages[0]
    assert [f.name for f in ek.state_.layers] == ["head"]
    model = block_model()
    model.embed.requires_grad_(False)
    frozen = no_left_out_warning(
        lambda: EkfacInfluence(freeze_left_out(model), loss, regularization=0.1, layers=["head"]).fit((x, y))
    )
    assert rel_err(ek.influences(x[:4], y[:4], x, y), frozen.influences(x[:4], y[:4], x, y)) < 1e-12
    with pytest.raises(ValueError, match="'attn.out_proj'.*MultiheadAttention"):
        EkfacInfluence(block_model(), loss, layers=["attn.out_proj"])
    with pytest.raises(ValueError, match="'ln'.*LayerNorm.*supports only"):
        EkfacInfluence(block_model(), loss, layers=["ln"])


# -- a real (tiny) GPT-2 ---------------------------------------------------------------------------------
class TinyGpt2(nn.Module):
    """A one-block GPT-2 of transformers (Conv1D layers, token and position embeddings,
    LayerNorms) with a mean-pooled nn.Linear classification head, built from a config."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = tiny_gpt2_config(
            vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager"
        )
        self.gpt = transformers.GPT2Model(config)
        self.head = nn.Linear(8, C)

    def forward(self, ids):
        return self.head(self.gpt(input_ids=ids).last_hidden_state.mean(1))


def test_tiny_gpt2_factors_every_conv1d_and_embedding_exactly():
    """On GPT-2 itself the default selection factors both embeddings (``wpe`` is called with
    position ids ``(1, T)`` shared by the batch), the four Conv1D layers and the head, and
    leaves out the LayerNorms with one warning. Per-sample gradients from factors equal
    ``torch.func``'s on every factored parameter, EK-FAC's eigenvalues are the exact GGN
    blocks' diagonal in the Kronecker basis, and influences equal those of the model with
    the LayerNorms frozen."""
    torch.manual_seed(15)
    model = TinyGpt2().to(DT).eval()
    x, y = tokens(9, seed=16)
    loss = nn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ek = EkfacInfluence(model, loss, regularization=0.1, chunk_size=4)
    messages = left_out_warnings(record)
    assert len(messages) == 1 and "leaves out 6 trainable parameters" in messages[0]
    assert all(f"{ln}.{p}" in messages[0] for ln in ("h.0.ln_1", "h.0.ln_2", "ln_f") for p in ("weight", "bias"))
    assert [(layer.name, layer.kind) for layer in ek._layers] == [
        ("gpt.wte", "embedding"),
        ("gpt.wpe", "embedding"),
        ("gpt.h.0.attn.c_attn", "conv1d"),
        ("gpt.h.0.attn.c_proj", "conv1d"),
        ("gpt.h.0.mlp.c_fc", "conv1d"),
        ("gpt.h.0.mlp.c_proj", "conv1d"),
        ("head", "linear"),
    ]
    ek.fit((x, y))
    spec = ek._functions.spec
    left_out = set(left_out_parameters(spec, ek._layers))
    kept = torch.cat([torch.arange(start, stop) for name, start, stop in spec.offsets() if name not in left_out])
    grads = ek.per_sample_grads(x, y)
    assert rel_err(ek.per_sample_grads_from_factors(x, y)[:, kept], grads[:, kept]) < 1e-12
    ggn = DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit((x, y)).hessian
    for index, factors in enumerate(ek.state_.layers):
        assert rel_err(factors.corrected, kron_diag(factors, layer_block(ek, index, ggn))) < 1e-10
    for name in left_out:
        model.get_parameter(name).requires_grad_(False)
    frozen = no_left_out_warning(lambda: EkfacInfluence(model, loss, regularization=0.1, chunk_size=4).fit((x, y)))
    assert rel_err(ek.influences(x[:3], y[:3], x, y), frozen.influences(x[:3], y[:3], x, y)) < 1e-12
