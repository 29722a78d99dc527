"""Factories of the two transformer jobs: tiny Hugging Face models built from a config.

Nothing is downloaded: each model is built from a config with random weights and trained a
few dozen steps on generated token sequences (seeded, so every call returns the same model
and data, which ``--resume`` relies on). The datasets are plain lists of dicts
(``{"input_ids", "attention_mask", "labels"}``, the items a Hugging Face dataset gives), so
the Dask workers unpickle them without importing this file.

- ``make_text_classifier``: a one-layer BERT sequence classifier. A sequence's label is
  the number of occurrences of token 1 (the word "star") in it, modulo 3; 5% of the
  training labels are flipped (``flipped_indices``).

  Which score finds them: their **self-influence** (``dask-influence rank text.zarr --by
  self``, ``plot --by self``), not their mean influence over the test points. Measured on
  this job as shipped (200 training points, 20 test points, EK-FAC, regularization 0.01):
  as a detector of the flipped labels the self-influence has AUC 0.87 (5 of the 10 flipped
  labels among the 10 highest self-influences), the mean influence AUC 0.14 (lowest mean
  first; 0 of them among the 10 most harmful): the flipped points rank among the most
  *helpful* on average. ``python factory.py flipped.txt`` writes their indices for
  ``plot --suspects flipped.txt``.
- ``make_causal_lm``: a one-layer GPT-2 language model on sequences that count up from a
  random start in steps of 1 or 2 (modulo the vocabulary).

Both also return ``show(index) -> str | dict``, which ``dask-influence report --job`` uses to
print a training point: the sequence decoded to words through a word-level tokenizer built
here (:func:`make_tokenizer`, nothing downloaded), with its label for the classifier.

Requires ``transformers`` (``pip install "dask-influence[hf]"``).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

VOCAB, LENGTH = 16, 8
SEED = 0
WORDS = "the star moon sun sky sea tree rock bird fish wind rain snow fire leaf hill".split()
"""The word of each token id (``VOCAB`` of them); token 1, "star", decides the classifier's label."""


def make_tokenizer():
    """A word-level Hugging Face tokenizer of :data:`WORDS` (built in memory, nothing downloaded)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=WORDS[0]))
    words.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words)


def _train(model: torch.nn.Module, loss_fn, batches, steps: int, lr: float = 3e-3) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    model.eval()


def _items(arrays: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i] for k, v in arrays.items()} for i in range(n)]


def flipped_indices(n_train: int = 200, seed: int = SEED) -> np.ndarray:
    """Sorted indices of the training sequences whose label is flipped (5%)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=max(1, n_train // 20), replace=False))


def make_text_classifier(n_train: int = 200, n_test: int = 20, steps: int = 60, seed: int = SEED) -> dict:
    """A tiny BERT sequence classifier, its training and test sequences (dicts), and ``show``
    and ``show_test`` (index -> a dict row: the decoded text, the label, the count of "star"
    and whether the label was flipped) for ``dask-influence report``."""
    from transformers import BertConfig, BertForSequenceClassification

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n_train + n_test, LENGTH), generator=g)
    labels = (ids == 1).sum(dim=1) % 3
    flipped = torch.as_tensor(flipped_indices(n_train, seed))
    labels[flipped] = (labels[flipped] + 1) % 3
    mask = torch.ones_like(ids)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    train = {k: v[:n_train] for k, v in data.items()}
    test = {k: v[n_train:] for k, v in data.items()}
    batches = [{k: v[s : s + 32] for k, v in train.items()} for s in range(0, n_train, 32)]
    _train(model, lambda m, b: m(**b).loss, batches, steps)
    tokenizer = make_tokenizer()
    is_flipped = set(flipped.tolist())

    def row(part: dict, index: int, flips: bool) -> dict:
        ids = part["input_ids"][index]
        row = {"text": tokenizer.decode(ids), "label": int(part["labels"][index])}
        row["stars mod 3"] = int((ids == 1).sum()) % 3  # the true label
        if flips:
            row["flipped"] = "yes" if index in is_flipped else ""
        return row

    return {
        "model": model,
        "train": _items(train),
        "test": _items(test),
        "show": lambda index: row(train, index, True),
        "show_test": lambda index: row(test, index, False),
    }


def make_causal_lm(n_train: int = 120, n_test: int = 8, steps: int = 60, seed: int = SEED) -> dict:
    """A tiny GPT-2 language model, its training and test sequences (dicts), and ``show`` and
    ``show_test`` (index -> the sequence decoded to words) for ``dask-influence report``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    ids = (start + step * torch.arange(LENGTH)) % VOCAB
    mask = torch.ones_like(ids)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    data = {"input_ids": ids, "attention_mask": mask}
    train = {k: v[:n_train] for k, v in data.items()}
    test = {k: v[n_train:] for k, v in data.items()}
    batches = [{k: v[s : s + 32] for k, v in train.items()} for s in range(0, n_train, 32)]
    _train(model, lambda m, b: m(**b, labels=b["input_ids"]).loss, batches, steps)
    tokenizer = make_tokenizer()
    return {
        "model": model,
        "train": _items(train),
        "test": _items(test),
        "show": lambda index: tokenizer.decode(train["input_ids"][index]),
        "show_test": lambda index: tokenizer.decode(test["input_ids"][index]),
    }


if __name__ == "__main__":  # python factory.py flipped.txt: the flipped training labels
    np.savetxt(sys.argv[1] if len(sys.argv) > 1 else "flipped.txt", flipped_indices(), fmt="%d")
