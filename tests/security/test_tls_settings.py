"""Where the TLS certificates come from and which wins, the checks of the files before any
connection, the job file's [cluster] security table, and the warning about a plain tcp://
scheduler on another host (no cluster is started here)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import dask
import pytest

from dask_influence.errors import JobFileError
from dask_influence.job import load_job
from dask_influence.mapping.security import (
    CLI_SOURCE,
    CONFIG_SOURCE,
    JOB_SOURCE,
    TlsFiles,
    host_of,
    is_loopback,
    resolve_tls,
    unencrypted_warning,
)
from jobs import invoke
from tls_cluster import make_certs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "batch_job"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    return make_certs(root / "a"), make_certs(root / "b")


def write_job(directory: Path, cluster: str) -> Path:
    path = directory / "job.toml"
    path.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "factory:make_problem"
        path = "{EXAMPLE}"
        options = {{ n_train = 20, n_test = 4 }}

        [solver]
        method = "direct"
        regularization = 1e-3

        [output]
        store = "influences.zarr"

        [cluster]
        """)
        + cluster
        + "\n"
    )
    return path


# -- which certificates win -------------------------------------------------------------------


def test_command_line_wins_over_the_job_file_which_wins_over_dasks_configuration():
    cli_files = TlsFiles("cli-ca.pem", "cli.pem", source=CLI_SOURCE)
    job_files = TlsFiles("job-ca.pem", "job.pem", "job-key.pem", source=JOB_SOURCE)
    config = {
        "distributed.comm.tls.ca-file": "config-ca.pem",
        "distributed.comm.tls.client.cert": "config.pem",
        "distributed.comm.tls.client.key": "config-key.pem",
    }
    with dask.config.set(config):
        assert resolve_tls(cli_files, job_files) is cli_files
        assert resolve_tls(None, job_files) is job_files
        assert resolve_tls(TlsFiles(), job_files) is job_files  # no --tls-* given
        assert resolve_tls(None, None) == TlsFiles("config-ca.pem", "config.pem", "config-key.pem", CONFIG_SOURCE)
    with dask.config.set({k: None for k in config}):
        assert resolve_tls(None, None) is None


# -- the files, checked before connecting -----------------------------------------------------


def test_incomplete_or_broken_certificate_files_are_refused_in_one_line(tmp_path, certs):
    a, b = certs
    with pytest.raises(ValueError) as caught:
        TlsFiles(ca_file=str(a.ca)).check()
    assert str(caught.value) == (
        "TLS needs both the cluster's CA certificate and this client's certificate; --tls-cert is missing (from "
        "--tls-ca-file/--tls-cert/--tls-key). Give --tls-ca-file, --tls-cert and --tls-key (the key may be in the "
        "certificate file)."
    )
    with pytest.raises(ValueError) as caught:
        TlsFiles(str(tmp_path / "nope.pem"), str(a.cert), str(a.key)).check()
    assert str(caught.value) == f"the TLS file {tmp_path / 'nope.pem'} (--tls-ca-file) does not exist."

    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ValueError) as caught:
        TlsFiles(str(not_pem), str(a.cert), str(a.key)).check()
    assert str(caught.value).startswith(f"the TLS CA file {not_pem} (--tls-ca-file) holds no PEM certificate (")
    assert str(caught.value).endswith("a file starting with -----BEGIN CERTIFICATE-----.")

    with pytest.raises(ValueError) as caught:
        TlsFiles(str(a.ca), str(a.cert), str(b.key)).check()
    assert str(caught.value) == (
        f"the TLS key {b.key} (--tls-key) is not the private key of the certificate {a.cert} (--tls-cert) "
        "(KEY_VALUES_MISMATCH: key values mismatch): give the key the certificate was issued for."
    )

    with pytest.raises(ValueError) as caught:  # no key, and the certificate file holds none
        TlsFiles(str(a.ca), str(a.cert), None, source=JOB_SOURCE).check()
    assert str(caught.value).startswith(
        f"could not load the TLS certificate {a.cert} ([cluster] security cert) with a private key (none given "
        "with [cluster] security key, and the certificate file holds none) ("
    )

    TlsFiles(str(a.ca), str(a.cert), str(a.key)).check()  # a good set passes
    both = tmp_path / "cert-and-key.pem"
    both.write_text(a.cert.read_text() + a.key.read_text())
    TlsFiles(str(a.ca), str(both)).check()  # the key inside the certificate file


# -- the job file ---------------------------------------------------------------------------


def test_job_file_security_table_resolves_paths_against_the_job_file(tmp_path):
    job = load_job(
        write_job(
            tmp_path,
            'scheduler = "tls://scheduler:8786"\n'
            'security = { ca_file = "certs/ca.pem", cert = "/abs/c.pem", key = "k.pem" }',
        )
    )
    assert job.cluster.scheduler == "tls://scheduler:8786"
    assert job.cluster.security == TlsFiles(
        str(tmp_path / "certs" / "ca.pem"), "/abs/c.pem", str(tmp_path / "k.pem"), source=JOB_SOURCE
    )
    assert load_job(write_job(tmp_path, "")).cluster.security is None


def test_job_file_security_problems_are_listed(tmp_path):
    with pytest.raises(JobFileError) as caught:
        load_job(write_job(tmp_path, 'security = { ca_file = "ca.pem", certificate = "c.pem" }'))
    text = str(caught.value)
    assert "[cluster.security] unknown key 'certificate'; valid keys: ca_file, cert, key." in text
    assert (
        "[cluster] security needs ca_file (the cluster's CA certificate) and cert (this client's certificate; key: "
        "its private key, unless the cert file holds it); cert missing." in text
    )
    with pytest.raises(JobFileError) as caught:
        load_job(write_job(tmp_path, 'security = "ca.pem"'))
    assert '[cluster] security must be a table such as { ca_file = "ca.pem", cert = "client.pem", ' in str(caught.value)
    with pytest.raises(JobFileError) as caught:
        load_job(write_job(tmp_path, 'sequential = true\nsecurity = { ca_file = "a.pem", cert = "b.pem" }'))
    assert "[cluster] sequential = true computes in this process; remove security." in str(caught.value)


# -- the command line, before any connection --------------------------------------------------


def test_certificates_without_a_scheduler_are_refused(tmp_path, certs, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    a, _ = certs
    job = write_job(tmp_path, "workers = 1")
    result = invoke("run", job, *a.options())
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: TLS certificates are given (--tls-ca-file/--tls-cert/--tls-key) but no scheduler: the job would run "
        "on an embedded LocalCluster (or in this process), which uses no TLS. Name the scheduler with --scheduler "
        "tls://HOST:PORT (or [cluster] scheduler, or $DASK_SCHEDULER_ADDRESS), or drop the certificates."
    )
    assert not (tmp_path / "influences.zarr").exists()


def test_certificates_with_a_plain_tcp_address_are_refused(tmp_path, certs):
    a, _ = certs
    result = invoke("run", write_job(tmp_path, ""), "--scheduler", "tcp://127.0.0.1:8786", *a.options())
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: TLS certificates are given (from --tls-ca-file/--tls-cert/--tls-key) but the Dask scheduler address "
        "tcp://127.0.0.1:8786 (from --scheduler) is tcp://, which is not encrypted: write it as "
        "tls://127.0.0.1:8786."
    )


@pytest.mark.parametrize("command", ["run", "index", "query", "evaluate"])
def test_every_cluster_command_takes_the_tls_options(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    for option in ("--scheduler", "--tls-ca-file", "--tls-cert", "--tls-key"):
        assert option in result.output, (command, option)


# -- the warning about a plain tcp:// scheduler on another host ---------------------------------


@pytest.mark.parametrize(
    "address,warned",
    [
        ("tcp://10.0.0.5:8786", True),
        ("scheduler:8786", True),  # no scheme: Dask's default, tcp://
        ("tcp://scheduler.example.org:8786", True),
        ("ws://[2001:db8::1]:8786", True),
        ("tls://10.0.0.5:8786", False),
        ("tcp://127.0.0.1:8786", False),
        ("tcp://127.1.2.3:8786", False),
        ("tcp://localhost:8786", False),
        ("tcp://[::1]:8786", False),
        ("inproc://10.0.0.5/1/2", False),
    ],
)
def test_unencrypted_warning_only_for_plain_remote_addresses(address, warned):
    message = unencrypted_warning(address)
    assert (message is not None) == warned
    if warned:
        assert message == (
            f"the connection to the Dask scheduler at {address} is not encrypted and not authenticated: anyone who "
            "can reach that port can run code on its workers and read or overwrite their data. Use tls://HOST:PORT "
            "with --tls-ca-file, --tls-cert and --tls-key (see docs/deploy.md, Security)."
        )


def test_hosts_of_addresses():
    assert host_of("tcp://10.0.0.5:8786") == "10.0.0.5"
    assert host_of("scheduler:8786") == "scheduler"
    assert host_of("tls://[::1]:8786") == "::1"
    assert host_of("tcp://scheduler") == "scheduler"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.5") and not is_loopback("scheduler")


def test_run_warns_once_about_a_plain_remote_scheduler(tmp_path):
    """192.0.2.1 (TEST-NET-1, never routed): one Warning line, then the one Error line of the failed connection."""
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = invoke("run", write_job(tmp_path, ""), "--scheduler", "tcp://192.0.2.1:8786")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("Warning:")] == [
        f"Warning: {unencrypted_warning('tcp://192.0.2.1:8786')}"
    ]
    assert lines[-1].startswith(
        "Error: cannot connect to the Dask scheduler at tcp://192.0.2.1:8786 (from --scheduler): "
    )
    assert "Traceback" not in result.output
    assert not (tmp_path / "influences.zarr").exists()


def test_dasks_tls_configuration_is_not_forced_on_a_plain_tcp_address(tmp_path, certs):
    """TLS files in Dask's configuration apply to tls:// addresses (as in Dask); a tcp:// address
    connects without them, with the warning, instead of being refused for having certificates."""
    a, _ = certs
    settings = {
        "distributed.comm.tls.ca-file": str(a.ca),
        "distributed.comm.tls.client.cert": str(a.cert),
        "distributed.comm.tls.client.key": str(a.key),
        "distributed.comm.timeouts.connect": "1s",
    }
    with dask.config.set(settings):
        result = invoke("run", write_job(tmp_path, ""), "--scheduler", "tcp://192.0.2.1:8786")
    assert result.exit_code == 1
    assert f"Warning: {unencrypted_warning('tcp://192.0.2.1:8786')}" in result.output
    assert "Error: cannot connect to the Dask scheduler at tcp://192.0.2.1:8786" in result.output
    assert "TLS certificates are given" not in result.output
