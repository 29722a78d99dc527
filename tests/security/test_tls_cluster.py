"""Real TLS on 127.0.0.1: a scheduler and two workers started with certificates
made here; `dask-influence run` and the Python API reach them with the right certificates and
write the store a sequential run writes; without certificates, over plain TCP, or with the
certificates of another CA they are refused in one line and nothing is written."""

from __future__ import annotations

import gc
import os
import subprocess
import textwrap
import warnings
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from torch.utils.data import DataLoader

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.mapping.clients import connect
from dask_influence.mapping.security import CLI_SOURCE, TlsFiles, UnencryptedSchedulerWarning
from dask_influence.mapping.store import is_complete
from tls_cluster import BIN, Certs, cluster_certs, make_certs, start_tls_cluster, stop

pytestmark = [pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "batch_job"
N_TRAIN, N_TEST, TEST_BLOCK, TRAIN_BLOCK = 60, 8, 4, 25  # 2 x 3 chunks, ragged last train block
N_CHUNKS = 6


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Certs]:
    """Two unrelated CAs: ``cluster`` (deploy/make_certs.py: the scheduler's, workers' and client's)
    and ``other`` (``Security.temporary()``)."""
    root = tmp_path_factory.mktemp("certs")
    return {"cluster": cluster_certs(root / "cluster"), "other": make_certs(root / "other")}


@pytest.fixture(scope="module")
def tls_scheduler(certs, tmp_path_factory):
    """The ``tls://127.0.0.1:PORT`` address of a scheduler and two workers with the cluster's certificates."""
    address, processes = start_tls_cluster(certs["cluster"], tmp_path_factory.mktemp("dask-logs"))
    try:
        yield address
    finally:
        stop(processes)
        assert all(proc.poll() is not None for proc in processes)


def write_job(directory: Path, *, cluster: str = "", store: str = "influences.zarr") -> Path:
    path = directory / "job.toml"
    path.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "factory:make_problem"
        path = "{EXAMPLE}"
        options = {{ n_train = {N_TRAIN}, n_test = {N_TEST} }}

        [solver]
        method = "direct"
        regularization = 1e-3
        distributed_fit = false            # the fit of this process: the blocks are then bit for bit the same

        [blocks]
        test = {TEST_BLOCK}
        train = {TRAIN_BLOCK}

        [output]
        store = "{store}"
        top_k = 3
        self_influences = true

        [cluster]
        """)
        + cluster
        + "\n"
    )
    return path


def invoke(*args, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # not a clean "Error: ..." exit
    return result


@pytest.fixture(scope="module")
def sequential_store(tmp_path_factory) -> Path:
    """The job's store written in this process (``[cluster] sequential = true``): the reference."""
    directory = tmp_path_factory.mktemp("sequential")
    result = invoke("run", write_job(directory, cluster="sequential = true"), "--quiet")
    assert result.exit_code == 0, result.output
    return directory / "influences.zarr"


def assert_same_store(store: Path, reference: Path) -> None:
    """Complete, and every array equal to the reference store's (bit for bit)."""
    group, expected = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference), mode="r")
    assert is_complete(group)
    for name in ("influences", "self_influences", "top_helpful_indices", "top_harmful_indices"):
        np.testing.assert_array_equal(group[name][...], expected[name][...], err_msg=name)
    assert group["influences"].shape == (N_TEST, N_TRAIN)
    assert group["influences"].chunks == (TEST_BLOCK, TRAIN_BLOCK)


def error_line(result) -> str:
    """The one ``Error:`` line of a refused command (nothing else on stderr but warnings)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "SSLError" not in result.output, result.output
    return lines[0]


# -- the command line -------------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_run_with_the_right_certificates_writes_the_sequential_store(tmp_path, certs, tls_scheduler, sequential_store):
    """`dask-influence run --scheduler tls://... --tls-*` in a child process, as a deployment runs it."""
    job = write_job(tmp_path)
    command = [str(BIN / "dask-influence"), "run", str(job), "--scheduler", tls_scheduler, *certs["cluster"].options()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"on the scheduler at {tls_scheduler} (2 workers now)" in done.stderr
    assert "Warning" not in done.stderr
    assert f"({N_CHUNKS}/{N_CHUNKS} chunks; {N_CHUNKS} computed, 0 already done)" in done.stdout
    assert_same_store(tmp_path / "influences.zarr", sequential_store)


def test_certificates_from_the_job_file(tmp_path, certs, tls_scheduler, sequential_store):
    """[cluster] security with paths relative to the job file; --tls-* options win over it."""
    cluster = certs["cluster"]
    for name in ("ca", "cert", "key"):  # next to the job file
        (tmp_path / f"{name}.pem").write_bytes(getattr(cluster, name).read_bytes())
    security = 'security = { ca_file = "ca.pem", cert = "cert.pem", key = "key.pem" }'
    job = write_job(tmp_path, cluster=f'scheduler = "{tls_scheduler}"\n{security}')
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    assert f"on the scheduler at {tls_scheduler} (2 workers now)" in result.output
    assert_same_store(tmp_path / "influences.zarr", sequential_store)

    # the other CA's files on the command line win over the job file's (and are refused)
    again = invoke("run", job, "--overwrite", *certs["other"].options())
    assert error_line(again) == (
        f"Error: the Dask scheduler at {tls_scheduler} (from [cluster] scheduler) presented a certificate that the "
        f"CA {certs['other'].ca} (--tls-ca-file) does not accept (CERTIFICATE_VERIFY_FAILED: certificate verify "
        "failed: self-signed certificate in certificate chain): give the CA certificate of the cluster's certificates."
    )


def test_certificates_from_dasks_configuration(tmp_path, certs, tls_scheduler, sequential_store):
    """No --tls-* options and no [cluster] security: Dask's distributed.comm.tls.* configuration."""
    cluster = certs["cluster"]
    settings = {
        "distributed.comm.tls.ca-file": str(cluster.ca),
        "distributed.comm.tls.client.cert": str(cluster.cert),
        "distributed.comm.tls.client.key": str(cluster.key),
    }
    with dask.config.set(settings):
        result = invoke("run", write_job(tmp_path), "--scheduler", tls_scheduler)
    assert result.exit_code == 0, result.output
    assert_same_store(tmp_path / "influences.zarr", sequential_store)


def test_no_certificates_is_refused_and_nothing_is_written(tmp_path, tls_scheduler):
    job = write_job(tmp_path)
    result = invoke("run", job, "--scheduler", tls_scheduler)
    assert error_line(result) == (
        f"Error: the Dask scheduler address {tls_scheduler} (from --scheduler) is tls:// but no TLS certificates "
        "are given: pass --tls-ca-file, --tls-cert and --tls-key (or [cluster] security in the job file, or "
        "Dask's distributed.comm.tls.* configuration)."
    )
    assert not (tmp_path / "influences.zarr").exists()


def test_plain_tcp_to_the_tls_scheduler_is_refused_and_nothing_is_written(tmp_path, tls_scheduler):
    job = write_job(tmp_path)
    plain = tls_scheduler.replace("tls://", "tcp://")
    result = invoke("run", job, "--scheduler", plain)
    line = error_line(result)
    assert line.startswith(
        f"Error: the Dask scheduler at {plain} (from --scheduler) closed the connection of this plain TCP client ("
    ), line
    assert line.endswith(
        "a scheduler started with TLS does this: connect with tls://HOST:PORT and the cluster's certificates "
        "(--tls-ca-file, --tls-cert, --tls-key)."
    ), line
    assert "Warning" not in result.output  # 127.0.0.1: no warning about an unencrypted remote scheduler
    assert not (tmp_path / "influences.zarr").exists()


def test_another_cas_certificates_are_refused_and_nothing_is_written(tmp_path, certs, tls_scheduler):
    job = write_job(tmp_path)
    other = certs["other"]
    result = invoke("run", job, "--scheduler", tls_scheduler, *other.options())
    assert error_line(result) == (
        f"Error: the Dask scheduler at {tls_scheduler} (from --scheduler) presented a certificate that the CA "
        f"{other.ca} (--tls-ca-file) does not accept (CERTIFICATE_VERIFY_FAILED: certificate verify failed: "
        "self-signed certificate in certificate chain): give the CA certificate of the cluster's certificates."
    )
    # the cluster's CA, but a client certificate of the other CA: the scheduler refuses it
    mixed = ["--tls-ca-file", certs["cluster"].ca, "--tls-cert", other.cert, "--tls-key", other.key]
    result = invoke("run", job, "--scheduler", tls_scheduler, *mixed)
    line = error_line(result)
    # TLS 1.3: the scheduler's refusal arrives as its alert, or as the connection closed mid-handshake
    refused = f"Error: the Dask scheduler at {tls_scheduler} (from --scheduler) refused this client's certificate "
    assert line.startswith(
        (
            f"{refused}{other.cert} (--tls-cert) (TLSV1_ALERT_UNKNOWN_CA: ",
            f"{refused}{other.cert} (--tls-cert) (SSLEOFError: EOF occurred in violation of protocol",
        )
    ), line
    assert line.endswith("give a certificate signed by the cluster's CA (and not expired)."), line
    assert not (tmp_path / "influences.zarr").exists()


def test_tls_to_a_plain_tcp_scheduler_is_refused(tmp_path, certs):
    """Certificates and tls:// to a scheduler started without TLS (here, in this process)."""
    from distributed import LocalCluster

    job = write_job(tmp_path)
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None) as plain:
        address = plain.scheduler_address.replace("tcp://", "tls://")
        result = invoke("run", job, "--scheduler", address, *certs["cluster"].options())
    # the reason in parentheses is the TLS stack's, and depends on when the plain scheduler answers:
    # "IOStream is not idle; cannot convert to SSL" or "WRONG_VERSION_NUMBER: wrong version number"
    line = error_line(result)
    head = f"Error: the Dask scheduler at {address} (from --scheduler) does not speak TLS ("
    tail = (
        "): it was started without certificates; start it with --tls-ca-file/--tls-cert/--tls-key, "
        "or connect to it with tcp:// on a trusted network."
    )
    assert line.startswith(head) and line.endswith(tail), line
    assert line[len(head) : -len(tail)] in (
        "IOStream is not idle; cannot convert to SSL",
        "WRONG_VERSION_NUMBER: wrong version number",
    ), line
    assert not (tmp_path / "influences.zarr").exists()


# -- the Python API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tls_batch_job_factory", EXAMPLE / "factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made = module.make_problem(n_train=N_TRAIN, n_test=N_TEST)
    solver = di.DirectInfluence(made["model"], made["loss"], regularization=1e-3)
    solver.fit(DataLoader(made["train"], batch_size=TRAIN_BLOCK))
    return solver, made


def test_python_api_with_a_secured_client(tmp_path, certs, tls_scheduler, problem, sequential_store):
    from distributed import Client

    solver, made = problem
    with Client(tls_scheduler, security=certs["cluster"].security()) as client, warnings.catch_warnings():
        warnings.simplefilter("error", UnencryptedSchedulerWarning)  # a tls:// client is not warned about
        calc = di.DaskInfluenceCalculator(solver, client, progress=False)
        calc.influences_to_zarr(
            DataLoader(made["test"], batch_size=TEST_BLOCK),
            DataLoader(made["train"], batch_size=TRAIN_BLOCK),
            str(tmp_path / "influences.zarr"),
            top_k=3,
            self_influences=True,
        )
        assert calc.last_run_["chunks_computed"] == N_CHUNKS
    assert_same_store(tmp_path / "influences.zarr", sequential_store)


def test_python_api_clients_without_the_clusters_certificates_are_refused(tmp_path, certs, tls_scheduler):
    from distributed import Client
    from distributed.comm.core import FatalCommClosedError

    # Dask's own refusals: no certificates at all, the other CA's certificates
    with pytest.raises(TypeError, match="TLS expects a `ssl_context` argument"):
        Client(tls_scheduler, timeout="10s")
    with pytest.raises(FatalCommClosedError, match="TLS certificate does not match"):
        Client(tls_scheduler, security=certs["other"].security(), timeout="10s")
    # a Client that failed in __init__ stops Dask's loop thread when collected: now, not inside the next one
    gc.collect()
    # the library's connect() says the same in one line naming the file
    other = certs["other"]
    files = TlsFiles(str(other.ca), str(other.cert), str(other.key))
    with pytest.raises(OSError) as refused, connect(tls_scheduler, "the test", files):
        pass
    assert str(refused.value) == (
        f"the Dask scheduler at {tls_scheduler} (from the test) presented a certificate that the CA {other.ca} "
        f"({CLI_SOURCE.split('/')[0]}) does not accept (CERTIFICATE_VERIFY_FAILED: certificate verify failed: "
        "self-signed certificate in certificate chain): give the CA certificate of the cluster's certificates."
    )
    assert not list(tmp_path.iterdir())  # nothing written


def test_scheduler_with_certificates_from_dasks_environment_as_the_helm_chart_runs_it(certs, tmp_path):
    """deploy/helm/values.yaml: `dask-scheduler --protocol tls`, the PEM text of the Secret in
    DASK_DISTRIBUTED__COMM__TLS__* variables; a worker with files; clients as before."""
    from distributed import Client
    from distributed.comm.core import FatalCommClosedError

    address, processes = start_tls_cluster(certs["cluster"], tmp_path, n_workers=1, scheduler_from_env=True)
    try:
        with Client(address, security=certs["cluster"].security(), timeout="30s") as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            assert len(client.scheduler_info()["workers"]) == 1
        with pytest.raises(FatalCommClosedError, match="TLS certificate does not match"):
            Client(address, security=certs["other"].security(), timeout="10s")
        gc.collect()  # the failed Client, now (see above)
        result = invoke("run", write_job(tmp_path), "--scheduler", address.replace("tls://", "tcp://"))
        assert "closed the connection of this plain TCP client" in error_line(result)
    finally:
        stop(processes)
