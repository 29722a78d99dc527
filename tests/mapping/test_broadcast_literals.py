"""Large graph literals (a fitted solver of GPT-2-small's size) are broadcast to the workers before a
submission instead of travelling inside the graph (:func:`dask_influence.mapping.literals.broadcast_large`)."""

import numpy as np
import torch
from distributed import Future

import dask_influence as di
from dask_influence.mapping import calculator as calc_module
from dask_influence.mapping import literals


def test_payload_bytes_counts_each_storage_once():
    weight = torch.zeros(1000, dtype=torch.float32)  # 4,000 bytes
    view = weight[:10]  # the same storage
    holder = type("Holder", (), {})()
    holder.a, holder.b, holder.nested = weight, view, {"x": [np.zeros(5)], "same": weight}  # + 40 bytes
    assert literals.payload_bytes(holder) == 4040
    model = torch.nn.Linear(10, 5)  # 55 float32 parameters
    assert literals.payload_bytes({"m": model, "again": model}) == 55 * 4
    assert literals.payload_bytes(holder, limit=100) > 100  # stops early once past the limit


def test_a_large_solver_is_broadcast_and_scores_the_same(problem, cluster_client, monkeypatch, tmp_path):
    solver, train, test = problem

    def run(name):
        calc = di.DaskInfluenceCalculator(solver, cluster_client, progress=False)
        group = calc.influences_to_zarr(test, train, str(tmp_path / name), test_block_size=4, train_block_size=10)
        return group["influences"][:]

    expected = run("literal.zarr")
    replaced: list = []

    def recording(client, dsk, threshold=None):
        out = literals.broadcast_large(client, dsk, threshold)
        replaced.extend(k for k, v in out.items() if isinstance(v, Future))
        return out

    monkeypatch.setattr(calc_module, "broadcast_large", recording)
    run("again.zarr")
    assert replaced == []  # the default threshold: a small solver stays a graph literal
    monkeypatch.setattr(literals, "BROADCAST_BYTES", 0)  # every literal counts as large
    got = run("broadcast.zarr")
    assert any(str(k).startswith("solver-") for k in replaced)
    np.testing.assert_array_equal(got, expected)


def test_a_large_projector_is_broadcast_once_per_build_and_the_index_is_the_same(cluster_client, monkeypatch, tmp_path):
    from cases import mapping_problem
    from dask_influence.index import build as build_module
    from dask_influence.index import runner

    model, loss, train, test = mapping_problem()
    kw = dict(projection_dim=8, train_block_size=10, client=cluster_client)
    literal = di.GradientIndex.build(model, loss, train, tmp_path / "a.zarr", **kw)
    expected = literal.influences(test)
    scattered: list = []
    original = cluster_client.scatter

    def counting(data, *args, **kwargs):
        scattered.append(type(data).__name__)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(literals, "BROADCAST_BYTES", 0)
    monkeypatch.setattr(cluster_client, "scatter", counting)
    broadcast = di.GradientIndex.build(model, loss, train, tmp_path / "b.zarr", **kw)
    assert scattered.count("Projector") == 1  # both passes of the build use the one broadcast
    assert build_module.broadcast_large is runner.broadcast_large
    np.testing.assert_array_equal(broadcast.gradients(), literal.gradients())
    np.testing.assert_array_equal(broadcast.curvature_matrix(), literal.curvature_matrix())
    np.testing.assert_array_equal(broadcast.influences(test), expected)
    assert scattered.count("Projector") == 2  # and the query's own


def test_a_lazy_result_of_a_large_solver_holds_a_broadcast_future(problem, cluster_client, monkeypatch):
    solver, train, test = problem
    calc = di.DaskInfluenceCalculator(solver, cluster_client, progress=False)
    expected = calc.influences(test, train).compute()
    monkeypatch.setattr(literals, "BROADCAST_BYTES", 0)
    lazy = calc.influences(test, train)
    assert any(isinstance(v, Future) for v in dict(lazy.__dask_graph__()).values())
    np.testing.assert_array_equal(lazy.compute(), expected)
    np.testing.assert_array_equal(calc.self_influences(train).compute(), calc.self_influences(train).compute())


def test_a_local_cluster_is_sent_to_directly_and_its_workers_trimmed(cluster_client, monkeypatch):
    """On a loopback scheduler the client scatters a large literal to the workers itself (through the scheduler,
    in the client's process with an embedded cluster, it cost a copy there and ten times the time)."""
    from dask_influence.mapping import clients

    assert clients.direct_to_workers(cluster_client)
    remote = type("Remote", (), {"scheduler": type("S", (), {"address": "tls://10.1.2.3:8786"})()})()
    assert not clients.direct_to_workers(remote) and not clients.direct_to_workers(object())
    sent: list = []
    original = type(cluster_client).scatter

    def scatter(self, data, **kw):
        sent.append(kw.get("direct"))
        return original(self, data, **kw)

    monkeypatch.setattr(type(cluster_client), "scatter", scatter)
    value = literals.Literal(np.ones(1000), "t")
    out = literals.broadcast_large(cluster_client, {"big": (literals.unbox, value)}, threshold=10)
    assert sent == [True] and isinstance(out["big"], Future)
    assert np.array_equal(cluster_client.gather(out["big"]), np.ones(1000))
    # trimming returns the workers' free heap (glibc) and never fails a job
    assert set(cluster_client.run(clients.trim_memory).values()) <= {0, 1}
    clients.trim_workers(cluster_client)
    clients.trim_workers(object())  # no client to run on: ignored
