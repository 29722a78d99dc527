"""Every bad input gets a clear ValueError/TypeError that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from cases import loader, reference_influences, regression_data, rel_err, small_regression_problem, solver_cases

# every registered solver: the constructor and not-fitted checks are common to all of them
SOLVERS = [case.cls for case in solver_cases()]


@pytest.fixture
def setup():
    return small_regression_problem()


@pytest.fixture
def fitted(setup):
    model, mse, x, y, xt, yt = setup
    return di.DirectInfluence(model, mse, regularization=3.0).fit(loader(x, y, 8)), setup


# -- shapes and sample counts ------------------------------------------------------------------
def test_mismatched_sample_counts(fitted):
    m, (model, mse, x, y, xt, yt) = fitted
    with pytest.raises(ValueError, match=r"same number of samples; got 20 and 19"):
        di.DirectInfluence(model, mse, regularization=3.0).fit((x, y[:-1]))
    with pytest.raises(ValueError, match=r"x_test and y_test must have the same number of samples; got 5 and 4"):
        m.influence_factors(xt, yt[:-1])
    with pytest.raises(ValueError, match=r"x and y must have the same number of samples"):
        m.influences(xt, yt, x[:3], y[:4])
    with pytest.raises(ValueError, match=r"same number of samples"):
        m.self_influences(x, y[:5])
    batches = [(x[:8], y[:8]), (x[8:16], y[8:15])]
    with pytest.raises(ValueError, match=r"training batch starting at sample 8.*same number of samples"):
        di.DirectInfluence(model, mse, regularization=3.0).fit(batches)


def test_wrong_feature_shape(fitted):
    m, (model, mse, x, y, xt, yt) = fitted
    with pytest.raises(ValueError, match=r"x_test has feature shape \(2,\).*fitted on inputs of feature shape \(3,\)"):
        m.influence_factors(xt[:, :2], yt)
    with pytest.raises(ValueError, match=r"feature shape"):
        m.influences(xt, yt, x.reshape(20, 3, 1), y)
    with pytest.raises(ValueError, match=r"disagree on the feature shape"):
        di.DirectInfluence(model, mse, regularization=3.0).fit([(x[:8], y[:8]), (x[8:, :2], y[8:])])


def test_scalar_inputs(fitted):
    m, (model, mse, x, y, xt, yt) = fitted
    with pytest.raises(ValueError, match=r"leading sample dimension"):
        m.influence_factors(torch.tensor(1.0, dtype=torch.float64), yt)


def test_x_without_y(fitted):
    m, (model, mse, x, y, xt, yt) = fitted
    with pytest.raises(ValueError, match=r"both x and y"):
        m.influences(xt, yt, x)


# -- non-finite values -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(fitted, bad):
    m, (model, mse, x, y, xt, yt) = fitted
    x_bad = x.clone()
    x_bad[3, 1] = bad
    with pytest.raises(di.NonFiniteError, match=r"NaN/Inf.*index \(3, 1\)") as info:
        di.DirectInfluence(model, mse, regularization=3.0).fit(loader(x_bad, y, 8))
    assert isinstance(info.value, ValueError)
    with pytest.raises(di.NonFiniteError, match=r"NaN/Inf"):
        di.CgInfluence(model, mse, regularization=3.0).fit((x_bad, y))
    with pytest.raises(ValueError, match=r"x_test contains 1 NaN/Inf"):
        m.influence_factors(x_bad[:5], yt)
    y_bad = yt.clone()
    y_bad[2] = bad
    with pytest.raises(ValueError, match=r"y_test contains 1 NaN/Inf"):
        m.influences(xt, y_bad, x, y)
    with pytest.raises(ValueError, match=r"y contains 1 NaN/Inf"):
        m.influences(xt, yt, xt, y_bad)


class _ProbabilityModel(nn.Module):
    """Outputs softmax probabilities; with ``log`` in the loss a probability of exactly 0 is log(0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        return torch.softmax(self.lin(x), dim=1)


def _nll_of_probabilities(p, t):
    return nn.functional.nll_loss(torch.log(p), t)  # the numerically unstable way


def test_non_finite_gradients_name_the_parameter():
    model = _ProbabilityModel().double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    m = di.DirectInfluence(model, _nll_of_probabilities, regularization=0.1).fit((x, y))
    # a far-out input underflows one class probability to exactly 0; labelled with that
    # class its loss is log(0) = -inf and the gradient 0 * inf = NaN
    x_bad, y_bad = x.clone(), y.clone()
    x_bad[2] = 1e4 * x[2]
    with torch.no_grad():
        probs = model(x_bad[2:3])[0]
    assert float(probs.min()) == 0.0
    y_bad[2] = probs.argmin()
    with pytest.raises(di.NonFiniteError, match=r"sample 2 is NaN/Inf in parameter 'lin\.weight'.*log of 0"):
        m.influences(x_bad[:4], y_bad[:4], x, y)
    with pytest.raises(di.NonFiniteError, match=r"sample 2 is NaN/Inf in parameter 'lin\.weight'"):
        m.influences(x[:4], y[:4], x_bad[:4], y_bad[:4])
    with pytest.raises(di.NonFiniteError, match=r"sample 2 is NaN/Inf"):
        m.self_influences(x_bad[:4], y_bad[:4])
    # the sample index counts across chunks
    chunked = di.DirectInfluence(model, _nll_of_probabilities, regularization=0.1, chunk_size=3).fit((x, y))
    with pytest.raises(di.NonFiniteError, match=r"sample 2 is NaN/Inf"):
        chunked.self_influences(x_bad, y_bad)
    x5, y5 = torch.roll(x_bad, 3, 0), torch.roll(y_bad, 3, 0)
    with pytest.raises(di.NonFiniteError, match=r"sample 5 is NaN/Inf"):
        chunked.self_influences(x5, y5)
    # in the training data, the curvature itself is non-finite
    with pytest.raises(di.NonFiniteError, match=r"NaN/Inf"):
        di.DirectInfluence(model, _nll_of_probabilities, regularization=0.1).fit((x_bad, y_bad))


def test_non_finite_parameters(setup):
    model, mse, x, y, _, _ = setup
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(di.NonFiniteError, match=r"trainable parameters contains 1 NaN/Inf"):
        di.CgInfluence(model, mse, regularization=1.0).fit((x, y))


# -- fitting state ------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_not_fitted(setup, solver):
    model, mse, x, y, xt, yt = setup
    m = solver(model, mse, regularization=3.0)
    assert not m.is_fitted
    factors = torch.zeros(5, m.num_params, dtype=torch.float64)
    calls = [
        lambda: m.influence_factors(xt, yt),
        lambda: m.influences(xt, yt, x, y),
        lambda: m.influences_from_factors(factors, x, y),
        lambda: m.self_influences(x, y),
        lambda: m.per_sample_grads(x, y),
    ]
    for call in calls:
        with pytest.raises(di.NotFittedError, match=rf"This {solver.__name__} is not fitted yet; call \.fit"):
            call()
    assert issubclass(di.NotFittedError, ValueError)


def test_unknown_mode(fitted):
    m, (model, mse, x, y, xt, yt) = fitted
    for mode in ("sideways", "", None, 1, "upweight"):
        with pytest.raises(ValueError, match=r"mode must be 'up' or 'perturbation'"):
            m.influences(xt, yt, x, y, mode=mode)
    factors = m.influence_factors(xt, yt)
    with pytest.raises(ValueError, match=r"mode must be 'up' or 'perturbation'.*'down'"):
        m.influences_from_factors(factors, x, y, mode="down")


def test_factors_of_wrong_shape(fitted):
    m, (model, mse, x, y, xt, yt) = fitted
    factors = m.influence_factors(xt, yt)
    p = m.num_params
    for bad in (factors[:, :-1], factors[0], factors[None]):
        with pytest.raises(ValueError, match=rf"factors must have shape \(n_test, {p}\)"):
            m.influences_from_factors(bad, x, y)
    with pytest.raises(TypeError, match=r"factors must be a torch\.Tensor"):
        m.influences_from_factors(factors.numpy(), x, y)
    nan_factors = factors.clone()
    nan_factors[0, 0] = float("nan")
    with pytest.raises(di.NonFiniteError, match=r"factors contains"):
        m.influences_from_factors(nan_factors, x, y)


# -- curvature ---------------------------------------------------------------------------------------
def test_singular_hessian_suggests_regularization():
    # 4 samples, 6 parameters: H = 2 X^T X / n has rank 4
    x, y = regression_data(4, 6, seed=22)
    model = nn.Linear(6, 1, bias=False).double().eval()
    with pytest.raises(di.NotPositiveDefiniteError, match=r"not positive definite.*Pass regularization=") as info:
        di.DirectInfluence(model, nn.MSELoss()).fit((x, y))
    err = info.value
    assert isinstance(err, ValueError)
    assert abs(err.smallest_eigenvalue) < 1e-10
    assert err.suggested_regularization > 0
    assert f"regularization={err.suggested_regularization:g}" in str(err)
    m = di.DirectInfluence(model, nn.MSELoss(), regularization=err.suggested_regularization).fit((x, y))
    out = m.influences(x, y)
    expected = reference_influences(model, nn.MSELoss(), x, y, x, y, regularization=err.suggested_regularization)
    assert rel_err(out, expected) < 1e-8


def test_indefinite_hessian_suggests_regularization(setup):
    model, mse, x, y, xt, yt = setup  # an untrained tanh MLP: H has negative eigenvalues
    with pytest.raises(di.NotPositiveDefiniteError, match=r"curvature='ggn'") as info:
        di.DirectInfluence(model, mse).fit((x, y))
    err = info.value
    assert err.smallest_eigenvalue < 0
    assert err.suggested_regularization > -err.smallest_eigenvalue
    m = di.DirectInfluence(model, mse, regularization=err.suggested_regularization).fit((x, y))
    assert bool((m.self_influences(x, y) > 0).all())
    # the GGN is positive semi-definite: a tiny regularization suffices
    di.DirectInfluence(model, mse, regularization=1e-6, curvature="ggn").fit((x, y))


def test_lowering_regularization_after_fit_is_checked(fitted):
    m, (model, mse, x, y, xt, yt) = fitted
    m.regularization = 0.0
    with pytest.raises(di.NotPositiveDefiniteError, match=r"regularization=0\)"):
        m.influence_factors(xt, yt)


# -- constructor arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_bad_regularization(setup, solver):
    model, mse = setup[:2]
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"regularization must be a finite number >= 0; got"):
            solver(model, mse, regularization=bad)
    for bad in ("0.1", None, True, [0.1]):
        with pytest.raises(TypeError, match=r"regularization must be a non-negative number; got"):
            solver(model, mse, regularization=bad)


def test_bad_constructor_arguments(setup):
    model, mse = setup[:2]
    with pytest.raises(ValueError, match=r"curvature must be one of \['hessian', 'ggn'\]; got 'fisher'"):
        di.DirectInfluence(model, mse, curvature="fisher")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        di.DirectInfluence(lambda v: v, mse)
    with pytest.raises(TypeError, match=r"loss must be a callable"):
        di.DirectInfluence(model, "mse")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int; got 0"):
        di.DirectInfluence(model, mse, chunk_size=0)
    with pytest.raises(ValueError, match=r"preconditioner must be None, 'jacobi', 'nystroem'"):
        di.CgInfluence(model, mse, preconditioner="ilu")
    with pytest.raises(ValueError, match=r"rtol must be a finite number >= 0"):
        di.CgInfluence(model, mse, rtol=-1.0)
    with pytest.raises(ValueError, match=r"maxiter must be a positive int; got 0"):
        di.CgInfluence(model, mse, maxiter=0)
    with pytest.raises(ValueError, match=r"dampen must be in \[0, 1\)"):
        di.LissaInfluence(model, mse, dampen=1.0)
    with pytest.raises(ValueError, match=r"scale must be positive"):
        di.LissaInfluence(model, mse, scale=0)
    with pytest.raises(TypeError, match=r"batch_size must be a positive int"):
        di.LissaInfluence(model, mse, batch_size=2.5)


def test_nystroem_needs_regularization(setup):
    model, mse, x, y, _, _ = setup
    with pytest.raises(ValueError, match=r"needs regularization > 0"):
        di.CgInfluence(model, mse, preconditioner="nystroem").fit((x, y))


def test_model_without_trainable_parameters(setup):
    model, mse = setup[:2]
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters.*unfreeze"):
        di.CgInfluence(model, mse, regularization=1.0)
    with pytest.raises(ValueError, match=r"no trainable parameters"):
        di.DirectInfluence(nn.Sequential(nn.Tanh()), mse)


# -- the loss ------------------------------------------------------------------------------------
def test_loss_without_reduction(setup):
    model, _, x, y, _, _ = setup
    with pytest.raises(TypeError, match=r"must reduce to a scalar.*reduction='mean'"):
        di.DirectInfluence(model, nn.MSELoss(reduction="none"), regularization=3.0).fit((x, y))


def test_sum_reduced_loss(setup):
    model, _, x, y, _, _ = setup
    with pytest.raises(ValueError, match=r"must average over the batch.*reduction='mean' instead of 'sum'"):
        di.CgInfluence(model, nn.MSELoss(reduction="sum"), regularization=3.0).fit((x, y))


def test_loss_that_does_not_fit_the_targets(setup):
    model, _, x, y, _, _ = setup
    labels = torch.zeros(20, 1, dtype=torch.long)  # class ids shaped like regression targets
    with pytest.raises(
        ValueError, match=r"could not be evaluated on a training batch with inputs \(20, 3\).*targets \(20, 1\)"
    ):
        di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=3.0).fit((x, labels))


def test_non_finite_loss_is_not_blamed_on_the_reduction():
    model = _ProbabilityModel().double().eval()
    x = torch.tensor([[1e4, 1e4], [0.5, 0.1]], dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmin(dim=1)  # the first sample's loss is log(0)
    with pytest.raises(di.NonFiniteError, match=r"loss\(outputs, targets\) is inf on the first training sample"):
        di.CgInfluence(model, _nll_of_probabilities, regularization=0.1).fit((x, y))


# -- training data ---------------------------------------------------------------------------------
def test_empty_data(setup):
    model, mse, x, y, xt, yt = setup
    m = di.DirectInfluence(model, mse, regularization=3.0)
    with pytest.raises(ValueError, match=r"x is empty \(0 samples\)"):
        m.fit((x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"training data is empty"):
        m.fit(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))
    with pytest.raises(ValueError, match=r"training data is empty"):
        m.fit([])
    m.fit((x, y))
    with pytest.raises(ValueError, match=r"x_test is empty"):
        m.influence_factors(xt[:0], yt[:0])


def test_one_shot_iterator(setup):
    model, mse, x, y, _, _ = setup
    data = loader(x, y, 8)
    with pytest.raises(TypeError, match=r"one-shot iterator or generator.*DataLoader itself"):
        di.CgInfluence(model, mse, regularization=3.0).fit(iter(data))
    with pytest.raises(TypeError, match=r"one-shot iterator or generator"):
        di.CgInfluence(model, mse, regularization=3.0).fit((bx, by) for bx, by in data)


def test_malformed_batches(setup):
    model, mse, x, y, _, _ = setup
    with pytest.raises(TypeError, match=r"\(x, y\) pairs; got a dict"):
        di.DirectInfluence(model, mse, regularization=3.0).fit([{"x": x, "y": y}])
    with pytest.raises(TypeError, match=r"\(x, y\) pairs; got Tensor"):
        di.DirectInfluence(model, mse, regularization=3.0).fit([x])
    with pytest.raises(TypeError, match=r"must be a DataLoader"):
        di.DirectInfluence(model, mse, regularization=3.0).fit(42)
    m = di.DirectInfluence(model, mse, regularization=3.0).fit((x, y))
    # a dict where a pair loss takes x: the message names the task that takes dict batches (issue 31, item 12)
    with pytest.raises(TypeError, match=r"Got a dict batch: .*takes \(x, y\) pairs.*di\.tasks\.classification\(\)"):
        m.influence_factors({"a": 1}, y)
    with pytest.raises(TypeError, match=r"x_test must be numeric; got an array of dtype <U3"):
        m.influence_factors("abc", y)
    with pytest.raises(TypeError, match=r"y_test must be numeric; got an array of dtype <U1"):
        m.influence_factors(x[:2], ["a", "b"])


# -- solvers ----------------------------------------------------------------------------------------
def test_lissa_divergence_names_scale(setup):
    model, mse, x, y, xt, yt = setup
    m = di.LissaInfluence(model, mse, regularization=3.0, scale=0.05, maxiter=500).fit((x, y))
    with pytest.raises(di.DivergenceError, match=r"LiSSA diverged.*Raise scale to") as info:
        m.influence_factors(xt, yt)
    assert "scale is 0.05" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_training_mode_with_dropout(setup):
    _, mse, x, y, _, _ = setup
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 1)).double()
    model.train()
    with pytest.raises(ValueError, match=r"training mode and layer '1' \(Dropout\).*model\.eval\(\)"):
        di.CgInfluence(model, mse, regularization=3.0).fit((x, y))
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double().train()
    with pytest.raises(ValueError, match=r"BatchNorm1d.*model\.eval\(\)"):
        di.DirectInfluence(bn, mse, regularization=3.0).fit((x, y))
    model.eval()
    di.CgInfluence(model, mse, regularization=3.0).fit((x, y))


def test_perturbation_with_integer_inputs():
    ids = torch.randint(0, 5, (12, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randn(12, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(6, 1)).double().eval()
    m = di.DirectInfluence(model, nn.MSELoss(), regularization=1.0).fit((ids, y))
    with pytest.raises(TypeError, match=r"must be floating point; got x of dtype torch\.int64.*mode='up'"):
        m.influences(ids[:2], y[:2], ids, y, mode="perturbation")
    assert m.influences(ids[:2], y[:2], ids, y, mode="up").shape == (2, 12)


def test_integer_inputs_to_a_model_fitted_on_floats():
    import torch
    from torch import nn

    import dask_influence as di

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    solver = di.DirectInfluence(nn.Linear(3, 1).double(), nn.MSELoss(), regularization=0.1).fit((x, y))
    with pytest.raises(TypeError, match="integer dtype.*fitted on floating-point inputs.*float"):
        solver.influences(x.long(), y, x, y)


def test_targets_that_broadcast_against_the_outputs_are_refused():
    """Issue 19: MSE targets (n,) against outputs (n, 1) broadcast to (n, n) and change H."""
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"broadcasts the targets against the outputs.*y\.reshape\(-1, 1\)"):
        di.DirectInfluence(model, torch.nn.MSELoss(), regularization=0.1).fit((x, y))
    di.DirectInfluence(model, torch.nn.MSELoss(), regularization=0.1).fit((x, y[:, None]))  # the fix works


@pytest.mark.parametrize("method", ["direct", "arnoldi", "ekfac"])
def test_a_refused_regularization_keeps_the_fit(method):
    """Issue 19: following the error's advice needs no refit (the fit is kept)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    loss = torch.nn.CrossEntropyLoss()
    from dask_influence.core.solvers.registry import solver_class

    cls = solver_class(method)
    kwargs = {"rank": 20} if method == "arnoldi" else {}
    solver = cls(model, loss, regularization=0.0, **kwargs)
    with pytest.raises(di.NotPositiveDefiniteError, match=r"The fit is kept: set solver\.regularization = ") as info:
        solver.fit((x, y))
    assert solver.is_fitted
    solver.regularization = info.value.suggested_regularization
    reference = cls(model, loss, regularization=info.value.suggested_regularization, **kwargs).fit((x, y))
    assert torch.allclose(solver.influences(x[:3], y[:3], x, y), reference.influences(x[:3], y[:3], x, y), rtol=1e-8)


def test_check_finite_names_the_first_bad_entry_and_passes_an_overflowing_sum():
    """The finite-sum shortcut: NaN, +Inf and -Inf are still found and named; entries whose sum
    overflows (float16) are finite and pass."""
    from dask_influence.core.batches import check_finite
    from dask_influence.errors import NonFiniteError

    x = torch.randn(1000, dtype=torch.float32)
    check_finite("x", x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[123] = bad
        with pytest.raises(NonFiniteError, match=r"^y contains 1 NaN/Inf value\(s\) \(first at index \(123,\)\)"):
            check_finite("y", y)
    check_finite("big", torch.full((10,), 6e4, dtype=torch.float16))  # the sum is inf; every entry finite
