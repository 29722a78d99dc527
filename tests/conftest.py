"""Shared tiny seeded fixtures; the plain helpers live in ``influence_reference.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influence_reference import classification_data, regression_data, tanh_mlp

# The suite's models are tiny: intra-op threads only add synchronization (OpenMP workers
# spin-waiting on a shared 2-core machine made the core suite ~5x slower in CPU time).
torch.set_num_threads(1)


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture
def mlp_regression():
    """A 3-6-1 tanh MLP (31 parameters) with MSE on 24 training and 5 test points, float64."""
    x, y = regression_data(29, 3, seed=3)
    model = tanh_mlp(3, 6, 1, seed=3)
    return model, nn.MSELoss(), x[:24], y[:24], x[24:], y[24:]


@pytest.fixture
def mlp_classification():
    """A 3-5-3 tanh MLP (38 parameters) with cross entropy on 24 training and 5 test points."""
    x, y = classification_data(29, 3, 3, seed=4)
    model = tanh_mlp(3, 5, 3, seed=4)
    return model, nn.CrossEntropyLoss(), x[:24], y[:24], x[24:], y[24:]
