"""pyDVL's keyword form of the pair call: ``influences(x_test, y_test, x=x_train, y=y_train)`` (issue 31, item 16)."""

import pytest
import torch
from torch import nn

import dask_influence as di


def _fitted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(30, 1, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + noise
    model = nn.Linear(3, 1).double()
    solver = di.DirectInfluence(model, nn.MSELoss(), regularization=1e-3).fit([(x, y)])
    return solver, x, y


def test_keywords_equal_the_positional_form():
    solver, x, y = _fitted()
    positional = solver.influences(x[:4], y[:4], x, y)
    keywords = solver.influences(x[:4], y[:4], x=x, y=y)
    assert keywords.shape == (4, 30)
    torch.testing.assert_close(keywords, positional, rtol=0, atol=0)
    # the pair as one argument, and the mode as a keyword, also with the training keywords
    torch.testing.assert_close(solver.influences((x[:4], y[:4]), x=x, y=y, mode="up"), positional, rtol=0, atol=0)
    # not the influences on the test points themselves (what dropped keywords would give)
    assert solver.influences(x[:4], y[:4]).shape == (4, 4)


def test_x_without_y_is_refused_in_one_line():
    solver, x, y = _fitted()
    with pytest.raises(ValueError) as err:
        solver.influences(x[:4], y[:4], x=x)
    message = str(err.value)
    assert message == (
        "Pass both x= and y= (the training inputs and targets), or neither (to use the test points as "
        "training points); got x= without y=."
    )
    assert "\n" not in message
    with pytest.raises(ValueError, match="got y= without x="):
        solver.influences(x[:4], y[:4], y=y)


def test_training_points_given_twice_are_refused():
    solver, x, y = _fitted()
    with pytest.raises(TypeError, match="given twice"):
        solver.influences(x[:4], y[:4], x, y, x=x, y=y)


def test_keywords_with_a_task_are_refused():
    _, x, y = _fitted()
    model = nn.Linear(3, 1).double()
    task = di.Task(loss=lambda m, batch: nn.functional.mse_loss(m(batch["x"]), batch["y"]))
    solver = di.DirectInfluence(model, task, regularization=1e-3).fit([{"x": x, "y": y}])
    with pytest.raises(TypeError, match="a solver built with a Task takes influences\\(test_batch, train_batch\\)"):
        solver.influences({"x": x[:2], "y": y[:2]}, x=x, y=y)
