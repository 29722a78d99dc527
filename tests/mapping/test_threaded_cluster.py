"""An in-process threaded Dask cluster (``LocalCluster(processes=False)``, what a notebook's
``Client(processes=False)`` starts): the driver and the workers' task threads share the
process, and two tasks of one worker share its copy of the solver and model. Fits and stores
must equal the in-memory results to rounding, with several blocks in flight at once.

The bug this guards against (every influence of a store differed, by up to 84 on the batch
job's problem, or the job failed with "Trying to access a forward AD level with an invalid
index"): forward-mode AD (``torch.func.jvp``: the curvature products of a fit and of CG's
solves, the mixed derivatives of perturbation influences) keeps its dual levels process-wide
in PyTorch, so two threads in it at once exited each other's levels and cleared each other's
tangents. ``core.gradients.second_order()``, where all forward-mode AD of the package runs,
now holds a process-wide lock. With that lock removed the end-to-end tests below fail; with
forward mode disabled instead, they pass. The same lock keeps ``second_order()``'s
process-wide attention switches consistent (without it the MHA fast path stayed off after
the attention job below). Hardening with a unit test: ``flat_params`` reads the weights
under the forward lock, never another thread's functorch wrappers.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from cases import mapping_problem
from dask_influence.core import gradients
from dask_influence.core.task import pair_task
from dask_influence.mapping import tasks as mapping_tasks
from dask_influence.mapping.store import is_complete

ROOT = Path(__file__).resolve().parents[2]
# each job runs twice on the same cluster (the second run meets warm workers); CG solves its
# test factors on the client (one distributed sweep per iteration) in the first round and in
# the factor tasks on the workers (several CG solves in the worker threads at once) in the second
ROUNDS = ({"factors": "client"}, {"factors": "workers"})


@pytest.fixture(scope="module")
def threaded_client():
    """2 in-process workers x 2 threads over TCP, sharing this (the driver's) process."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def _assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual - expected).max())
    assert err <= 1e-10 * scale, f"{what}: max abs difference {err:.3e} (scale {scale:.3e})"


def _run_job(make_solver, train, test, client, tmp_path, *, train_block, test_block, tag, factors):
    """Fit on the threaded cluster and write a store; returns (influences, self_influences)."""
    solver = make_solver()
    calc = di.DaskInfluenceCalculator(solver, client, progress=False, factors=factors)
    calc.fit(train(train_block))
    group = calc.influences_to_zarr(
        test(test_block), train(train_block), tmp_path / f"{tag}.zarr", self_influences=True, top_k=3
    )
    assert is_complete(group)
    return group["influences"][...], group["self_influences"][...]


# -- the problems and solvers -------------------------------------------------------------------
def _batch_job_problem():
    """The `dask-influence run` problem of the failing full-suite run: the batch job's ridge
    regression (nn.Linear(20, 1), MSE, float64) on 90 training and 14 test points."""
    spec = importlib.util.spec_from_file_location("threaded_batch_job_factory", ROOT / "examples/batch_job/factory.py")
    factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factory)
    return factory.make_problem(n_train=90, n_test=14)


def _mlp():
    model, loss, (x, y), (xt, yt) = mapping_problem(n_train=60, n_test=12)
    return model, loss, (x, y), (xt, yt)


CASES = {
    # (problem, solver class, hyperparameters, train block, test block)
    "direct-batch-job": ("batch_job", di.DirectInfluence, {"regularization": 1e-3}, 16, 5),
    "direct": ("mlp", di.DirectInfluence, {"regularization": 0.05}, 6, 4),
    "cg": ("mlp", di.CgInfluence, {"regularization": 0.05, "curvature": "ggn", "rtol": 1e-13}, 12, 6),
    "ekfac": ("mlp", di.EkfacInfluence, {"regularization": 0.05}, 6, 4),
}


def _problem(kind):
    if kind == "batch_job":
        p = _batch_job_problem()
        return p["model"], p["loss"], p["train"].tensors, p["test"].tensors
    return _mlp()


@pytest.mark.parametrize("case", list(CASES))
def test_threaded_cluster_equals_in_memory(case, threaded_client, tmp_path):
    kind, cls, hyper, train_block, test_block = CASES[case]
    model, loss, (x, y), (xt, yt) = _problem(kind)

    reference = cls(model, loss, **hyper).fit(DataLoader(TensorDataset(x, y), batch_size=train_block))
    expected = reference.influences(xt, yt, x, y).numpy()
    expected_self = reference.self_influences(x, y).numpy()

    def train(block):
        return DataLoader(TensorDataset(x, y), batch_size=block)

    def test(block):
        return DataLoader(TensorDataset(xt, yt), batch_size=block)

    for round_, options in enumerate(ROUNDS):
        # a fresh solver each round; each worker gets its own copy of it (the graph is
        # serialized), which its two threads share
        values, self_values = _run_job(
            lambda: cls(model, loss, **hyper),
            train,
            test,
            threaded_client,
            tmp_path,
            train_block=train_block,
            test_block=test_block,
            tag=f"{case}-{round_}",
            **options,
        )
        _assert_close(values, expected, f"{case} influences, round {round_}")
        _assert_close(self_values, expected_self, f"{case} self-influences, round {round_}")


def test_threaded_cluster_perturbation_influences_equal_in_memory(threaded_client, tmp_path):
    """Perturbation influences: mixed derivatives in the inputs (forward mode where the inputs have
    fewer features than the test block has points) in several worker threads at once."""
    model, loss, (x, y), (xt, yt) = _mlp()
    reference = di.DirectInfluence(model, loss, regularization=0.05).fit((x, y))
    expected = reference.influences(xt, yt, x, y, mode="perturbation").numpy()  # (12, 60, 4)
    solver = di.DirectInfluence(model, loss, regularization=0.05)
    calc = di.DaskInfluenceCalculator(solver, threaded_client, progress=False)
    calc.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    group = calc.influences_to_zarr(
        DataLoader(TensorDataset(xt, yt), batch_size=6),
        DataLoader(TensorDataset(x, y), batch_size=6),
        tmp_path / "perturbation.zarr",
        mode="perturbation",
    )
    _assert_close(group["influences"][...], expected, "perturbation influences")


# -- a dict-batch task model with attention (every curvature product under second_order()) --------
class _TextClassifier(nn.Module):
    """Token ids -> embedding -> one TransformerEncoderLayer -> masked mean -> classes."""

    def __init__(self, vocab=10, d=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * w).sum(1) / w.sum(1))


def _text_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (n, 4), generator=g)
    mask = torch.ones(n, 4, dtype=torch.int64)
    mask[::3, 3:] = 0
    return {
        "input_ids": ids.numpy(),
        "attention_mask": mask.numpy(),
        "labels": torch.randint(0, 3, (n,), generator=g).numpy(),
    }


def test_threaded_cluster_dict_batches_with_attention(threaded_client, tmp_path):
    torch.manual_seed(0)
    model = _TextClassifier().double().eval()
    task = di.tasks.classification(perturb=None)
    train, test = _text_data(24, 1), _text_data(6, 2)
    hyper = {"regularization": 0.5, "rtol": 1e-13, "curvature": "ggn"}
    reference = di.CgInfluence(model, task, **hyper).fit(train)
    expected = reference.influences(test, train).numpy()
    for round_, options in enumerate(ROUNDS):
        solver = di.CgInfluence(model, task, **hyper)
        calc = di.DaskInfluenceCalculator(solver, threaded_client, progress=False, **options)
        calc.fit(train, train_block_size=6)
        group = calc.influences_to_zarr(
            test, train, tmp_path / f"text-{round_}.zarr", test_block_size=3, train_block_size=6
        )
        _assert_close(group["influences"][...], expected, f"dict batches, round {round_}")
    # the process-wide attention switches are as they were before the jobs
    assert torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


# -- the two shared-process hazards, directly ----------------------------------------------------
def _attention_switches():
    return torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled()


def test_second_order_runs_in_one_thread_at_a_time():
    """Forward-mode AD keeps its levels process-wide, and second_order() switches process-wide
    flags (the SDPA backend, the MHA fast path): a second thread waits until the first has left
    the block, and the flags are back as they were after both."""
    before = _attention_switches()
    inside, release = threading.Event(), threading.Event()
    events = []

    def first():
        with gradients.second_order():
            inside.set()
            release.wait(10)
            events.append("first leaves")

    def second():
        with gradients.second_order():
            events.append(("second enters", _attention_switches()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert inside.wait(10)
    threads[1].start()
    threads[1].join(0.3)
    assert threads[1].is_alive() and events == []  # waiting for the first thread to leave
    assert _attention_switches() == (False, False)
    release.set()
    for thread in threads:
        thread.join(10)
    assert events == ["first leaves", ("second enters", (False, False))]
    assert _attention_switches() == before
    with gradients.second_order():  # re-entrant in one thread
        with gradients.second_order():
            pass
        assert _attention_switches() == (False, False)
    assert _attention_switches() == before


def test_flat_params_waits_for_a_forward_of_another_thread():
    """flat_params never sees the parameters that functional_call swapped in for another
    thread's forward: it reads under the same lock."""
    model = nn.Linear(3, 2).double()
    spec = gradients.ParamSpec.from_model(model)
    expected = gradients.flat_params(model, spec).clone()
    fns = gradients.ModelFunctions(model, pair_task(nn.MSELoss()))
    in_forward, release = threading.Event(), threading.Event()
    read = []

    def slow_loss(m, batch):
        in_forward.set()
        release.wait(10)
        return m(batch[0]).pow(2).mean()

    def forward():
        fns.apply(torch.zeros_like(expected), slow_loss, (torch.ones(1, 3, dtype=torch.float64),))

    thread = threading.Thread(target=forward)
    thread.start()
    assert in_forward.wait(10)
    reader = threading.Thread(target=lambda: read.append(gradients.flat_params(model, spec)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # waiting for the forward to leave
    release.set()
    thread.join(10)
    reader.join(10)
    torch.testing.assert_close(read[0], expected, rtol=0, atol=0)


def _threads_of_a_new_thread():
    """torch's thread count as a thread started now sees it (the process-wide default)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return out[0]


def test_match_threads_leaves_a_shared_process_alone(threaded_client):
    """In-process workers share the driver's process: their tasks do not change its torch
    threads (set by the user, or by tests/conftest.py), neither this thread's nor the default
    that new threads start with."""
    torch.set_num_threads(1)
    before = (torch.get_num_threads(), _threads_of_a_new_thread())

    def task():
        mapping_tasks._match_threads()  # the workers have 2 threads
        return torch.get_num_threads()

    counts = threaded_client.gather([threaded_client.submit(task, pure=False) for _ in range(4)])
    assert counts == [1, 1, 1, 1]
    assert (torch.get_num_threads(), _threads_of_a_new_thread()) == before == (1, 1)
