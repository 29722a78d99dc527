"""Tasks and batches of any structure, against ground truth.

- dict batches give the influences of the same data as tensor pairs (float64, 1e-10);
- a measurement other than the loss puts its gradient on the test side (dense reference);
- perturbation influences through a named float input; integer inputs refused clearly.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev

import dask_influence as di
from cases import solver_cases


class Net(nn.Module):
    """A classifier whose forward takes a keyword (as Hugging Face models do)."""

    def __init__(self, d=4, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, c))

    def forward(self, features):
        return self.body(features)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, x, y


class _Pair(nn.Module):
    """``Net`` called positionally, for the pair form."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(features=x)


CASES = [
    pytest.param(case.cls, case.kwargs, id=case.name)
    for case in solver_cases(override={"arnoldi": {"rank": 51, "krylov_dimension": 51}})
]


@pytest.mark.parametrize("cls, kwargs", CASES)
def test_dict_batches_equal_tensor_pairs(problem, cls, kwargs):
    net, x, y = problem
    lam = 0.5
    # the same loader layout on both sides (LiSSA draws its random batches from the dataset)
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    pair = cls(_Pair(net), nn.CrossEntropyLoss(), regularization=lam, **kwargs).fit(pairs)
    expected = pair.influences(x[:5], y[:5], x, y)
    task = di.tasks.classification(perturb="features")
    solver = cls(net, task, regularization=lam, **kwargs)
    loader = torch.utils.data.DataLoader(
        [{"features": x[i], "labels": y[i]} for i in range(len(x))], batch_size=16, shuffle=False
    )
    solver.fit(loader)
    result = solver.influences({"features": x[:5], "labels": y[:5]}, {"features": x, "labels": y})
    scale = float(expected.abs().max())
    assert float((result - expected).abs().max()) <= 1e-10 * scale
    selfs = solver.self_influences({"features": x[:7], "labels": y[:7]})
    assert torch.allclose(selfs, pair.self_influences(x[:7], y[:7]), rtol=1e-10, atol=1e-12 * scale)


def _flat_loss(model, fn, batch):
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for k, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for k, p in model.named_parameters() if p.requires_grad])

    def of(t):
        params, at = {}, 0
        for name, shape in zip(names, shapes):
            k = int(torch.Size(shape).numel())
            params[name] = t[at : at + k].view(shape)
            at += k
        return functional_call(model, params, (batch["features"],))

    return theta, lambda t: fn(of(t))


def test_measurement_gradient_is_on_the_test_side(problem):
    net, x, y = problem
    lam = 0.3
    task = di.tasks.classification(measurement="margin", perturb="features")
    solver = di.DirectInfluence(net, task, regularization=lam).fit({"features": x, "labels": y})
    result = solver.influences({"features": x[:4], "labels": y[:4]}, {"features": x, "labels": y})
    # dense reference: H of the mean cross-entropy, margin gradients of the test points
    theta, mean_loss = _flat_loss(net, lambda out: nn.functional.cross_entropy(out, y), {"features": x})
    h = jacrev(grad(mean_loss))(theta)

    def sample(fn, i):
        return _flat_loss(net, fn, {"features": x[i : i + 1]})[1]

    def margin(i):
        def fn(out):
            true = out[0, y[i]]
            others = torch.cat([out[0, : y[i]], out[0, y[i] + 1 :]])
            return true - torch.logsumexp(others, dim=0)

        return grad(sample(fn, i))(theta)

    g_test = torch.stack([margin(i) for i in range(4)])
    g_train = torch.stack(
        [grad(sample(lambda out, i=i: nn.functional.cross_entropy(out, y[i : i + 1]), i))(theta) for i in range(40)]
    )
    expected = g_test @ torch.linalg.solve(h + lam * torch.eye(len(theta), dtype=h.dtype), g_train.T)
    assert float((result - expected).abs().max()) <= 1e-10 * float(expected.abs().max())
    # and the measurement is not the loss: the loss's influences differ
    plain = di.DirectInfluence(net, di.tasks.classification(), regularization=lam).fit({"features": x, "labels": y})
    other = plain.influences({"features": x[:4], "labels": y[:4]}, {"features": x, "labels": y})
    assert float((other - result).abs().max()) > 1e-3 * float(expected.abs().max())


def test_perturbation_through_a_named_float_input(problem):
    net, x, y = problem
    task = di.tasks.classification(perturb="features")
    solver = di.DirectInfluence(net, task, regularization=0.5).fit({"features": x, "labels": y})
    pert = solver.influences(
        {"features": x[:3], "labels": y[:3]}, {"features": x[:6], "labels": y[:6]}, mode="perturbation"
    )
    pair = di.DirectInfluence(_Pair(net), nn.CrossEntropyLoss(), regularization=0.5).fit((x, y))
    expected = pair.influences(x[:3], y[:3], x[:6], y[:6], mode="perturbation")
    assert pert.shape == (3, 6, 4)
    assert float((pert - expected).abs().max()) <= 1e-10 * float(expected.abs().max())


def test_perturbation_of_integer_tokens_is_refused_with_the_way_out():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double()

    class ByKey(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return self.m(input_ids)

    ids, labels = torch.randint(0, 10, (20, 3)), torch.randint(0, 3, (20,))
    solver = di.CgInfluence(ByKey(), di.tasks.classification(perturb="input_ids"), regularization=0.5)
    solver.fit({"input_ids": ids, "labels": labels})
    batch = {"input_ids": ids[:2], "labels": labels[:2]}
    with pytest.raises(
        TypeError, match=r"must be floating point; got the input 'input_ids' of dtype torch.int64.*embeddings"
    ):
        solver.influences(batch, batch, mode="perturbation")
    none = di.CgInfluence(ByKey(), di.tasks.classification(perturb=None), regularization=0.5)
    none.fit({"input_ids": ids, "labels": labels})
    with pytest.raises(ValueError, match=r"names none; pass Task\(\.\.\., perturb="):
        none.influences(batch, batch, mode="perturbation")
    # up-weighting works on the same integer inputs
    assert none.influences(batch, batch).shape == (2, 2)


def test_task_solver_takes_one_batch_and_says_so(problem):
    net, x, y = problem
    solver = di.DirectInfluence(net, di.tasks.classification(), regularization=0.5).fit({"features": x, "labels": y})
    with pytest.raises(TypeError, match=r"takes the points as ONE batch"):
        solver.influence_factors(x, y)


def test_task_errors_name_the_problem():
    with pytest.raises(ValueError, match="outputs and Task.output_loss together"):
        di.Task(loss=lambda m, b: m(b[0]).sum(), outputs=lambda m, b: m(b[0]))
    with pytest.raises(TypeError, match="Task.loss must be a function"):
        di.Task(loss=3)
    task = di.Task(loss=lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"]))
    model = nn.Linear(2, 1).double()
    with pytest.raises(ValueError, match=r"EK-FAC needs the loss as a function of the model outputs"):
        di.EkfacInfluence(model, task)
    data = {"x": torch.randn(8, 2, dtype=torch.float64), "y": torch.randn(8, 1, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"does not give the model outputs.*curvature='ggn'"):
        di.DirectInfluence(model, task, regularization=0.1, curvature="ggn").fit(data)
    # a custom task without outputs still works with the Hessian
    solver = di.DirectInfluence(model, task, regularization=0.1).fit(data)
    assert solver.influences(data).shape == (8, 8)


def test_regression_task_refuses_broadcasting_targets():
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"outputs of shape \(1, 1\) with targets of shape \(1,\).*reshape"):
        di.DirectInfluence(model, di.tasks.regression(), regularization=0.1).fit((x, y))
    solver = di.DirectInfluence(model, di.tasks.regression(), regularization=0.1).fit((x, y[:, None]))
    pair = di.DirectInfluence(model, nn.MSELoss(), regularization=0.1).fit((x, y[:, None]))
    assert torch.allclose(solver.influences((x[:3], y[:3, None])), pair.influences(x[:3], y[:3, None]), rtol=1e-10)


def test_saved_fit_of_a_task_solver_loads_with_the_same_task_only(problem, tmp_path):
    net, x, y = problem
    data = {"features": x, "labels": y}
    solver = di.DirectInfluence(net, di.tasks.classification(), regularization=0.5).fit(data)
    solver.save(tmp_path / "fit.pt")
    again = di.DirectInfluence.load(tmp_path / "fit.pt", net, di.tasks.classification())
    assert torch.equal(again.influences(data), solver.influences(data))
    with pytest.raises(ValueError, match=r"fitted with the training loss classification: .*loss\(outputs, targets\)"):
        di.DirectInfluence.load(tmp_path / "fit.pt", _Pair(net), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"training loss classification: .* but this solver's is regression: "):
        di.DirectInfluence.load(tmp_path / "fit.pt", net, di.tasks.regression())


def test_ekfac_refuses_an_autograd_output_hessian_too_large_to_form():
    model = nn.Linear(2, 4100).double()
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 4100, (4,))
    solver = di.EkfacInfluence(model, lambda o, t: nn.functional.cross_entropy(o, t), regularization=0.1)
    with pytest.raises(ValueError, match=r"outputs have 4,100 entries per sample.*CgInfluence or ArnoldiInfluence"):
        solver.fit((x, y))
