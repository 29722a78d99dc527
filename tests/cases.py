"""The test suite's shared cases: tiny seeded problems, independent references, and the solvers.

One plain module (not a conftest, so ``from cases import ...`` is unambiguous even with several
``conftest.py`` files in the tree), importable from every test folder: ``tests/`` is on
``sys.path`` because pytest inserts the directory of ``tests/conftest.py``. Everything is
deliberately small (a few dozen samples, a few dozen parameters, float64) so that the core
suite runs fast on two CPU cores.

- **Problems**: builder functions returning a model, a loss and data, each seeded so that every
  call (and every process) builds bit-identical tensors. Builders that differ in seeds or sizes
  are kept as separately named cases, since the tests' numbers depend on their exact data.
- **References**: the functions under "independent references" do NOT use the library: they
  build the dense Hessian with ``torch.autograd.functional.hessian`` and per-sample gradients
  with plain ``torch.autograd.grad`` in a Python loop, so they are an independent ground truth
  for models that have no closed form.
- **Solvers**: :data:`SOLVER_CASES`, the small-problem hyperparameters of every solver in the
  registry (:data:`dask_influence.core.solvers.registry.SOLVERS`), and :func:`solver_cases`,
  which lists them for a parametrization and raises if a registered solver has no entry, so
  that a new solver cannot be skipped silently by the tests.

The job-file factory of the fault-injection tests stays in ``tests/reliability/reliability_problem.py``:
worker processes started there import it by that name from that folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import dask_influence  # noqa: F401  (importing the package registers its solvers)
from dask_influence.core.solvers.registry import SOLVERS


# -- comparisons -------------------------------------------------------------------------
def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (both as float64)."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return float((actual - expected).abs().max() / expected.abs().max())


def pearson(a: Tensor, b: Tensor) -> float:
    a = torch.as_tensor(a).double().flatten()
    b = torch.as_tensor(b).double().flatten()
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# -- data and models ---------------------------------------------------------------------
def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    """A non-shuffling DataLoader over ``(x, y)``."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def regression_data(n: int, d: int, *, seed: int = 0, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """Well-conditioned float64 regression data: ``x (n, d)``, ``y (n, 1)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = x @ w + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def classification_data(n: int, d: int, c: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """float64 inputs ``(n, d)`` and long labels ``(n,)`` from a noisy linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    logits = x @ w + 1.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return x, logits.argmax(dim=1)


def tanh_mlp(d_in: int, hidden: int, d_out: int, *, seed: int = 0, flatten: bool = False) -> nn.Module:
    """A tiny float64 tanh MLP in eval mode (optionally flattening a multi-dim input first)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers).double().eval()


def train_lbfgs(
    model: nn.Module,
    objective: Callable[[], Tensor],
    *,
    max_iter: int = 500,
    tolerance_grad: float = 1e-12,
) -> None:
    """Minimize ``objective()`` over the trainable parameters of ``model`` with L-BFGS."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)


def tiny_gpt2_config(**overrides: Any) -> Any:
    """The tests' tiny GPT-2 config of ``transformers``: vocabulary 16, 8 positions, width 8, one
    block of 2 heads, token 0 as BOS and EOS; ``overrides`` change or add settings (e.g.
    ``attn_implementation="eager"``, dropout). Import ``transformers`` with
    ``pytest.importorskip`` first."""
    import transformers

    settings: dict[str, Any] = dict(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2Config(**{**settings, **overrides})


def tiny_gpt2(**overrides: Any) -> nn.Module:
    """A ``GPT2LMHeadModel`` of :func:`tiny_gpt2_config` (``overrides`` passed on), float64, in eval
    mode; its weights come from torch's global generator (seed it right before)."""
    import transformers

    return transformers.GPT2LMHeadModel(tiny_gpt2_config(**overrides)).double().eval()


def tiny_bert() -> tuple[nn.Module, Tensor, Tensor]:
    """A ``BertForSequenceClassification`` (vocabulary 16, 8 positions, width 8, one layer of 2 heads,
    3 labels) in float64 and eval mode, seeded (1), with 14 sequences of 5 token ids ``(14, 5)`` and
    their labels ``(14,)`` drawn after it. Import ``transformers`` with ``pytest.importorskip`` first."""
    import transformers

    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=8,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(0, 16, (14, 5))
    return model, ids, torch.randint(0, 3, (14,))


# -- independent references --------------------------------------------------------------
def _trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
    return [k for k, _ in named], [v for _, v in named]


def reference_grads(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients ``(n, p)`` by a plain loop of ``torch.autograd.grad``."""
    _, params = _trainable(model)
    rows = []
    for i in range(x.shape[0]):
        value = loss(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(value, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).detach()


def reference_hessian(model: nn.Module, loss: Callable, x: Tensor, y: Tensor) -> Tensor:
    """Dense Hessian ``(p, p)`` of the MEAN per-sample loss over all of ``(x, y)``."""
    names, params = _trainable(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    others = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    buffers = dict(model.named_buffers())

    def mean_loss(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, sizes)
        state = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        state.update(others)
        state.update(buffers)
        n = x.shape[0]
        total = 0
        for i in range(n):
            out = torch.func.functional_call(model, state, (x[i : i + 1],))
            total = total + loss(out, y[i : i + 1])
        return total / n

    hess = torch.autograd.functional.hessian(mean_loss, theta0)
    return 0.5 * (hess + hess.T)


def reference_influences(
    model: nn.Module,
    loss: Callable,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    x: Tensor | None = None,
    y: Tensor | None = None,
    *,
    regularization: float,
) -> Tensor:
    """``grad L(test)^T (H + reg I)^-1 grad L(x, y)`` ``(n_test, n)`` with ``H`` from the training set."""
    if x is None:
        x, y = x_train, y_train
    hess = reference_hessian(model, loss, x_train, y_train).double()
    hess = hess + regularization * torch.eye(hess.shape[0], dtype=torch.float64)
    g_test = reference_grads(model, loss, x_test, y_test).double()
    g = reference_grads(model, loss, x, y).double()
    return g_test @ torch.linalg.solve(hess, g.T)


# -- problems ------------------------------------------------------------------------------------
# Each builder documents what it returns; all are float64 and seeded. Data draws use their own
# torch.Generator; weights come from torch.manual_seed(seed) right before the model is built.
def random_labels(n: int, d: int, classes: int, generator: torch.Generator | int) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, 1)`` float64 ``(n, d)``, then uniform labels in ``[0, classes)`` ``(n,)``, from ``generator``.

    Pass a seed for a fresh generator, or a generator to continue its stream (a test set drawn
    after the training set).
    """
    g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


def mlp_regression_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A 3-6-1 tanh MLP (31 parameters, untrained) with MSE on 24 training and 5 test points.

    Returns ``model, loss, x, y, x_test, y_test`` (the ``mlp_regression`` fixture). Its Hessian's
    most negative eigenvalue is about -2: tests regularize it with 3.0.
    """
    x, y = regression_data(29, 3, seed=3)
    model = tanh_mlp(3, 6, 1, seed=3)
    return model, nn.MSELoss(), x[:24], y[:24], x[24:], y[24:]


def mlp_classification_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A 3-5-3 tanh MLP (38 parameters, untrained) with cross entropy on 24 training and 5 test points.

    Returns ``model, loss, x, y, x_test, y_test`` (the ``mlp_classification`` fixture).
    """
    x, y = classification_data(29, 3, 3, seed=4)
    model = tanh_mlp(3, 5, 3, seed=4)
    return model, nn.CrossEntropyLoss(), x[:24], y[:24], x[24:], y[24:]


def small_regression_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A 3-4-1 tanh MLP (21 parameters, untrained) with MSE on 20 training and 5 test points (seed 21).

    Returns ``model, loss, x, y, x_test, y_test`` (the bad-input tests of ``core/test_errors.py``).
    """
    x, y = regression_data(25, 3, seed=21)
    model = tanh_mlp(3, 4, 1, seed=21)
    return model, nn.MSELoss(), x[:20], y[:20], x[20:], y[20:]


def trained_classification_problem(n: int = 47, n_test: int = 6, seed: int = 1):
    """A 4-5-3 tanh MLP (43 parameters) near a minimum of its L2-regularized cross entropy.

    ``n + n_test`` points are drawn at once (4 features, 3 classes) and the model is trained on the
    first ``n`` with 300 Adam steps (lr 0.05, weight decay 0.05), so that ``H + 0.3 I`` is
    positive definite. Returns ``model, loss, (x, y), (x_test, y_test)``.
    """
    x, y = random_labels(n + n_test, 4, 3, seed)
    model = tanh_mlp(4, 5, 3, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    return model, nn.CrossEntropyLoss(), (x[:n], y[:n]), (x[n:], y[n:])


def fit_problem(n: int = 47, seed: int = 1):
    """The fitting tests' problem: :func:`trained_classification_problem` with 6 test points.

    Returns ``model, loss, (x, y), (x_test, y_test)``; ``tests/fitting/fit_cases.py`` re-exports it
    as ``make_problem``.
    """
    return trained_classification_problem(n, 6, seed)


def save_load_problem():
    """The save/load tests' problem: :func:`trained_classification_problem` on 30 points, seed 1, no test set.

    Returns ``model, loss, x, y``.
    """
    model, loss, (x, y), _ = trained_classification_problem(30, 0, 1)
    return model, loss, x, y


def layer_blocks_problem():
    """A 3-5-4-3 tanh MLP (55 parameters; its middle layer has no bias, untrained, in training
    mode) with cross entropy on 40 points (seed 3): three layers of 20, 20 and 15 parameters.

    Returns ``model, loss, x, y``.
    """
    x, y = random_labels(40, 3, 3, 3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, nn.CrossEntropyLoss(), x, y


def mapping_problem(n_train: int = 53, n_test: int = 17, n_features: int = 4, n_classes: int = 3, seed: int = 0):
    """A ``n_features``-6-``n_classes`` tanh MLP fitted loosely (100 Adam steps, lr 0.05) on random
    classification data; the test set is drawn after the training set from the same generator.

    Returns ``model, loss, (x, y), (x_test, y_test)`` (the mapping tests' fitted solver fixture).
    """
    g = torch.Generator().manual_seed(seed)
    x, y = random_labels(n_train, n_features, n_classes, g)
    xt, yt = random_labels(n_test, n_features, n_classes, g)
    model = tanh_mlp(n_features, 6, n_classes, seed=seed)
    loss = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    model.eval()
    return model, loss, (x, y), (xt, yt)


# -- solvers -----------------------------------------------------------------------------------------
GIVEN_BY_THE_TEST = frozenset({"regularization"})
"""Hyperparameters every test passes itself (they depend on the problem), never in :data:`SOLVER_CASES`."""

SOLVER_CASES: dict[str, dict[str, Any]] = {
    "direct": {},
    "cg": {},
    "lissa": {"maxiter": 50, "rtol": 1e-12},  # converges on the problems above well within maxiter
    "arnoldi": {"rank": 8},  # rank < p for every problem above (p >= 21)
    "nystroem": {"rank": 8},  # also requires regularization (> 0), which the tests pass
    "ekfac": {},
}
"""``registered solver name -> the hyperparameters it needs on the small problems above``.

Every solver in the registry needs an entry (an empty dict if the defaults do); ``regularization``
is always passed by the test itself. :func:`solver_cases` checks both.
"""


class SolverCase(NamedTuple):
    """One parametrization case: the registered name, the solver class and its keyword arguments."""

    name: str
    cls: type
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        """A test id: the name, then the string-valued hyperparameters (``"cg-jacobi-layer"``)."""
        return self.name + "".join(f"-{v}" for v in self.kwargs.values() if isinstance(v, str))


def registered_solvers() -> dict[str, type]:
    """``name -> class`` of the solvers the library registers (those defined in ``dask_influence``).

    Solver classes that a test module registers itself (a toy solver for the solver contract) are
    left out: they are tested by their own module.
    """
    return {name: cls for name, cls in SOLVERS.items() if cls.__module__.split(".")[0] == "dask_influence"}


def _checked(name: str, cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    config = cls.config_class
    unknown = sorted(set(kwargs) - set(config.field_names()))
    if unknown:
        raise ValueError(f"tests/cases.py: {name!r} ({cls.__name__}) has no hyperparameter(s) {unknown}.")
    missing = sorted(set(config.required()) - set(kwargs) - GIVEN_BY_THE_TEST)
    if missing:
        raise ValueError(f"tests/cases.py: {name!r} ({cls.__name__}) requires {missing}; add them to its case.")
    return dict(kwargs)


def solver_cases(
    *,
    exclude: Iterable[str] = (),
    override: Mapping[str, Mapping[str, Any]] | None = None,
    variants: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
) -> list[SolverCase]:
    """``[(name, cls, kwargs)]`` for every registered solver, in registration order.

    A registered solver without an entry in :data:`SOLVER_CASES` is tested with its defaults (a
    new solver is never skipped; add an entry if its defaults do not suit the small problems).
    Raises ``LookupError`` for names that are not registered, and ``ValueError`` if an entry names
    a hyperparameter the solver does not have or lacks one it requires.

    - ``exclude``: registered names this test leaves out on purpose (each must be registered).
    - ``override``: ``name -> kwargs`` used INSTEAD of ``SOLVER_CASES[name]`` by this test (its
      problem or its tolerance needs other values).
    - ``variants``: ``name -> [kwargs, ...]``: further cases of that solver, placed right after its
      main case (e.g. ``{"direct": [{"blocks": "layer"}]}``).
    """
    registered = registered_solvers()
    exclude, override, variants = set(exclude), dict(override or {}), dict(variants or {})
    unknown = sorted((exclude | set(override) | set(variants) | set(SOLVER_CASES)) - set(registered))
    if unknown:
        raise LookupError(f"tests/cases.py: {unknown} are not registered solvers (registered: {list(registered)}).")
    cases = []
    for name, cls in registered.items():
        if name in exclude:
            continue
        # a solver without an entry is tested with its defaults: a new solver is never skipped
        for kwargs in [override.get(name, SOLVER_CASES.get(name, {})), *variants.get(name, ())]:
            cases.append(SolverCase(name, cls, _checked(name, cls, kwargs)))
    return cases


class TinyLm(nn.Module):
    """A causal LM of a few dozen parameters: token embedding, a causal running mean (positions
    interact), a hidden layer and a head of ``vocab`` logits ``(n, T, vocab)``."""

    def __init__(self, vocab: int, width: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[None, :, None]
        return self.head(torch.tanh(self.hidden(h.cumsum(1) / steps)))
