"""Mutual TLS for control and data connections, and the identity it proves.

Every connection between hosts (daemon to coordinator, daemon to daemon,
``collnet status`` to coordinator) runs TLS 1.3 with certificates required on
both ends, signed by the cluster's CA (``collnet certs``). Host names are not
checked (peers are dialled by address): the identity is the name on the
certificate, read in one place, ``peer_name``, through
``collnet.membership.identity``, and each protocol checks what the other end
claims against it (a HELLO's peer id, a registration, the coordinator's name).

The accepting side runs each accepted connection's handshake as a task of
its own (``serve``): a failed handshake (another CA, no certificate, an
expired one, plain bytes) is logged as an ``AuthError`` and closes that
connection, which the event loop's own TLS server would do silently. The
frame protocol sees the connection only once the handshake succeeded, so
nothing that did not prove a certificate reaches it. Handshakes in progress
are capped (``MAX_HANDSHAKES``) and each is bounded by a deadline.

Receives still land in the target buffers: the TLS layer decrypts straight
into the view ``FrameConnection.get_buffer`` returns. Sends encrypt the
payload views once, into TLS records (the only copy TLS adds).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from collnet.errors import AuthError, InvalidArgument
from collnet.membership import identity
from collnet.transport.loglimit import REMOTE, host_of

log = logging.getLogger(__name__)

# Accepted connections still in their TLS handshake, at most (beyond: refused).
MAX_HANDSHAKES = 128


@dataclass(frozen=True)
class TlsFiles:
    """Where this process's CA bundle, certificate and key are."""

    ca: str
    cert: str
    key: str


class Tls:
    """The TLS contexts of one process and the name on its own certificate."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER)
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT)
        self.name = _own_name(files.cert)

    def _context(self, protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # Peers are dialled by address, not by host name: the certificate's name
        # is the identity, checked by the protocol above (see peer_name).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=self.files.ca)
            ctx.load_cert_chain(self.files.cert, self.files.key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"TLS: cannot load {self.files}: {exc}") from None
        return ctx


def _own_name(cert_path: str) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"TLS: cannot read certificate {cert_path}: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = [str(v) for v in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns = []
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        return identity.name_of(dns, cns)
    except AuthError as exc:
        raise InvalidArgument(f"TLS: {cert_path}: {exc.message}") from None


def peer_name(transport: asyncio.BaseTransport | None) -> str | None:
    """The certified identity at the other end of ``transport``; ``None`` for a
    connection without TLS (nothing is certified there)."""
    if transport is None or transport.get_extra_info("ssl_object") is None:
        return None
    return identity.name_of_peercert(transport.get_extra_info("peercert"))


def describe(exc: BaseException) -> str:
    """A TLS failure in a line an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {exc!r}"


async def connect(
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    tls: Tls | None,
    timeout_s: float,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Dial ``host:port``, with TLS when ``tls`` is set; a refused handshake is an
    ``AuthError``. The protocol sees the connection once TLS is up."""
    loop = asyncio.get_running_loop()
    if tls is None:
        return await loop.create_connection(factory, host, port)
    try:
        return await loop.create_connection(
            factory, host, port, ssl=tls.client, ssl_handshake_timeout=timeout_s
        )
    except ssl.SSLError as exc:
        raise AuthError(f"{host}:{port}: {describe(exc)}") from None


class Listening(Protocol):
    """What a listener offers: ``asyncio.Server`` without TLS, ``TlsServer`` with."""

    @property
    def sockets(self) -> Sequence[Any]: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


async def serve(
    factory: Callable[[], asyncio.BufferedProtocol],
    host: str,
    port: int,
    tls: Tls | None,
    handshake_timeout_s: float,
) -> Listening:
    """Listen on ``host:port``; with ``tls``, each connection gets ``factory()``'s
    protocol only after its TLS handshake succeeded (see the module docstring)."""
    if tls is None:
        return await asyncio.get_running_loop().create_server(factory, host, port)
    server = TlsServer(factory, tls, handshake_timeout_s)
    server.listen(host, port)
    return server


class TlsServer:
    """Accepts TCP connections and runs each one's TLS handshake as its own task,
    so a failure is seen (and logged) here; see the module docstring."""

    def __init__(
        self, factory: Callable[[], asyncio.BufferedProtocol], tls: Tls, timeout_s: float
    ) -> None:
        self.factory = factory
        self.tls = tls
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> Sequence[socket.socket]:
        return () if self._sock is None else (self._sock,)

    def listen(self, host: str, port: int) -> None:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._accepting = asyncio.ensure_future(self._accept_loop(sock))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: try again shortly
                log.warning("TLS listener: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._handshakes) >= MAX_HANDSHAKES:
                REMOTE.warning(
                    log,
                    "TLS handshake cap",
                    "connection from %s: refused, %d TLS handshakes in progress",
                    peer,
                    len(self._handshakes),
                )
                sock.close()
                continue
            task = asyncio.ensure_future(self._handshake(sock, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        standin = _Handshaking()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: standin, sock, ssl=self.tls.server, ssl_handshake_timeout=self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            REMOTE.warning(
                log, host_of(peer), "connection from %s: AuthError: %s", peer, describe(exc)
            )
            sock.close()
            return
        # The frame protocol is made only now, so a connection that failed its
        # handshake never counted as one (connection caps, deadlines). What the
        # peer sent right behind its handshake may have reached the stand-in.
        conn = self.factory()
        transport.set_protocol(conn)
        conn.connection_made(transport)
        for data in standin.early:
            _deliver(conn, memoryview(data))

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        if self._sock is not None:
            self._sock.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


class _Handshaking(asyncio.Protocol):
    """Stands in for the frame protocol while TLS is set up: keeps what arrives
    between the end of the handshake and the protocol's arrival (a HELLO)."""

    def __init__(self) -> None:
        self.early: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.early.append(data)


def _deliver(conn: asyncio.BufferedProtocol, data: memoryview) -> None:
    """Hand ``data`` to ``conn`` as the event loop would."""
    while data:
        buf = memoryview(conn.get_buffer(len(data)))
        n = min(len(buf), len(data))
        if n == 0:
            return
        buf[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]
