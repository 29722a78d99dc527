"""The mapping layer with dict batches: a small text classifier (embedding + a PyTorch
TransformerEncoderLayer, attention on the SDPA kernels) fitted on the cluster and scored
into a store, equal to the in-memory result; every dict source kind gives the same result.
"""

import dask.array as da
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import dask_influence as di


class TextClassifier(nn.Module):
    """Token ids -> embedding -> one encoder layer -> masked mean -> classes."""

    def __init__(self, vocab=12, d=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.int64)
    mask[::4, 3:] = 0
    labels = torch.randint(0, 3, (n,), generator=g)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "labels": labels.numpy()}


@pytest.fixture(scope="module")
def text_problem():
    torch.manual_seed(0)
    model = TextClassifier().double().eval()
    train, test = _data(30, 1), _data(7, 2)
    task = di.tasks.classification(perturb=None)
    solver = di.CgInfluence(model, task, regularization=0.5, rtol=1e-12, curvature="ggn")
    solver.fit(train)
    expected = solver.influences(test, train).numpy()
    return model, task, train, test, expected


def _items(arrays):
    n = len(arrays["labels"])
    return [{k: torch.as_tensor(v[i]) for k, v in arrays.items()} for i in range(n)]


def _as(kind, arrays, block):
    if kind == "numpy":
        return arrays, {"block": block}
    if kind == "loader":
        return DataLoader(_items(arrays), batch_size=block, shuffle=False), {}
    if kind == "dask":
        return {k: da.from_array(v, chunks=(block,) + v.shape[1:]) for k, v in arrays.items()}, {}
    if kind == "hf":
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in arrays.items()}).with_format("torch")
        return ds, {"block": block}
    raise AssertionError(kind)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("kind", ["numpy", "loader", "dask", "hf"])
def test_sequential_dict_sources_equal_in_memory(text_problem, kind):
    model, task, train, test, expected = text_problem
    solver = di.CgInfluence(model, task, regularization=0.5, rtol=1e-12, curvature="ggn").fit(train)
    t, topt = _as(kind, test, 3)
    r, ropt = _as(kind, train, 8)
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    result = calc.influences(t, r, test_block_size=topt.get("block"), train_block_size=ropt.get("block"))
    assert result.chunks == ((3, 3, 1), (8, 8, 8, 6))
    assert _rel(result.compute(scheduler="sync"), expected) < 1e-10


def test_cluster_fit_and_store_with_dict_batches(text_problem, cluster_client, tmp_path):
    model, task, train, test, expected = text_problem
    solver = di.CgInfluence(model, task, regularization=0.5, rtol=1e-12, curvature="ggn")
    calc = di.DaskInfluenceCalculator(solver, cluster_client, progress=False)
    calc.fit(_as("loader", train, 8)[0])
    group = calc.influences_to_zarr(
        _as("loader", test, 3)[0], _as("loader", train, 8)[0], tmp_path / "text.zarr", top_k=3, self_influences=True
    )
    assert group.attrs["dask_influence"]["complete"] is True
    assert _rel(group["influences"][...], expected) < 1e-8
    selfs = solver.self_influences({k: v for k, v in train.items()})
    np.testing.assert_allclose(group["self_influences"][...], selfs.numpy(), rtol=1e-8)


def test_ekfac_on_the_cluster_with_dict_batches_equals_in_memory(text_problem, cluster_client):
    model, task, train, test, _ = text_problem
    with pytest.warns(UserWarning, match="leaves out"):
        local = di.EkfacInfluence(model, task, regularization=0.5).fit(train)
    expected = local.influences(test, train).numpy()
    with pytest.warns(UserWarning, match="leaves out"):
        solver = di.EkfacInfluence(model, task, regularization=0.5)
    di.DaskInfluenceCalculator(solver, cluster_client, progress=False).fit(_as("dask", train, 8)[0])
    assert _rel(solver.influences(test, train).numpy(), expected) < 1e-10
