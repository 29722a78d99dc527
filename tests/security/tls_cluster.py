"""A Dask scheduler and two workers secured with TLS on 127.0.0.1, and the certificate files
of two unrelated certificate authorities, for the TLS tests.

The cluster's certificates are made by deploy/make_certs.py (the script the deployments use:
a CA and one certificate per role, scheduler, worker and client); the unrelated set by
``distributed.security.Security.temporary()`` (a self-signed certificate that is its own CA).
Both need ``cryptography``.
"""

from __future__ import annotations

import importlib.util
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dask_processes import BIN, process_env, start_cluster, stop

__all__ = ["BIN", "Certs", "cluster_certs", "load_make_certs", "make_certs", "start_tls_cluster", "stop"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Certs:
    """The PEM files of one certificate authority: the CA, a client certificate it signed and its
    key, and (``roles``) the certificate and key of each server role (``scheduler``, ``worker``)."""

    ca: Path
    cert: Path
    key: Path
    roles: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def options(self, role: str = "client") -> list[str]:
        """``--tls-ca-file CA --tls-cert CERT --tls-key KEY`` of ``role``."""
        cert, key = self.roles.get(role, (self.cert, self.key))
        return ["--tls-ca-file", str(self.ca), "--tls-cert", str(cert), "--tls-key", str(key)]

    def security(self):
        """``distributed.security.Security`` of a client presenting these files."""
        from distributed.security import Security

        files = {"tls_ca_file": str(self.ca), "tls_client_cert": str(self.cert), "tls_client_key": str(self.key)}
        return Security(**files, require_encryption=True)


def load_make_certs():
    """deploy/make_certs.py as a module."""
    spec = importlib.util.spec_from_file_location("deploy_make_certs", ROOT / "deploy" / "make_certs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cluster_certs(directory: Path) -> Certs:
    """A CA and the scheduler's, workers' and client's certificates, by deploy/make_certs.py."""
    written = load_make_certs().make_certificates(directory)
    assert sorted(p.name for p in written) == sorted(
        ["ca.pem"] + [f"{r}{s}" for r in ("scheduler", "worker", "client") for s in (".pem", "-key.pem")]
    )
    roles = {role: (directory / f"{role}.pem", directory / f"{role}-key.pem") for role in ("scheduler", "worker")}
    return Certs(directory / "ca.pem", directory / "client.pem", directory / "client-key.pem", roles)


def make_certs(directory: Path) -> Certs:
    """A new self-signed CA and certificate (one RSA key, ``Security.temporary()``) written as PEM files."""
    from distributed.security import Security

    temporary = Security.temporary()
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certs(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    certs.ca.write_text(temporary.tls_ca_file)
    certs.cert.write_text(temporary.tls_client_cert)
    certs.key.write_text(temporary.tls_client_key)
    certs.key.chmod(0o600)
    return certs


def start_tls_cluster(
    certs: Certs, logs: Path, n_workers: int = 2, *, scheduler_from_env: bool = False
) -> tuple[str, list[subprocess.Popen]]:
    """``dask scheduler`` and ``n_workers`` ``dask worker --nthreads 1`` processes on 127.0.0.1,
    all with ``--tls-ca-file/--tls-cert/--tls-key`` of ``certs`` (mutual TLS, as the deployment
    files start them). Returns the ``tls://`` address and the processes (for :func:`stop`);
    the workers have joined when it returns.

    ``scheduler_from_env``: the scheduler gets only ``--protocol tls`` and its CA, certificate
    and key as PEM text in Dask's configuration variables, as deploy/helm/values.yaml gives
    them (the Dask Helm chart mounts no files into the scheduler)."""
    scheduler_env = None
    if scheduler_from_env:
        cert, key = certs.roles["scheduler"]
        scheduler_env = process_env(
            DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION="True",
            DASK_DISTRIBUTED__COMM__TLS__CA_FILE=certs.ca.read_text(),
            DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT=cert.read_text(),
            DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY=key.read_text(),
        )
    return start_cluster(
        logs,
        n_workers,
        protocol="tls",
        scheduler_options=() if scheduler_from_env else certs.options("scheduler"),
        scheduler_env=scheduler_env,
        worker_options=certs.options("worker"),
        security=certs.security(),
    )
