"""The options that say how the commands reach a Dask scheduler: ``--scheduler`` and the TLS
certificates ``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` (shared by ``run``, ``index``,
``query`` and ``evaluate``; ``docs/cli.md``, "Cluster and TLS").

Where the certificates come from when these are not given, and which wins:
:mod:`dask_influence.mapping.security`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..mapping.security import CLI_SOURCE, TlsFiles

_FILE = click.Path(dir_okay=False)


def tls_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--tls-ca-file``, ``--tls-cert`` and ``--tls-key`` (parameters ``tls_ca_file``,
    ``tls_cert``, ``tls_key``) to a click command."""
    for option in reversed(
        (
            click.option(
                "--tls-ca-file",
                type=_FILE,
                default=None,
                metavar="PEM",
                help="CA certificate of the cluster (TLS): the scheduler's certificate must be signed by it. "
                "Wins over [cluster] security and Dask's distributed.comm.tls.* configuration.",
            ),
            click.option(
                "--tls-cert",
                type=_FILE,
                default=None,
                metavar="PEM",
                help="This client's certificate, signed by the cluster's CA (for a tls:// scheduler).",
            ),
            click.option(
                "--tls-key",
                type=_FILE,
                default=None,
                metavar="PEM",
                help="The private key of --tls-cert (omit it when the certificate file holds the key).",
            ),
        )
    ):
        command = option(command)
    return command


def tls_from_options(tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None) -> TlsFiles | None:
    """The certificates given on the command line; ``None`` when none of the three is."""
    files = TlsFiles(ca_file=tls_ca_file, cert=tls_cert, key=tls_key, source=CLI_SOURCE)
    return files if files.given() else None
