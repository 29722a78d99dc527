"""Transformers (Hugging Face models built from a config, nothing downloaded) against a dense
reference computed here: the Hessian of the mean training loss by ``torch.func`` over the
flat parameters, the per-sample gradients one sample at a time by autograd.
"""

import pytest
import torch
from torch.func import functional_call, grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import dask_influence as di
from cases import tiny_bert, tiny_gpt2

transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(0, 16, (14, 6))
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0  # a padded sequence
    mask[7, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def _tiny_bert():
    model, ids, labels = tiny_bert()
    mask = torch.ones_like(ids)
    mask[2, 3:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rows(batch, start, stop):
    return {k: v[start:stop] for k, v in batch.items()}


def _dense_reference(model, task_loss, train, test, lam):
    """``g_test (H + lam I)^-1 g_train^T`` with H and the gradients computed here, plainly."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_at(t, batch):
        params, at = {}, 0
        for name, p in named:
            params[name] = t[at : at + p.numel()].view(p.shape)
            at += p.numel()
        return task_loss(lambda **kw: functional_call(model, params, (), kw), batch)

    n = train["input_ids"].shape[0]
    with sdpa_kernel(SDPBackend.MATH):
        h = jacrev(grad(lambda t: loss_at(t, train)))(theta)
    h = 0.5 * (h + h.T)
    g_train = torch.stack([grad(loss_at)(theta, _rows(train, i, i + 1)) for i in range(n)])
    g_test = torch.stack([grad(loss_at)(theta, _rows(test, i, i + 1)) for i in range(test["input_ids"].shape[0])])
    eye = torch.eye(len(theta), dtype=h.dtype)
    smallest = float(torch.linalg.eigvalsh(h)[0])
    lam = max(lam, -smallest + 0.05)  # H at a random initialization may be indefinite
    return g_test @ torch.linalg.solve(h + lam * eye, g_train.T), lam


def _lm_loss(call, batch):
    logits = call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets, weight = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].double()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).reshape(targets.shape)
    return ((ce * weight).sum(1) / weight.sum(1)).mean()


def _cls_loss(call, batch):
    logits = call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


@pytest.fixture(scope="module")
def gpt2():
    model, train = _tiny_gpt2()
    test = _rows(train, 0, 3)
    expected, lam = _dense_reference(model, _lm_loss, train, test, 0.1)
    return model, train, test, expected, lam


@pytest.fixture(scope="module")
def bert():
    model, train = _tiny_bert()
    test = _rows(train, 0, 3)
    expected, lam = _dense_reference(model, _cls_loss, train, test, 0.1)
    return model, train, test, expected, lam


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_gpt2_cg_equals_the_dense_reference(gpt2):
    model, train, test, expected, lam = gpt2
    solver = di.CgInfluence(model, di.tasks.causal_lm(), regularization=lam, rtol=1e-12, maxiter=2000)
    solver.fit(train)
    assert _rel(solver.influences(test, train), expected) < 1e-6


def test_gpt2_arnoldi_at_full_rank_equals_the_dense_reference(gpt2):
    model, train, test, expected, lam = gpt2
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    solver = di.ArnoldiInfluence(model, di.tasks.causal_lm(), regularization=lam, rank=p, krylov_dimension=p)
    solver.fit(train)
    assert _rel(solver.influences(test, train), expected) < 1e-6


def test_bert_classifier_cg_equals_the_dense_reference(bert):
    model, train, test, expected, lam = bert
    solver = di.CgInfluence(model, di.tasks.classification(perturb=None), regularization=lam, rtol=1e-12, maxiter=2000)
    solver.fit(train)
    assert _rel(solver.influences(test, train), expected) < 1e-6


def test_gpt2_loss_is_the_mean_over_each_sequences_predicted_positions(gpt2):
    model, train, *_ = gpt2
    task = di.tasks.causal_lm()
    with torch.no_grad():
        mine = task.loss(model, train)
        reference = _lm_loss(lambda **kw: model(**kw), train)
        # labels with -100 at the padded positions mean the same thing
        labels = train["input_ids"].masked_fill(train["attention_mask"] == 0, -100)
        with_labels = task.loss(model, {**train, "labels": labels})
    assert abs(float(mine - reference)) < 1e-12
    assert abs(float(with_labels - reference)) < 1e-12


def test_gpt2_lm_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kronecker_basis(gpt2):
    """EK-FAC with the causal-LM task on GPT2LMHeadModel: the tied token embedding / LM head
    and the LayerNorms are left out (one warning); for every factored layer (Conv1D, the
    position embedding) the corrected eigenvalues are the exact GGN block's diagonal in the
    Kronecker eigenbasis, and gradients from the factors are torch.func's."""
    model, train, *_ = gpt2
    with pytest.warns(UserWarning, match=r"leaves out .*transformer\.wte\.weight"):
        ek = di.EkfacInfluence(model, di.tasks.causal_lm(), regularization=0.1, chunk_size=5)
    assert [layer.kind for layer in ek._layers] == ["embedding"] + ["conv1d"] * 4
    ek.fit(train)
    ggn = di.DirectInfluence(model, di.tasks.causal_lm(), regularization=0.1, curvature="ggn").fit(train).hessian
    for index, factors in enumerate(ek.state_.layers):
        order = ek._layers[index].to_matrix(torch.arange(ek.num_params)[None]).reshape(-1)
        block = ggn[order][:, order]
        q_a = torch.eye(factors.shape[1], dtype=block.dtype) if factors.q_a is None else factors.q_a
        q = torch.kron(factors.q_g.contiguous(), q_a.contiguous())
        expected = torch.diagonal(q.T @ block @ q).reshape(factors.shape)
        assert _rel(factors.corrected, expected) < 1e-10
    kept = torch.cat(
        [torch.arange(*span) for layer in ek._layers for span in (layer.weight, layer.bias) if span is not None]
    )
    grads = ek.per_sample_grads(train)
    assert _rel(ek.per_sample_grads_from_factors(train)[:, kept], grads[:, kept]) < 1e-12
