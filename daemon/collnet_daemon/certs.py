"""``collnet certs``: a private CA and the certificates of peers and coordinator.

With TLS, a peer's id is the name on its certificate
(``collnet.membership.identity``), so issuing a certificate is what admits a
name to the cluster. ``ca`` makes the CA (``ca.crt``, ``ca.key``); ``issue``
signs a certificate for one name (a peer id, or ``coordinator``) with the
name in the subject CN and as the one DNS subject-alternative name, usable
as both TLS client and server (every daemon dials and accepts).

Keys are ECDSA P-256 (TLS 1.3 in every OpenSSL Python links), written with
mode 0600 from the moment the file exists (``os.open``, never a chmod after
the fact) and never over an existing file unless ``--force`` removes it
first: a key's permissions are whatever its first writer chose.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import click

from collnet.membership.identity import NAME_PATTERN, valid_name

CA_NAME = "collnet CA"
# Certificates are valid from a little in the past: clocks of hosts differ.
_CLOCK_SKEW = datetime.timedelta(minutes=10)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    if force:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_bytes(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert_bytes(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(out: Path, days: int = 3650, force: bool = False) -> tuple[Path, Path]:
    """A new CA in ``out``: (ca.crt, ca.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    crt_path, key_path = out / "ca.crt", out / "ca.key"
    _write(key_path, _key_bytes(key), 0o600, force)
    _write(crt_path, _cert_bytes(cert), 0o644, force)
    return crt_path, key_path


def issue(
    ca_dir: Path, name: str, out: Path, days: int = 365, force: bool = False
) -> tuple[Path, Path]:
    """A certificate for ``name`` signed by the CA in ``ca_dir``: (NAME.crt, NAME.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not valid_name(name):
        raise ValueError(f"bad name {name!r}: a peer id ({NAME_PATTERN}) or 'coordinator'")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / 'ca.key'} is not an ECDSA key made by 'collnet certs ca'")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    crt_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    _write(key_path, _key_bytes(key), 0o600, force)
    _write(crt_path, _cert_bytes(cert), 0o644, force)
    return crt_path, key_path


def _run(what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        paths = fn(*args, **kwargs)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc.filename} exists (use --force to replace it)") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{what}: {exc}") from None
    for path in paths:
        click.echo(str(path))


@click.group()
def certs() -> None:
    """Make a private CA and issue peer and coordinator certificates (for TLS)."""


@certs.command("ca")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1))
@click.option("--force", is_flag=True, help="Replace an existing ca.crt / ca.key.")
def ca_command(out: Path, days: int, force: bool) -> None:
    """Write a new CA to OUT/ca.crt and OUT/ca.key (the key 0600)."""
    _run("certs ca", make_ca, out, days, force)


@certs.command("issue")
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding ca.crt and ca.key.",
)
@click.option("--name", required=True, help="A peer id, or 'coordinator'.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", default=365, show_default=True, type=click.IntRange(1))
@click.option("--force", is_flag=True, help="Replace an existing NAME.crt / NAME.key.")
def issue_command(ca_dir: Path, name: str, out: Path, days: int, force: bool) -> None:
    """Write OUT/NAME.crt and OUT/NAME.key (the key 0600), signed by the CA."""
    _run("certs issue", issue, ca_dir, name, out, days, force)
