"""Regressions of issue 12: the input dtype survives save/load; EK-FAC's loss checks and the
mean-reduction check tolerate float32 rounding, and still refuse what they must."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dask_influence as di
from dask_influence.core import serialization
from dask_influence.core.solvers.ekfac import OutputCurvature


# -- 1. a loaded solver refuses integer inputs as clearly as a fitted one ----------------------------
def _float_problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("cls", [di.DirectInfluence, di.EkfacInfluence])
def test_loaded_solver_refuses_integer_inputs_with_a_type_error(cls, tmp_path):
    model, loss, x, y = _float_problem()
    solver = cls(model, loss, regularization=0.3).fit((x, y))
    path = tmp_path / "fit.pt"
    solver.save(path)
    loaded = cls.load(path, model, loss)
    for fitted in (solver, loaded):
        with pytest.raises(TypeError, match=r"x_test has integer dtype torch.int64.*fitted on floating-point inputs"):
            fitted.influences(x[:2].long(), y[:2])
        with pytest.raises(TypeError, match=r"x has integer dtype.*floating-point"):
            fitted.self_influences(x[:2].long(), y[:2])
    assert torch.equal(loaded.influences(x[:2], y[:2], x, y), solver.influences(x[:2], y[:2], x, y))


def test_a_file_without_the_input_dtype_still_loads(tmp_path):
    """Files written before ``float_inputs`` was recorded load (the key is optional)."""
    model, loss, x, y = _float_problem()
    solver = di.DirectInfluence(model, loss, regularization=0.3).fit((x, y))
    path = tmp_path / "fit.pt"
    solver.save(path)
    record = serialization.load(str(path), source=str(path))
    assert record["float_inputs"] is True
    del record["float_inputs"]
    serialization.save(record, str(path))
    loaded = di.DirectInfluence.load(path, model, loss)
    assert torch.equal(loaded.influences(x[:2], y[:2], x, y), solver.influences(x[:2], y[:2], x, y))


def test_a_solver_fitted_on_token_ids_keeps_taking_integer_inputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    x = torch.randint(0, 10, (20, 2))
    y = torch.randint(0, 3, (20,))
    solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.3).fit((x, y))
    solver.save(tmp_path / "fit.pt")
    loaded = di.DirectInfluence.load(tmp_path / "fit.pt", model, nn.CrossEntropyLoss())
    assert torch.equal(loaded.influences(x[:2], y[:2], x, y), solver.influences(x[:2], y[:2], x, y))


# -- 2. EK-FAC's loss checks on float32 models -------------------------------------------------------
def _float32_classifier(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(64, 13)
    y = torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


@pytest.mark.parametrize("steps", [5, 200, 2000])
def test_ekfac_takes_cross_entropy_as_a_function_on_float32_models(steps):
    """A confident float32 sample's whole output Hessian is at rounding level: its "negative
    eigenvalue" (-3e-8) and its difference from diag(p) - p p^T (8e-8) are rounding, not curvature."""
    model, x, y = _float32_classifier(steps)
    closed = di.EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    own = di.EkfacInfluence(model, lambda o, t: F.cross_entropy(o, t), regularization=0.1).fit((x, y))
    told = di.EkfacInfluence(
        model, lambda o, t: F.cross_entropy(o, t), regularization=0.1, output_curvature="classification"
    ).fit((x, y))
    assert own.config.output_curvature is None and told.config.output_curvature == "classification"
    expected = closed.influences(x[:3], y[:3], x, y)
    for solver in (own, told):
        got = solver.influences(x[:3], y[:3], x, y)
        assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())


def test_output_hessian_checks_of_confident_samples():
    """The closed form and the loss's own Hessian agree on near one-hot softmax outputs, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        o = torch.tensor([[30.0, 0.0, -1.0], [0.0, 18.0, 2.0], [9.0, 0.0, 8.5], [0.3, 0.1, 0.2]], dtype=dtype)
        t = torch.tensor([0, 1, 0, 2])
        own = OutputCurvature(lambda o, t: F.cross_entropy(o, t), None)
        told = OutputCurvature(lambda o, t: F.cross_entropy(o, t), "classification")
        told.check(o, t)
        a = own.roots(o, t).double().reshape(3, 4, 3).permute(1, 2, 0)
        b = told.roots(o, t).double().reshape(3, 4, 3).permute(1, 2, 0)
        assert torch.allclose(a @ a.transpose(1, 2), b @ b.transpose(1, 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [5, 2000])
def test_ekfac_still_refuses_a_non_convex_loss(dtype, steps):
    model, x, y = _float32_classifier(steps)
    model = model.to(dtype)
    x = x.to(dtype)
    # cross-entropy minus a quadratic: the ones direction (flat for cross-entropy) curves down by 1/c
    loss = lambda o, t: F.cross_entropy(o, t) - 0.5 * (o**2).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"not convex in the model outputs.*negative eigenvalue, -"):
        di.EkfacInfluence(model, loss, regularization=0.1).fit((x, y))
    with pytest.raises(ValueError, match=r"not convex in the model outputs"):
        di.EkfacInfluence(model, lambda o, t: -F.cross_entropy(o, t), regularization=0.1).fit((x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ekfac_still_refuses_a_loss_that_is_not_the_task(dtype):
    model, x, y = _float32_classifier(5)
    model, x = model.to(dtype), x.to(dtype)
    with pytest.raises(
        ValueError, match=r"output_curvature='classification' assumes .* differs by .*output_curvature='autograd'"
    ):
        di.EkfacInfluence(
            model, lambda o, t: F.cross_entropy(2 * o, t), regularization=0.1, output_curvature="classification"
        ).fit((x, y))
    targets = torch.randn(64, 3, dtype=dtype)
    with pytest.raises(ValueError, match=r"output_curvature='regression' assumes .* differs by"):
        di.EkfacInfluence(
            model, lambda o, t: 3 * F.mse_loss(o, t), regularization=0.1, output_curvature="regression"
        ).fit((x, targets))


def test_ekfac_falls_back_to_the_outputs_dtype_for_a_loss_that_refuses_float64():
    model, x, y = _float32_classifier(5)

    def float32_only(o, t):
        if o.dtype != torch.float32:
            raise TypeError("float32 outputs only")
        return F.cross_entropy(o, t)

    closed = di.EkfacInfluence(model, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    own = di.EkfacInfluence(model, float32_only, regularization=0.1).fit((x, y))
    expected = closed.influences(x[:3], y[:3], x, y)
    got = own.influences(x[:3], y[:3], x, y)
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())


# -- 3. the mean-reduction check on a well-fitted float32 model ----------------------------------------
def test_mean_reduced_loss_of_a_well_fitted_float32_model_is_accepted():
    torch.manual_seed(0)
    model = nn.Linear(100, 3)
    x = torch.randn(4, 100)
    y = model(x).detach() + 3e-5  # residuals far below the outputs: float32 rounding dominates the loss
    solver = di.DirectInfluence(model, nn.MSELoss(), regularization=1.0).fit((x, y))
    assert solver.is_fitted
    with pytest.raises(ValueError, match=r"must average over the batch.*reduction='mean' instead of 'sum'"):
        di.DirectInfluence(model, nn.MSELoss(reduction="sum"), regularization=1.0).fit((x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_other_reductions_than_the_mean_are_still_refused(dtype):
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(dtype)
    x = torch.randn(6, 5, dtype=dtype)
    y = torch.randn(6, 2, dtype=dtype)
    for loss in (
        nn.MSELoss(reduction="sum"),
        lambda o, t: ((o - t) ** 2).sum() / 10,
        lambda o, t: ((o - t) ** 2).mean() * o.shape[0] ** 0.5,
    ):
        with pytest.raises(ValueError, match=r"must average over the batch.*two copies.*reduction='mean'"):
            di.DirectInfluence(model, loss, regularization=1.0).fit((x, y))
