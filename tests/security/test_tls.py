"""Mutual TLS with per-peer identities, over real daemons and real TLS.

Each cluster gets certificates from ``collnet certs``' functions: one CA, a
certificate per peer (``peer00``...), the coordinator's, and spares for
impostors (``d9``: valid, but no member) and another CA. The daemons of a
cluster run with ``--tls-*`` (``TlsCluster``); the links between ``peer00``
and ``peer01`` can be routed through a relay in this process (``Relay``,
the asyncpg adversity-test trick) by making ``peer01`` advertise 127.0.0.2,
where the relay listens, so the relay sees every byte of that link and can
flip one. Finding 3 of issue 10 (an impostor's HELLO claiming a member's id)
is replayed with a valid certificate for another name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_harness import (
    LIVE_CLUSTERS,
    Peers,
    assert_bit_identical,
    assert_matches_reference,
    fresh_tag,
    hostport,
    log_size,
    peer_inputs,
    run_on_all_outcomes,
    stop_peers,
    wait_for_log,
)
from collnet_daemon.certs import issue, make_ca
from collnet_daemon.control import CoordinatorClient
from collnet_lab.localcluster import LocalCluster
from recording_router import RecordingRouter

from collnet.errors import AuthError, CollnetError, PeerLost
from collnet.membership import PeerInfo
from collnet.transport.mesh import Mesh
from collnet.transport.tls import Tls, TlsFiles
from collnet.wire import FrameKind, FrameReader, frame_bytes
from collnet.wire import control as wire

pytestmark = pytest.mark.timeout(90)

CONNECTIONS = 2
# A recognisable tensor: 8 bytes repeated, found in a capture only if sent in clear.
PATTERN = b"CoLlNeT!"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt and NAME.crt/.key for the coordinator, peer00..peer03, d9 and an
    operator; other/ holds another CA and a peer03 certificate it signed."""
    root = tmp_path_factory.mktemp("pki")
    make_ca(root)
    for name in ("coordinator", "peer00", "peer01", "peer02", "peer03", "d9", "operator"):
        issue(root, name, root)
    make_ca(root / "other")
    issue(root / "other", "peer03", root / "other")
    return root


class TlsCluster(LocalCluster):
    """A ``LocalCluster`` whose processes run with the certificate of their name
    (``pki`` None: no TLS), plus per-name extra flags and certificate overrides."""

    def __init__(
        self,
        pki: Path | None,
        per_name: dict[str, list[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pki = pki
        self.per_name = per_name or {}
        self.cert_of: dict[str, tuple[Path, Path, Path]] = {}

    def _spawn(self, args: list[str], log_name: str) -> Any:
        name = "coordinator" if args[0] == "coordinator" else args[args.index("--peer-id") + 1]
        if self.pki is not None:
            ca, crt, key = self.cert_of.get(
                name, (self.pki / "ca.crt", self.pki / f"{name}.crt", self.pki / f"{name}.key")
            )
            args = [*args, "--tls-ca", str(ca), "--tls-cert", str(crt), "--tls-key", str(key)]
        return super()._spawn([*args, *self.per_name.get(name, [])], log_name)


@contextlib.contextmanager
def cluster(
    workdir: Path,
    pki: Path | None,
    n: int = 3,
    per_name: dict[str, list[str]] | None = None,
    extra_args: list[str] | None = None,
    log_level: str = "warning",
) -> Iterator[Peers]:
    c = TlsCluster(
        pki,
        per_name,
        peers=n,
        connections=CONNECTIONS,
        extra_args=extra_args or [],
        workdir=workdir,
        log_level=log_level,
    )
    LIVE_CLUSTERS.append(c)
    peers = Peers(c)
    try:
        c.start()
        peers.comms = [peers.connect(i) for i in range(n)]
        worlds = peers.sync_world()
        assert {w.size for w in worlds} == {n}, worlds
        yield peers
    finally:
        stop_peers(peers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    """Forwards 127.0.0.2:PORT to 127.0.0.1:PORT, recording every byte in both
    directions. Once ``armed``, it flips one byte (all its bits) in the middle of
    the next large read from the dialler: a piece of a DATA frame, not a
    handshake or a heartbeat."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.captured = bytearray()
        self.armed = False
        self.flipped = False
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.2", port))
        self._stop = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, upstream), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                buf = bytearray(data)
                with self._lock:
                    if upstream and self.armed and not self.flipped and len(buf) >= 16384:
                        buf[len(buf) // 2] ^= 0xFF
                        self.flipped = True
                    self.captured += buf
                dst.sendall(buf)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self._listener.close()


@contextlib.contextmanager
def relayed(
    tmp_path: Path, pki: Path | None, log_level: str = "warning"
) -> Iterator[tuple[Peers, Relay]]:
    """A 3-peer cluster whose peer00 <-> peer01 link goes through a ``Relay``."""
    port = _free_port()
    relay = Relay(port)
    # No link probes: the relay's one flip must land in a collective's bytes, not in
    # a probe burst sent while the link is idle.
    quiet = ["--link-report-s", "0"]
    flags = {
        "peer00": quiet,
        "peer01": ["--listen", f"127.0.0.1:{port}", "--advertise-host", "127.0.0.2", *quiet],
    }
    try:
        with cluster(tmp_path / "c", pki, per_name=flags, log_level=log_level) as peers:
            yield peers, relay
    finally:
        relay.close()


def _tls_socket(pki: Path, name: str, addr: str) -> ssl.SSLSocket:
    """A TLS client connection to ``addr`` holding the (valid) certificate of ``name``."""
    tls = Tls(TlsFiles(str(pki / "ca.crt"), str(pki / f"{name}.crt"), str(pki / f"{name}.key")))
    return tls.client.wrap_socket(socket.create_connection(hostport(addr), timeout=10))


def _frames_until_closed(sock: ssl.SSLSocket, timeout_s: float = 10.0) -> list[Any]:
    """Frames received until the far side closes (fails the test if it does not)."""
    sock.settimeout(timeout_s)
    reader, frames = FrameReader(), []
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the daemon kept the connection open for {timeout_s}s")
        except (OSError, ssl.SSLError):
            return frames
        if not data:
            return frames
        frames += reader.feed(data)


def _all_reduce(peers: Peers, inputs: list[np.ndarray], **kwargs: Any) -> list[Any]:
    tag = fresh_tag("tls")
    return run_on_all_outcomes(
        peers.comms,
        lambda r, c: c.all_reduce(inputs[r].copy(), tag=tag, timeout_s=20.0, **kwargs),
    )


def _works(peers: Peers, seed: int = 3) -> None:
    inputs = peer_inputs(peers.size, 300_001, np.dtype(np.float32), "sum", seed=seed)
    results = peers.all_reduce(inputs, op="sum", algo="ring")
    assert_bit_identical(results)
    assert_matches_reference(results, inputs, "sum")


def test_three_daemons_all_reduce_over_mutual_tls_and_status_needs_a_certificate(
    tmp_path: Path, pki: Path
) -> None:
    with cluster(tmp_path / "c", pki) as peers:
        _works(peers)
        for dtype, op in ((np.int64, "max"), (np.float32, "avg")):
            inputs = peer_inputs(3, 4 << 18, np.dtype(dtype), op, seed=5)
            results = peers.all_reduce(inputs, op=op)
            assert_bit_identical(results)
            assert_matches_reference(results, inputs, op)
        addr = peers.cluster.coordinator_addr
        status = [sys.executable, "-m", "collnet_daemon", "status", "--coordinator", addr]
        tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "operator.crt")]
        tls += ["--tls-key", str(pki / "operator.key")]
        out = subprocess.run([*status, *tls, "--json"], capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert [p["id"] for p in answer["peers"]] == ["peer00", "peer01", "peer02"]
        plain = subprocess.run([*status, "--timeout-s", "3"], capture_output=True, timeout=30)
        assert plain.returncode != 0  # no certificate, no answer
        _works(peers)


def test_daemon_with_a_certificate_from_another_ca_is_refused_and_the_world_is_unaffected(
    tmp_path: Path, pki: Path
) -> None:
    with cluster(tmp_path / "c", pki) as peers:
        c = peers.cluster
        assert isinstance(c, TlsCluster)
        coord_log = c.dir / "coordinator.log"
        since = log_size(coord_log)
        other = pki / "other"
        # It trusts our CA, but its own certificate was signed by another one.
        c.cert_of["peer03"] = (pki / "ca.crt", other / "peer03.crt", other / "peer03.key")
        with pytest.raises(RuntimeError, match="exited"):
            c.add_daemon()
        wait_for_log(coord_log, ["AuthError", "certificate refused"], since)
        daemon_log = (c.dir / "daemon3.log").read_text()
        assert "DaemonUnavailable" in daemon_log or "unknown ca" in daemon_log.lower(), daemon_log
        assert peers.comms[0].world.pending == ()
        world = peers.sync_world()
        assert {w.size for w in world} == {3} and world[0].pending == ()
        _works(peers)


def test_impostor_with_a_valid_certificate_claiming_a_member_in_hello_is_refused(
    tmp_path: Path, pki: Path
) -> None:
    """Finding 3: d9 (valid certificate) says HELLO as peer00 to peer01 and
    pushes a DATA frame of the members' next collective behind it."""
    with cluster(tmp_path / "c", pki) as peers:
        victim = peers.cluster.daemons[1]
        log = peers.cluster.dir / "daemon1.log"
        since = log_size(log)
        epoch, tag = peers.comms[0].world.epoch, fresh_tag("tls")
        with _tls_socket(pki, "d9", victim.data) as sock:
            hello = {"peer": "peer00", "conn": 0, "k": CONNECTIONS}
            sock.sendall(frame_bytes(FrameKind.HELLO, hello))
            with contextlib.suppress(OSError):
                sock.sendall(frame_bytes(FrameKind.DATA, [epoch, tag, 0, 0, 0, 0, 8], b"\xff" * 8))
            frames = _frames_until_closed(sock)
        assert frames == []  # not even the victim's HELLO answer
        wait_for_log(log, ["AuthError", "claims to be 'peer00' but its certificate is 'd9'"], since)
        # peer00's own links to peer01 work, and the result is the members' alone.
        inputs = [np.full(1 << 16, r + 1, np.int64) for r in range(3)]
        outcomes = run_on_all_outcomes(
            peers.comms, lambda r, c: c.all_reduce(inputs[r].copy(), tag=tag, timeout_s=20.0)
        )
        for rank, out in enumerate(outcomes):
            assert isinstance(out, np.ndarray), f"rank {rank}: {out!r}"
            assert (out == 6).all()
        _works(peers)


async def _register_as(pki: Path, cert_name: str, claimed: str, coordinator: str) -> None:
    """Register at ``coordinator`` as ``claimed`` holding ``cert_name``'s certificate."""
    tls = Tls(
        TlsFiles(str(pki / "ca.crt"), str(pki / f"{cert_name}.crt"), str(pki / f"{cert_name}.key"))
    )
    client = CoordinatorClient(lambda _world: None, tls=tls)
    await client.connect(*hostport(coordinator), timeout_s=10)
    try:
        register = wire.Register(PeerInfo(claimed, "127.0.0.1", 1))
        await client.call(register, wire.WorldAnswer, timeout_s=10)
    finally:
        client.close()


def test_registration_claiming_another_peer_than_its_certificate_is_refused(
    tmp_path: Path, pki: Path
) -> None:
    with cluster(tmp_path / "c", pki, n=2) as peers:
        coord_log = peers.cluster.dir / "coordinator.log"
        since = log_size(coord_log)
        with pytest.raises(AuthError, match="claims to be 'peer03' but its certificate is 'd9'"):
            asyncio.run(_register_as(pki, "d9", "peer03", peers.cluster.coordinator_addr))
        with pytest.raises(AuthError, match="coordinator's certificate"):
            asyncio.run(
                _register_as(pki, "coordinator", "coordinator", peers.cluster.coordinator_addr)
            )
        wait_for_log(coord_log, ["AuthError", "claims to be 'peer03'"], since)
        world = peers.sync_world()
        assert [w.size for w in world] == [2, 2] and world[0].pending == ()
        _works(peers)


def test_valid_certificate_of_a_non_member_cannot_open_a_data_link(
    tmp_path: Path, pki: Path
) -> None:
    with cluster(tmp_path / "c", pki, extra_args=["--connect-timeout-s", "2"]) as peers:
        log = peers.cluster.dir / "daemon2.log"
        since = log_size(log)
        with _tls_socket(pki, "d9", peers.cluster.daemons[2].data) as sock:
            sock.sendall(frame_bytes(FrameKind.HELLO, {"peer": "d9", "conn": 0, "k": CONNECTIONS}))
            frames = _frames_until_closed(sock)
        assert frames == []  # never answered: no link
        wait_for_log(log, ["AuthError", "'d9'", "not a member of the world"], since)
        _works(peers)


# Integers: a sum is exact, so any flipped bit that reached a tensor shows.
TAMPER_INPUTS = peer_inputs(3, 1 << 20, np.dtype(np.int64), "sum", seed=11)


def test_a_flipped_byte_in_a_data_frame_is_detected_and_never_gives_a_wrong_result(
    tmp_path: Path, pki: Path
) -> None:
    inputs = TAMPER_INPUTS
    with relayed(tmp_path, pki, log_level="info") as (peers, relay):
        _works(peers)  # the links are up (through the relay)
        log = peers.cluster.dir / "daemon1.log"
        since = log_size(log)
        relay.armed = True
        outcomes = _all_reduce(peers, inputs, op="sum", algo="ring")
        assert relay.flipped, "the relay never flipped a byte: the test proves nothing"
        for rank, out in enumerate(outcomes):
            if isinstance(out, np.ndarray):  # finished before the flip reached it: exact
                assert_matches_reference([out], inputs, "sum", f"rank {rank}")
            else:
                assert isinstance(out, CollnetError), f"rank {rank}: untyped {out!r}"
        assert any(isinstance(out, CollnetError) for out in outcomes), outcomes
        wait_for_log(log, ["bad record mac"], since)
        _works(peers, seed=12)  # the link is dialled again; the world goes on


def test_without_tls_the_same_flip_corrupts_the_result(tmp_path: Path) -> None:
    """The control for the test above: the relay's flip does reach a tensor."""
    inputs = TAMPER_INPUTS
    with relayed(tmp_path, None) as (peers, relay):
        _works(peers)
        relay.armed = True
        outcomes = _all_reduce(peers, inputs, op="sum", algo="ring")
        assert relay.flipped
        expected = np.sum(inputs, axis=0)
        wrong = [out for out in outcomes if isinstance(out, np.ndarray) and (out != expected).any()]
        assert wrong, f"no peer got a corrupted result without TLS: {outcomes}"


@pytest.mark.parametrize("with_tls", [True, False], ids=["tls", "plaintext"])
def test_tensor_bytes_are_on_the_wire_only_in_plaintext_mode(
    tmp_path: Path, pki: Path, with_tls: bool
) -> None:
    with relayed(tmp_path, pki if with_tls else None) as (peers, relay):
        tensor = np.frombuffer(PATTERN * (1 << 17), dtype=np.int64)  # 1 MiB
        outcomes = _all_reduce(peers, [tensor] * 3, op="max")
        for out in outcomes:
            assert isinstance(out, np.ndarray) and out.tobytes() == tensor.tobytes()
        with relay._lock:
            captured = bytes(relay.captured)
    assert len(captured) > 1 << 20, "the relay saw no collective"
    assert (PATTERN * 8 in captured) is not with_tls


async def test_a_member_admitted_a_moment_ago_is_linked_once_the_world_admits_it(
    pki: Path,
) -> None:
    """The race of a join: peer00 learns of the new world first and dials peer01,
    which still holds the old one. The HELLO waits for that world instead of
    being refused; a peer no world admits is refused at the connect deadline."""

    def mesh(name: str, members: set[str] | None = None) -> Mesh:
        tls = Tls(TlsFiles(str(pki / "ca.crt"), str(pki / f"{name}.crt"), str(pki / f"{name}.key")))
        held = (lambda: members) if members is not None else None
        return Mesh(name, 2, RecordingRouter(), connect_timeout_s=2.0, tls=tls, members=held)

    world01: set[str] = {"peer01"}  # peer01's world: peer00 not admitted yet
    joiner, acceptor = mesh("peer00"), mesh("peer01", world01)
    host, port = await acceptor.listen("127.0.0.1", 0)
    try:
        dial = asyncio.ensure_future(joiner.get_link("peer01", (host, port)))
        await asyncio.sleep(0.5)
        assert not dial.done()  # waiting, not refused
        world01.add("peer00")
        acceptor.world_changed()
        link = await asyncio.wait_for(dial, 5)
        assert link.ready.is_set() and acceptor.link_if_ready("peer00") is not None

        stranger = mesh("d9")
        with pytest.raises(PeerLost, match=r"no answer within 2\.0s"):
            await stranger.get_link("peer01", (host, port))
        assert "d9" not in acceptor.links
        await stranger.close()
    finally:
        await joiner.close()
        await acceptor.close()
