#!/usr/bin/env python3
"""Make the TLS certificates of a dask-influence cluster: a private certificate authority (CA)
and one certificate for each role (scheduler, worker, client), all signed by that CA.

    python deploy/make_certs.py DIRECTORY [--days 365] [--force]

writes into DIRECTORY (created if needed; the keys readable by their owner only):

    ca.pem                          the CA's certificate: every process trusts exactly this
    scheduler.pem, scheduler-key.pem  for `dask scheduler --tls-cert ... --tls-key ...`
    worker.pem, worker-key.pem        for `dask worker ...`
    client.pem, client-key.pem        for `dask-influence run ... --tls-cert ... --tls-key ...`

The CA's own private key is not kept: nothing can sign a further certificate for this
cluster, so a leaked client key is revoked by making a new set (and restarting the cluster).
Existing files are kept (the one-shot ``certs`` service of deploy/compose.yaml runs this at
every ``up``) unless ``--force`` is given. Dask checks certificates against the CA, not host
names (it sets ``check_hostname = False``), so the certificates name no hosts.

Needs the ``cryptography`` package (in the deploy images and the ``dev`` extra). In the
containers it is installed as ``dask-influence-make-certs``. See docs/deploy.md, "Security".
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

ROLES = ("scheduler", "worker", "client")
FILES = ("ca.pem", *(f"{role}{suffix}" for role in ROLES for suffix in (".pem", "-key.pem")))


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dask-influence cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_certificates(directory: str | os.PathLike, *, days: int = 365, force: bool = False) -> list[Path]:
    """Write the CA and the three role certificates into ``directory``; returns the files
    written (none when all exist and ``force`` is false). Refuses (``FileExistsError``) a
    directory holding only some of them, which would mix two CAs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    target = Path(directory)
    present = [name for name in FILES if (target / name).exists()]
    if present and not force:
        if len(present) == len(FILES):
            return []
        raise FileExistsError(
            f"{target} holds only some of the certificate files ({', '.join(present)}); remove them or pass --force "
            "to make a new set (every process of the cluster must then get the new files)."
        )
    target.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = _key()
    ca_name = _name("dask-influence CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    written = [_write(target / "ca.pem", ca.public_bytes(pem), 0o644)]
    for role in ROLES:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"dask-influence {role}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # every Dask process both accepts connections and opens them (workers talk to each other)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key_bytes = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        written.append(_write(target / f"{role}-key.pem", key_bytes, 0o600))
        written.append(_write(target / f"{role}.pem", cert.public_bytes(pem), 0o644))
    return written


def _write(path: Path, data: bytes, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(prog="dask-influence-make-certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write the PEM files")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    parser.add_argument("--force", action="store_true", help="replace existing files with a new CA")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        written = make_certificates(args.directory, days=args.days, force=args.force)
    except (OSError, ImportError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if written:
        print(f"Wrote a new CA and certificates for {', '.join(ROLES)} to {args.directory}: {len(written)} files.")
    else:
        print(f"{args.directory} already holds the cluster's certificates; kept them (--force makes a new set).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
