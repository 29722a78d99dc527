"""Solvers and index projectors pickle their large tensors as out-of-band buffers with protocol 5
(Dask's), so that neither side copies them (:mod:`dask_influence.core.pickling`)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import torch
from torch import nn

import dask_influence as di
from dask_influence.core import pickling
from dask_influence.index.projector import Projector


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 500), nn.Tanh(), nn.Linear(500, 3)).double().eval()  # 10,000 x 8 bytes
    x, y = torch.randn(40, 20, dtype=torch.float64), torch.randint(0, 3, (40,))
    return model, nn.CrossEntropyLoss(), x, y


def test_a_solver_travels_as_buffers_without_copies_and_scores_the_same():
    model, loss, x, y = _problem()
    solver = di.ArnoldiInfluence(model, loss, regularization=0.1, rank=40).fit(((x, y),))
    expected = solver.influences(x[:5], y[:5], x, y)
    buffers: list = []
    stream = pickle.dumps(solver, protocol=5, buffer_callback=buffers.append)
    sizes = sorted(memoryview(b).nbytes for b in buffers)
    p = sum(t.numel() for t in model.parameters())
    assert 20 * 500 * 8 in sizes and p * 40 * 8 in sizes  # the first layer's weight, the (p, rank) basis
    assert len(stream) < 64_000  # the tensors are not in the stream
    restored = pickle.loads(stream, buffers=buffers)
    weight = dict(restored.model.named_parameters())["0.weight"]
    assert isinstance(weight, nn.Parameter) and weight.requires_grad
    raw = [memoryview(b) for b in buffers if memoryview(b).nbytes == 20 * 500 * 8][0]
    assert weight.data_ptr() == np.frombuffer(raw, dtype=np.uint8).ctypes.data  # over the buffer: no copy
    torch.testing.assert_close(restored.influences(x[:5], y[:5], x, y), expected, rtol=0, atol=0)
    # in-band (protocol 5 without buffers), protocol 4 and deepcopy: the same numbers
    for other in (pickle.loads(pickle.dumps(solver, protocol=5)), pickle.loads(pickle.dumps(solver, protocol=4))):
        torch.testing.assert_close(other.influences(x[:5], y[:5], x, y), expected, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(solver).influences(x[:5], y[:5], x, y), expected, rtol=0, atol=0)


def test_a_projector_travels_as_buffers_and_projects_the_same():
    model, loss, x, y = _problem()
    projector = Projector(model, loss, "gaussian", 64, 0)
    expected = projector.project((x.numpy(), y.numpy()))
    buffers: list = []
    stream = pickle.dumps(projector, protocol=5, buffer_callback=buffers.append)
    assert buffers and len(stream) < 64_000
    np.testing.assert_array_equal(pickle.loads(stream, buffers=buffers).project((x.numpy(), y.numpy())), expected)


def test_small_odd_and_read_only_tensors():
    """Below MIN_BYTES, non-contiguous, bfloat16 and CUDA-less oddities keep torch's reduction; a
    read-only buffer is copied once into a writable tensor."""
    tensors = {
        "small": torch.ones(10),
        "strided": torch.ones(200, 200).T,
        "bf16": torch.ones(100_000, dtype=torch.bfloat16),
        "big": torch.arange(100_000, dtype=torch.float32),
    }
    buffers: list = []
    stream, buffers = pickling.dumps(tensors)
    assert [memoryview(b).nbytes for b in buffers] == [400_000]
    read_only = [bytes(memoryview(b)) for b in buffers]  # as a receiver without writable frames gets them
    back = pickling.loads(stream, read_only)
    for name, t in tensors.items():
        assert torch.equal(back[name], t) and back[name].dtype == t.dtype, name
    back["big"] += 1  # writable: its own copy
    assert float(back["big"][0]) == 1.0
