"""TLS for the connection to a Dask scheduler: where the certificates come from, checking them,
and one line for each way a secured connection fails.

Whoever reaches a Dask scheduler can run code on its workers, so a scheduler reachable from
beyond the loopback speaks TLS with mutual authentication (Dask's own
``distributed.security.Security``): the client proves itself with a certificate signed by the
cluster's certificate authority (CA), and checks the scheduler's certificate against the same CA.

The certificates of a client come from the first of these that names any of them (they are
never mixed across sources):

1. the command line: ``--tls-ca-file``, ``--tls-cert``, ``--tls-key``;
2. the job file: ``[cluster] security = { ca_file = ..., cert = ..., key = ... }``;
3. Dask's own configuration: ``distributed.comm.tls.ca-file``, ``distributed.comm.tls.client.cert``
   and ``.key``, from Dask's YAML files or the environment variables
   ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, ``DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT`` and
   ``DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY``.

``distributed`` is imported only when a ``Security`` object is made (this module is imported by
the job file's parser, which stays free of Dask).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TlsFiles",
    "UnencryptedSchedulerWarning",
    "CLI_SOURCE",
    "JOB_SOURCE",
    "CONFIG_SOURCE",
    "resolve_tls",
    "dask_config_tls",
    "scheme_of",
    "host_of",
    "is_loopback",
    "unencrypted_warning",
    "warn_if_unencrypted",
    "connection_error",
]

CLI_SOURCE = "--tls-ca-file/--tls-cert/--tls-key"
JOB_SOURCE = "[cluster] security"
CONFIG_SOURCE = "Dask's configuration (distributed.comm.tls.*)"
# schemes whose bytes travel encrypted (tls://, websockets over TLS) or never leave the process
_SECURE_SCHEMES = ("tls", "wss", "inproc")


class UnencryptedSchedulerWarning(UserWarning):
    """A client talks to a scheduler on another host over plain TCP (not encrypted, not authenticated)."""


@dataclass(frozen=True)
class TlsFiles:
    """The certificates a client presents to a TLS scheduler, and where they were given.

    Attributes:
        ca_file: the cluster's CA certificate (PEM): the scheduler's certificate must be signed by it.
        cert: this client's certificate (PEM), signed by the cluster's CA.
        key: the private key of ``cert`` (PEM); ``None`` when the ``cert`` file holds it too.
        source: where they came from (:data:`CLI_SOURCE`, :data:`JOB_SOURCE`, :data:`CONFIG_SOURCE`),
            named in every error about them.

    Each of ``ca_file``, ``cert`` and ``key`` is a path, or (as Dask's configuration allows)
    the PEM text itself.
    """

    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    source: str = CLI_SOURCE

    def given(self) -> bool:
        """Whether any of the three is set."""
        return bool(self.ca_file or self.cert or self.key)

    def _names(self) -> dict[str, str]:
        """How each field is called in this source."""
        if self.source == CLI_SOURCE:
            return {"ca_file": "--tls-ca-file", "cert": "--tls-cert", "key": "--tls-key"}
        if self.source == JOB_SOURCE:
            return {f: f"[cluster] security {f}" for f in ("ca_file", "cert", "key")}
        return {
            "ca_file": "distributed.comm.tls.ca-file",
            "cert": "distributed.comm.tls.client.cert",
            "key": "distributed.comm.tls.client.key",
        }

    def describe(self, field: str) -> str:
        """``'/path/ca.pem (--tls-ca-file)'``; PEM text given inline is called ``in-memory PEM``."""
        value = getattr(self, field)
        shown = "in-memory PEM" if value and "\n" in value else value
        return f"{shown} ({self._names()[field]})"

    def check(self) -> None:
        """Refuse, in one line naming the file and the fix, a set that cannot work: a CA without
        a certificate (or the reverse), a file that is missing or not PEM, a key that does not
        belong to the certificate. Raises ``ValueError``."""
        names = self._names()
        missing = [names[f] for f in ("ca_file", "cert") if not getattr(self, f)]
        if missing:
            raise ValueError(
                f"TLS needs both the cluster's CA certificate and this client's certificate; {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing (from {self.source}). Give "
                f"{names['ca_file']}, {names['cert']} and {names['key']} (the key may be in the certificate file)."
            )
        for field in ("ca_file", "cert", "key"):
            value = getattr(self, field)
            if value and "\n" not in value:
                if not os.path.exists(value):
                    raise ValueError(f"the TLS file {self.describe(field)} does not exist.")
                if not os.path.isfile(value) or not os.access(value, os.R_OK):
                    raise ValueError(f"the TLS file {self.describe(field)} is not a readable file.")
        assert self.ca_file is not None and self.cert is not None
        try:
            if "\n" in self.ca_file:
                ssl.create_default_context(cadata=self.ca_file)
            else:
                ssl.create_default_context(cafile=self.ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(
                f"the TLS CA file {self.describe('ca_file')} holds no PEM certificate ({_reason(exc)}): give the "
                "cluster's CA certificate, a file starting with -----BEGIN CERTIFICATE-----."
            ) from None
        if "\n" in self.cert or (self.key and "\n" in self.key):
            return  # Dask writes in-memory PEM to a temporary file itself; checked at connection
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            reason = _reason(exc)
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ValueError(
                    f"the TLS key {self.describe('key')} is not the private key of the certificate "
                    f"{self.describe('cert')} ({reason}): give the key the certificate was issued for."
                ) from None
            key = (
                f"the key {self.describe('key')}"
                if self.key
                else f"a private key (none given with {names['key']}, and the certificate file holds none)"
            )
            raise ValueError(
                f"could not load the TLS certificate {self.describe('cert')} with {key} ({reason}): both must be "
                "PEM files (-----BEGIN CERTIFICATE----- and -----BEGIN PRIVATE KEY-----), the key unencrypted."
            ) from None

    def security(self) -> Any:
        """``distributed.security.Security`` for a client with these files, encryption required."""
        from distributed.security import Security

        return Security(
            tls_ca_file=self.ca_file, tls_client_cert=self.cert, tls_client_key=self.key, require_encryption=True
        )


def dask_config_tls() -> TlsFiles | None:
    """The client certificates named in Dask's configuration (its YAML files and the
    ``DASK_DISTRIBUTED__COMM__TLS__*`` environment variables, as read when dask was imported);
    ``None`` if it names none."""
    import dask

    found = TlsFiles(
        ca_file=dask.config.get("distributed.comm.tls.ca-file", None) or None,
        cert=dask.config.get("distributed.comm.tls.client.cert", None) or None,
        key=dask.config.get("distributed.comm.tls.client.key", None) or None,
        source=CONFIG_SOURCE,
    )
    return found if found.given() else None


def resolve_tls(options: TlsFiles | None = None, job: TlsFiles | None = None) -> TlsFiles | None:
    """The certificates a client uses: the first of ``options`` (the command line), ``job`` (the
    job file's ``[cluster] security``) and Dask's configuration that names any; ``None``: none."""
    for candidate in (options, job):
        if candidate is not None and candidate.given():
            return candidate
    return dask_config_tls()


def scheme_of(address: str) -> str:
    """The protocol of a scheduler address: ``'tls'`` for ``tls://host:8786``; ``''`` without one."""
    head, sep, _ = address.partition("://")
    return head.lower() if sep else ""


def host_of(address: str) -> str:
    """The host of ``[scheme://]host[:port]`` (IPv6 in brackets allowed)."""
    rest = address.partition("://")[2] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if rest.count(":") > 1:  # a bare IPv6 address
        return rest
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` and ``::1`` (names other than localhost are not resolved)."""
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unencrypted_warning(address: str) -> str | None:
    """The warning for a scheduler on another host reached without TLS; ``None`` when the address
    is encrypted (``tls://``) or on the loopback."""
    if scheme_of(address) in _SECURE_SCHEMES or is_loopback(host_of(address)):
        return None
    return (
        f"the connection to the Dask scheduler at {address} is not encrypted and not authenticated: anyone who "
        "can reach that port can run code on its workers and read or overwrite their data. Use "
        "tls://HOST:PORT with --tls-ca-file, --tls-cert and --tls-key (see docs/deploy.md, Security)."
    )


def warn_if_unencrypted(client: Any) -> None:
    """Warn (:class:`UnencryptedSchedulerWarning`, once per address) when ``client`` talks to a
    scheduler on another host without TLS. Clients without an address (asynchronous, closed) pass."""
    address = getattr(getattr(client, "scheduler", None), "address", None)
    if not isinstance(address, str):
        return
    message = unencrypted_warning(address)
    if message is not None:
        warnings.warn(message[0].upper() + message[1:], UnencryptedSchedulerWarning, stacklevel=3)


_SSL_REASON = re.compile(r"\[(?:SSL|X509|PEM)[^\]]*: ?([A-Z0-9_]+)\] ?([^(\]]*)")


def _reason(exc: BaseException) -> str:
    """``'CERTIFICATE_VERIFY_FAILED: certificate verify failed: self-signed certificate'`` from an
    SSL error anywhere in ``exc``'s chain, else its message."""
    for err in _chain(exc):
        match = _SSL_REASON.search(str(err))
        if match:
            detail = match.group(2).strip().rstrip(":").strip()
            return f"{match.group(1)}: {detail}" if detail else match.group(1)
    for err in _chain(exc):
        if isinstance(err, ssl.SSLError):
            return f"{type(err).__name__}: {' '.join(str(err.args[-1] if err.args else err).split())}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def connection_error(exc: BaseException, address: str, source: str, tls: TlsFiles | None) -> str:
    """One line for a failed connection to the scheduler at ``address`` (named by ``source``):
    which side refused whose certificate, or that one side does not speak TLS, and the fix."""
    text = " ".join(" ".join(str(e) for e in _chain(exc)).split())
    reason = _reason(exc)
    where = f"the Dask scheduler at {address} (from {source})"
    if tls is not None and ("CERTIFICATE_VERIFY_FAILED" in text or "certificate does not match" in text):
        return (
            f"{where} presented a certificate that the CA {tls.describe('ca_file')} does not accept ({reason}): "
            "give the CA certificate of the cluster's certificates."
        )
    if tls is not None and any(s in text for s in ("WRONG_VERSION_NUMBER", "cannot convert to SSL", "RECORD_LAYER")):
        return (
            f"{where} does not speak TLS ({reason}): it was started without certificates; start it with "
            "--tls-ca-file/--tls-cert/--tls-key, or connect to it with tcp:// on a trusted network."
        )
    # with TLS 1.3 the scheduler checks the client's certificate after the client's side of the
    # handshake is done: its refusal arrives as an alert (UNKNOWN_CA, ...) or as the connection closed
    if tls is not None and any(
        s in text
        for s in (
            "UNKNOWN_CA",
            "BAD_CERTIFICATE",
            "CERTIFICATE_REQUIRED",
            "CERTIFICATE_EXPIRED",
            "DECRYPT",
            "EOF occurred in violation of protocol",
            "UNEXPECTED_EOF",
        )
    ):
        return (
            f"{where} refused this client's certificate {tls.describe('cert')} ({reason}): give a certificate "
            "signed by the cluster's CA (and not expired)."
        )
    if tls is None and scheme_of(address) in ("", "tcp") and ("reset by peer" in text or "closed" in text.lower()):
        return (
            f"{where} closed the connection of this plain TCP client ({reason}); a scheduler started with TLS does "
            "this: connect with tls://HOST:PORT and the cluster's certificates (--tls-ca-file, --tls-cert, --tls-key)."
        )
    if "encryption required" in text:
        return (
            f"TLS certificates are given (from {tls.source if tls else CONFIG_SOURCE}) but {where} is not a tls:// "
            "address: write it as tls://HOST:PORT."
        )
    if "ssl_context" in text:  # Dask was given a tls:// address without a client certificate
        return (
            f"{where} is a tls:// address but this client has no certificates: give --tls-ca-file, --tls-cert and "
            "--tls-key (or [cluster] security in the job file, or Dask's distributed.comm.tls.* configuration)."
        )
    return f"cannot connect to {where}: {reason}"
