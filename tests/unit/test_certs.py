"""``collnet certs``, the identity a certificate names, and TLS between two of them.

The handshakes run over real loopback sockets in this process: no daemon."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from collnet_daemon.certs import issue, make_ca
from collnet_daemon.cli import main
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collnet.errors import AuthError, InvalidArgument
from collnet.membership import identity
from collnet.transport import tls


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _tls(ca_dir: Path, cert_dir: Path, name: str) -> tls.Tls:
    return tls.Tls(
        tls.TlsFiles(
            str(ca_dir / "ca.crt"), str(cert_dir / f"{name}.crt"), str(cert_dir / f"{name}.key")
        )
    )


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    make_ca(tmp_path / "ca")
    return tmp_path / "ca"


def test_keys_are_written_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_ca(tmp_path / "ca")
        issue(tmp_path / "ca", "d1", tmp_path / "out")
    finally:
        os.umask(old)
    for key in (tmp_path / "ca" / "ca.key", tmp_path / "out" / "d1.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((tmp_path / "out" / "d1.crt").stat().st_mode) == 0o644


def test_issued_certificate_names_the_peer_in_cn_and_san_for_both_tls_roles(ca: Path) -> None:
    crt, _ = issue(ca, "peer-07", ca.parent / "out")
    cert = _load(crt)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        "peer-07"
    ]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["peer-07"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == _load(ca / "ca.crt").subject
    assert _tls(ca, ca.parent / "out", "peer-07").name == "peer-07"


@pytest.mark.parametrize("name", ["", "-lead", "a b", "x" * 65, "d1/../../etc", "é"])
def test_bad_names_are_refused(ca: Path, name: str) -> None:
    with pytest.raises(ValueError, match="bad name"):
        issue(ca, name, ca.parent / "out")


def test_an_existing_key_is_not_overwritten_without_force(ca: Path) -> None:
    out = ca.parent / "out"
    issue(ca, "d1", out)
    before = (out / "d1.key").read_bytes()
    with pytest.raises(FileExistsError):
        issue(ca, "d1", out)
    assert (out / "d1.key").read_bytes() == before
    issue(ca, "d1", out, force=True)
    assert (out / "d1.key").read_bytes() != before


def test_cli_makes_a_ca_and_issues_certificates(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir, out = tmp_path / "ca", tmp_path / "certs"
    result = runner.invoke(main, ["certs", "ca", "--out", str(ca_dir)])
    assert result.exit_code == 0, result.output
    assert (ca_dir / "ca.crt").exists() and (ca_dir / "ca.key").exists()
    for name in ("coordinator", "d1"):
        result = runner.invoke(
            main, ["certs", "issue", "--ca", str(ca_dir), "--name", name, "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert str(out / f"{name}.crt") in result.output
    result = runner.invoke(
        main, ["certs", "issue", "--ca", str(ca_dir), "--name", "d1", "--out", str(out)]
    )
    assert result.exit_code != 0 and "exists" in result.output
    result = runner.invoke(
        main, ["certs", "issue", "--ca", str(ca_dir), "--name", "bad name", "--out", str(out)]
    )
    assert result.exit_code != 0 and "bad name" in result.output


def test_daemon_refuses_a_peer_id_that_differs_from_its_certificate(ca: Path) -> None:
    out = ca.parent / "out"
    issue(ca, "d1", out)
    args = ["--tls-ca", str(ca / "ca.crt"), "--tls-cert", str(out / "d1.crt")]
    args += ["--tls-key", str(out / "d1.key")]
    result = CliRunner().invoke(
        main, ["daemon", "--coordinator", "127.0.0.1:1", "--peer-id", "d2", *args]
    )
    assert result.exit_code != 0
    assert "differs from the name on the TLS certificate" in result.output
    result = CliRunner().invoke(main, ["daemon", "--coordinator", "127.0.0.1:1", *args[:2]])
    assert result.exit_code != 0 and "go together" in result.output


def test_coordinator_refuses_a_certificate_not_named_coordinator(ca: Path) -> None:
    out = ca.parent / "out"
    issue(ca, "d1", out)
    args = ["--tls-ca", str(ca / "ca.crt"), "--tls-cert", str(out / "d1.crt")]
    result = CliRunner().invoke(main, ["coordinator", *args, "--tls-key", str(out / "d1.key")])
    assert result.exit_code != 0 and "must be named 'coordinator'" in result.output


def test_unreadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="TLS"):
        tls.Tls(tls.TlsFiles(str(tmp_path / "no.crt"), str(tmp_path / "a"), str(tmp_path / "b")))


# -- identity rules ------------------------------------------------------------


def test_identity_is_the_one_dns_name_or_the_cn() -> None:
    assert identity.name_of(["d1"], ["d1"]) == "d1"
    assert identity.name_of([], ["d1"]) == "d1"
    assert identity.name_of(["d1"], []) == "d1"
    with pytest.raises(AuthError, match="several"):
        identity.name_of(["d1", "d2"], [])
    with pytest.raises(AuthError, match="differs"):
        identity.name_of(["d1"], ["d2"])
    with pytest.raises(AuthError, match="no identity"):
        identity.name_of([], [])
    with pytest.raises(AuthError, match="not a valid peer id"):
        identity.name_of(["../x"], [])
    cert = {"subject": ((("commonName", "d3"),),), "subjectAltName": (("DNS", "d3"),)}
    assert identity.name_of_peercert(cert) == "d3"
    with pytest.raises(AuthError):
        identity.name_of_peercert({})


def test_claims_are_checked_only_against_a_certified_name() -> None:
    identity.check_claim(None, "anyone", "x")  # no TLS: nothing is certified
    identity.check_claim("d1", "d1", "x")
    with pytest.raises(AuthError, match="claims to be 'd1' but its certificate is 'd9'"):
        identity.check_claim("d9", "d1", "x")
    with pytest.raises(AuthError, match="coordinator"):
        identity.check_peer_name("coordinator", "x")


# -- TLS over loopback ----------------------------------------------------------


class _Sink(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(1 << 16)
        self.n = 0
        self.made: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(tls.peer_name(transport))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.n :]

    def buffer_updated(self, nbytes: int) -> None:
        self.n += nbytes


async def test_mutual_tls_proves_both_names_and_refuses_another_ca(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_ca(tmp_path / "ca")
    make_ca(tmp_path / "other")
    for name in ("d1", "d2"):
        issue(tmp_path / "ca", name, tmp_path / "good")
    issue(tmp_path / "other", "d1", tmp_path / "bad")
    sinks: list[_Sink] = []

    def accepted() -> _Sink:
        sinks.append(_Sink())
        return sinks[-1]

    server = await tls.serve(
        accepted, "127.0.0.1", 0, _tls(tmp_path / "ca", tmp_path / "good", "d2"), 5.0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        transport, _ = await tls.connect(
            asyncio.Protocol, "127.0.0.1", port, _tls(tmp_path / "ca", tmp_path / "good", "d1"), 5.0
        )
        assert tls.peer_name(transport) == "d2"
        assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        transport.write(b"x" * 1000)  # type: ignore[attr-defined]
        for _ in range(100):  # TLS 1.3: the client is done before the server
            if sinks:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(sinks[0].made, 5) == "d1"
        for _ in range(100):
            if sinks[0].n == 1000:
                break
            await asyncio.sleep(0.05)
        assert bytes(sinks[0].buf[:1000]) == b"x" * 1000
        transport.close()

        # A certificate from another CA: the server refuses it and says so.
        impostor = tls.Tls(
            tls.TlsFiles(
                str(tmp_path / "ca" / "ca.crt"),
                str(tmp_path / "bad" / "d1.crt"),
                str(tmp_path / "bad" / "d1.key"),
            )
        )
        with caplog.at_level("WARNING", "collnet.transport.tls"):
            bad, _ = await tls.connect(asyncio.Protocol, "127.0.0.1", port, impostor, 5.0)
            for _ in range(100):
                if "AuthError" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        assert "certificate refused" in caplog.text
        assert len(sinks) == 1  # the frame protocol never saw the impostor
        bad.close()

        # A client that trusts another CA refuses the server.
        with pytest.raises(AuthError, match="certificate refused"):
            await tls.connect(
                asyncio.Protocol,
                "127.0.0.1",
                port,
                tls.Tls(
                    tls.TlsFiles(
                        str(tmp_path / "other" / "ca.crt"),
                        str(tmp_path / "bad" / "d1.crt"),
                        str(tmp_path / "bad" / "d1.key"),
                    )
                ),
                5.0,
            )
    finally:
        server.close()
        await server.wait_closed()
