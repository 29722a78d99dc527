"""Pickling a solver while another thread runs its forward.

A Dask worker sends the solver it holds to other workers from its event-loop thread while its
task thread computes with the same object. ``functional_call`` swaps the model's parameters
for functorch wrappers during a forward; a pickle taken then failed ("Cannot access storage of
TensorWrapper"), the transfer failed and the job hung. The solver now pickles under the
forward lock, so every snapshot carries the model's own parameters.
"""

import copy
import pickle
import threading

import torch
from torch import nn

import dask_influence as di
from cases import classification_data, tanh_mlp


def test_pickles_taken_during_forwards_in_another_thread_carry_the_real_parameters():
    x, y = classification_data(64, 4, 3, seed=7)
    model = tanh_mlp(4, 16, 3, seed=7)
    solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, curvature="ggn").fit((x, y))
    expected = [p.detach().clone() for p in model.parameters()]
    stop = threading.Event()
    forwards = {"count": 0}

    def busy_task_thread() -> None:
        while not stop.is_set():
            solver.per_sample_grads(x, y)  # vmap(grad(...)): wrapped parameters inside the forward
            forwards["count"] += 1

    worker = threading.Thread(target=busy_task_thread, daemon=True)
    worker.start()
    try:
        for _ in range(300):
            clone = pickle.loads(pickle.dumps(solver))
            for got, want in zip(clone.model.parameters(), expected):
                assert type(got) is nn.Parameter and torch.equal(got.detach(), want)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert forwards["count"] > 0  # the two really overlapped
    influences = clone.influences(x[:3], y[:3], x, y)
    assert torch.allclose(influences, solver.influences(x[:3], y[:3], x, y), rtol=1e-12, atol=1e-12)


def test_copy_is_shallow_and_deepcopy_is_deep():
    x, y = classification_data(20, 4, 3, seed=1)
    model = tanh_mlp(4, 5, 3, seed=1)
    solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.1, curvature="ggn").fit((x, y))
    shallow, deep = copy.copy(solver), copy.deepcopy(solver)
    assert shallow.model is solver.model and shallow.state_ is solver.state_
    assert deep.model is not solver.model
    assert torch.equal(deep.influences(x, y, x, y), solver.influences(x, y, x, y))
