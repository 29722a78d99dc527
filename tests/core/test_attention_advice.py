"""The attention advice of docs/tasks.md and of the vmap fallback warning, checked with the
installed transformers: ``attn_implementation`` goes in the config (the model's constructor
refuses it), GPT-2 built with it is vectorized, BERT with a 2-D padding mask falls back also
with it and is vectorized with the 4-D additive float mask, giving the same gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

import dask_influence as di

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # importing transformers' model classes takes ~9 s on the loaded 2-core machine

N, T, V = 6, 8, 30


def per_sample_grads(model, task, batch):
    """The per-sample gradients and whether vmap fell back to one sample at a time (its warning)."""
    solver = di.CgInfluence(model.eval(), task, regularization=1.0).fit(batch, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = solver.per_sample_grads(batch)
    fell_back = [str(w.message) for w in caught if "one sample at a time" in str(w.message)]
    return grads, fell_back


def test_attn_implementation_goes_in_the_config_not_the_model():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=T)
    with pytest.raises(TypeError, match="attn_implementation"):
        transformers.GPT2LMHeadModel(config, attn_implementation="eager")
    eager = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=T, attn_implementation="eager"
    )
    assert transformers.GPT2LMHeadModel(eager).config._attn_implementation == "eager"
    model = transformers.GPT2LMHeadModel(config)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_gpt2_from_an_eager_config_is_vectorized_and_sdpa_falls_back_with_the_advice():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": V, "n_positions": T}
    torch.manual_seed(1)
    sdpa = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))
    torch.manual_seed(1)
    eager = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs, attn_implementation="eager"))
    looped, fell_back = per_sample_grads(sdpa, di.tasks.causal_lm(), batch)
    assert len(fell_back) == 1
    assert "put attn_implementation='eager' in its config (GPT2Config(..., attn_implementation='eager')" in fell_back[0]
    assert "(1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min" in fell_back[0]
    vectorized, none = per_sample_grads(eager, di.tasks.causal_lm(), batch)
    assert none == []
    torch.testing.assert_close(vectorized, looped, rtol=1e-4, atol=1e-6)


def test_bert_with_a_padding_mask_is_vectorized_with_the_4d_float_mask():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, T))
    mask = torch.ones(N, T, dtype=torch.long)
    mask[:, -3:] = 0
    labels = torch.randint(0, 3, (N,))
    config = transformers.BertConfig(
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=V,
        max_position_embeddings=T,
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(config)
    task = di.tasks.classification()
    looped, fell_back = per_sample_grads(model, task, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert len(fell_back) == 1  # eager attention alone is not enough with a 2-D mask
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    vectorized, none = per_sample_grads(model, task, {"input_ids": ids, "attention_mask": additive, "labels": labels})
    assert none == []
    torch.testing.assert_close(vectorized, looped, rtol=1e-4, atol=1e-6)
