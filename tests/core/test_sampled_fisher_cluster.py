"""EK-FAC with the sampled Fisher fitted on a Dask cluster draws the same labels as in process:
each sample's draws are seeded by its index, not by the blocks the data is split into."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
from torch import nn

import dask_influence as di

pytestmark = [pytest.mark.cluster]


class CausalMixLm(nn.Module):
    """Token embedding, a causal running mean, a hidden layer and an LM head."""

    def __init__(self, vocab: int = 9, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[None, :, None]
        return self.head(torch.tanh(self.hidden(h.cumsum(1) / steps)))


def test_sampled_fisher_on_the_cluster_equals_in_process(cluster_client):
    torch.manual_seed(0)
    model = CausalMixLm().double().eval()
    ids = torch.randint(0, 9, (20, 6), generator=torch.Generator().manual_seed(1)).numpy()
    task = di.tasks.causal_lm()
    local = di.EkfacInfluence(model, task, regularization=0.1, fisher="sampled", fisher_draws=2).fit({"input_ids": ids})
    solver = di.EkfacInfluence(model, task, regularization=0.1, fisher="sampled", fisher_draws=2)
    calc = di.DaskInfluenceCalculator(solver, cluster_client, progress=False)
    calc.fit({"input_ids": da.from_array(ids, chunks=(7, 6))})  # blocks of 7, 7 and 6 on two workers
    for a, b in zip(solver.state_.layers, local.state_.layers):
        for u, v in ((a.g_factor, b.g_factor), (a.corrected, b.corrected)):
            assert float((u - v).abs().max()) < 1e-12 * float(v.abs().max())
    test = {"input_ids": torch.as_tensor(ids[:3])}
    expected = local.influences(test, {"input_ids": torch.as_tensor(ids)}).numpy()
    actual = solver.influences(test, {"input_ids": torch.as_tensor(ids)}).numpy()
    assert float(np.abs(actual - expected).max() / np.abs(expected).max()) < 1e-10
