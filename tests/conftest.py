"""Shared tiny seeded fixtures and the test lanes; the problems, references and solver cases live
in ``cases.py``.

Lanes (markers, assigned here by file and by measured duration; ``make test-fast`` runs
``not (slow or cluster or subprocess or docs)``, ``make test`` and CI run everything):

- ``docs``: runs the documentation, README and examples as written.
- ``subprocess``: starts child processes (the CLI in a process of its own, scheduler and worker
  processes, browsers).
- ``cluster``: starts a Dask cluster (the session's ``cluster_client`` or one of its own).
- ``slow``: took over 3 s on a loaded 2-core machine (session 9's measurement, :data:`SLOW`).
- ``gpu``: needs CUDA; skipped where ``torch.cuda.is_available()`` is false.

A test file that starts processes or clusters must say so (here or with its own markers):
collection fails naming the file otherwise, so that nothing slow drifts into the fast lane.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cases import mlp_classification_problem, mlp_regression_problem

# The suite's models are tiny: intra-op threads only add synchronization (OpenMP workers
# spin-waiting on a shared 2-core machine made the core suite ~5x slower in CPU time).
torch.set_num_threads(1)


# -- lanes -------------------------------------------------------------------------------
TESTS = Path(__file__).parent

LANES: dict[str, tuple[str, ...]] = {
    # documentation as written
    "test_docs_blocks.py": ("docs", "subprocess", "slow"),
    "test_docs_build.py": ("docs", "subprocess"),
    "test_docs_tasks.py": ("docs",),
    "test_readme.py": ("docs", "subprocess", "slow"),
    "test_examples.py": ("docs",),
    "test_examples_more.py": ("docs",),
    "test_solver_table.py": ("docs", "subprocess"),
    "evaluate/test_docs_example.py": ("docs", "slow"),
    # child processes
    "benchmarks/test_runner.py": ("subprocess", "slow"),
    "cli/test_run.py": ("subprocess", "cluster"),
    "cli/test_demo.py": ("cluster",),
    "cli/test_progress_cli.py": ("subprocess", "cluster"),
    "deploy/test_commands.py": ("subprocess",),
    "evaluate/test_benchmark_tiny.py": ("subprocess", "slow"),
    "mapping/test_worker_loss.py": ("subprocess", "cluster", "slow"),
    "reliability/test_faults.py": ("subprocess", "cluster", "slow"),
    "reliability/test_full_disk.py": ("subprocess",),
    "reliability/test_interrupt.py": ("subprocess", "cluster", "slow"),
    "reliability/test_lock.py": ("subprocess",),
    "reliability/test_cli_restarts.py": ("subprocess",),
    "storage/test_fast_commands.py": ("subprocess",),
    "security/test_tls_cluster.py": ("subprocess", "cluster"),
    # Dask clusters of their own
    "evaluate/test_cluster.py": ("cluster",),
    "fitting/test_benchmark.py": ("cluster", "slow"),
    "mapping/test_memory.py": ("cluster", "slow"),
    "mapping/test_threaded_cluster.py": ("cluster",),
    "mapping/test_broadcast_literals.py": ("cluster",),
    "mapping/test_embedded_cluster.py": ("cluster",),
    "mapping/test_shuffled_loaders.py": ("cluster",),
    "reliability/test_numerics.py": ("cluster",),
    "reliability/test_properties.py": ("cluster",),
    "reliability/test_bad_inputs.py": ("cluster",),
}
"""``path under tests/ -> markers`` of every test in that file."""

SLOW: frozenset[str] = frozenset(
    {
        "core/test_transformers.py::test_gpt2_arnoldi_at_full_rank_equals_the_dense_reference",
        "core/test_lm_roots.py::test_ekfac_refuses_closed_form_roots_too_many_to_back_propagate",
        "core/test_solve_reports.py::test_self_influences_report_one_estimate_per_training_point",
        "deploy/test_manifests.py::test_crds_ship_with_dask_kubernetes",
        "index/test_index_transformers.py::test_full_orthogonal_index_of_gpt2_equals_direct",
        "mapping/test_dict_batches.py::test_cluster_fit_and_store_with_dict_batches",
        "fitting/test_distributed_fit.py::test_fitted_solver_scores_on_the_cluster",
        "storage/test_saved_factors.py::test_a_resume_reads_the_saved_factors_and_a_refit_solves_them_again",
        "storage/test_completion_manifest.py::test_a_refit_invalidates_every_chunk_and_equals_a_clean_run",
    }
)
"""``file::test function`` (all its parameters) measured over 3 s on a loaded 2-core machine."""

# what a test file contains when it starts processes or clusters (checked against its markers)
_STARTS = {
    "subprocess": re.compile(r"subprocess\.(run|Popen|check_output|check_call)\(|\bPopen\(|multiprocessing"),
    "cluster": re.compile(r"\bLocalCluster\(|\blocal_cluster\(|\bcluster_client\b|\bfit_client\b"),
}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by the markers added here
def pytest_collection_modifyitems(config, items):
    """Add the lane markers; skip ``gpu`` tests without CUDA; refuse files whose lanes are unsaid."""
    marked: dict[Path, set[str]] = {}
    for item in items:
        path = Path(str(item.fspath))
        try:
            rel = path.relative_to(TESTS).as_posix()
        except ValueError:
            continue
        for name in LANES.get(rel, ()):
            item.add_marker(name)
        if f"{rel}::{getattr(item, 'originalname', item.name)}" in SLOW:
            item.add_marker("slow")
        if {"cluster_client", "fit_client"} & set(getattr(item, "fixturenames", ())):
            item.add_marker("cluster")
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)"))
        marked.setdefault(path, set()).update(m.name for m in item.iter_markers())
    unsaid = []
    for path, names in marked.items():
        text = path.read_text()
        unsaid += [
            f"{path.relative_to(TESTS)} ({lane})"
            for lane, starts in _STARTS.items()
            if starts.search(text) and lane not in names
        ]
    if unsaid:
        raise pytest.UsageError(
            "These test files start processes or Dask clusters but no test in them is marked for it: "
            + ", ".join(sorted(unsaid))
            + ". Add the file to LANES in tests/conftest.py (or mark its tests), so that the fast lane stays fast."
        )


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster_client():
    """ONE LocalCluster of 2 single-threaded worker processes on 127.0.0.1 for the whole session.

    Shared by the mapping and fitting tests (one cluster alive at a time, not one per folder)
    and stopped at the end of the session. Tests that kill workers start their own.
    """
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def fit_client(cluster_client):
    """The session's 2-worker cluster, under the name the fitting tests use."""
    return cluster_client


@pytest.fixture
def mlp_regression():
    """A 3-6-1 tanh MLP (31 parameters) with MSE on 24 training and 5 test points, float64."""
    return mlp_regression_problem()


@pytest.fixture
def mlp_classification():
    """A 3-5-3 tanh MLP (38 parameters) with cross entropy on 24 training and 5 test points."""
    return mlp_classification_problem()


@pytest.fixture(params=["sync", pytest.param("cluster", marks=pytest.mark.cluster)])
def scheduler(request):
    """Where a graph runs, once each: ``"sync"`` (this process, Dask's synchronous scheduler) and
    the session's 2-worker cluster (its ``Client``); pass it as ``client=`` or ``scheduler=``."""
    if request.param == "sync":
        return "sync"
    return request.getfixturevalue("cluster_client")
