"""Bad bytes from the network or a client: a typed error, only that connection closed.

A raw TCP socket plays a broken or hostile peer against a daemon's data port
and against the coordinator; a raw zmq DEALER plays a broken client against a
daemon's IPC socket. Each time the victim logs a typed error, drops only the
offending connection, and the world still runs a correct all-reduce.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import collnet_client
import msgpack
import numpy as np
import pytest
import zmq
from cluster_harness import (
    CALL_TIMEOUT_S,
    Peers,
    assert_bit_identical,
    assert_matches_reference,
    fresh_tag,
    handshake_as,
    hostport,
    log_size,
    peer_inputs,
    read_until_closed,
    run_on_all_outcomes,
    running_peers,
    wait_for_log,
)
from collnet_daemon.ipc import MAX_REQUEST_BYTES

from collnet.transport.mesh import MAX_LINK_CONNECTIONS
from collnet.wire import HEADER, MAGIC, VERSION, FrameKind, FrameReader, frame_bytes

pytestmark = pytest.mark.timeout(60)

WORLD = 3
CONNECTIONS = 2
# Starts with an HTTP request line, so not b"CNET"; long enough to fill a header.
GARBAGE = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    with running_peers(WORLD, tmp_path_factory.mktemp("robustness"), connections=CONNECTIONS) as p:
        yield p


def _world_still_works(peers: Peers) -> None:
    """Membership unchanged, and an all-reduce across every peer is correct."""
    world = peers.comms[0].world
    assert world.size == WORLD and world.pending == (), world
    for algo in ("ring", "star"):
        inputs = peer_inputs(peers.size, 5003, np.dtype(np.float32), "sum", seed=2)
        results = peers.all_reduce(inputs, op="sum", algo=algo)
        assert_matches_reference(results, inputs, "sum")
        assert_bit_identical(results)


def _send_raw(addr: str, data: bytes) -> tuple[bytes, int]:
    """Send ``data`` on a fresh connection; return what came back before the close,
    and this side's port (the victim logs it with the error)."""
    with socket.create_connection(hostport(addr), timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(data)
        return read_until_closed(sock), port


def _frames(data: bytes) -> list[Any]:
    return FrameReader().feed(data)


def _huge_payload_header(kind: FrameKind = FrameKind.HELLO) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, 0, 1, 1 << 50) + b"\xc0"


def _data_log(peers: Peers, index: int) -> Path:
    return peers.cluster.workdir / f"daemon{index}.log"


# -- data port -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        pytest.param(GARBAGE, "ProtocolError", id="garbage"),
        pytest.param(
            HEADER.pack(b"CNET", 99, 1, 0, 1, 0) + b"\xc0", "ProtocolError", id="bad-version"
        ),
        pytest.param(
            HEADER.pack(MAGIC, VERSION, 77, 0, 1, 0) + b"\xc0", "ProtocolError", id="bad-kind"
        ),
        pytest.param(_huge_payload_header(), "FrameTooLarge", id="huge-payload"),
        pytest.param(
            HEADER.pack(MAGIC, VERSION, FrameKind.HELLO, 0, 1 << 31, 0),
            "FrameTooLarge",
            id="huge-meta",
        ),
        pytest.param(
            frame_bytes(FrameKind.DATA, [1, 2, 3]), "ProtocolError", id="data-before-hello"
        ),
        pytest.param(
            frame_bytes(FrameKind.HELLO, {"peer": "x", "conn": 0, "k": 1}, b"payload"),
            "ProtocolError",
            id="hello-with-payload",
        ),
        pytest.param(
            frame_bytes(FrameKind.HELLO, ["not", "a", "map"]), "ProtocolError", id="hello-not-a-map"
        ),
        pytest.param(
            frame_bytes(FrameKind.HELLO, {"peer": "x", "conn": 5, "k": 2}),
            "ProtocolError",
            id="hello-bad-index",
        ),
        pytest.param(
            # Links of different K are legal (the acceptor takes the dialler's);
            # a stripe beyond the protocol's bound is not.
            frame_bytes(FrameKind.HELLO, {"peer": "x", "conn": 0, "k": MAX_LINK_CONNECTIONS + 1}),
            "ProtocolError",
            id="hello-wrong-connection-count",
        ),
        pytest.param(
            HEADER.pack(MAGIC, VERSION, FrameKind.HELLO, 0, 3, 0) + b"\xc1\xc1\xc1",
            "ProtocolError",
            id="meta-not-msgpack",
        ),
    ],
)
def test_bad_frames_on_a_data_port_close_only_that_connection(
    peers: Peers, payload: bytes, error: str
) -> None:
    log = _data_log(peers, 1)
    since = log_size(log)
    _, port = _send_raw(peers.cluster.daemons[1].data, payload)
    wait_for_log(log, [error, str(port)], since=since)
    _world_still_works(peers)


def test_valid_hello_then_garbage_is_answered_then_closed_and_the_world_survives(
    peers: Peers,
) -> None:
    log = _data_log(peers, 2)
    since = log_size(log)
    hello = frame_bytes(FrameKind.HELLO, {"peer": "intruder", "conn": 0, "k": CONNECTIONS})
    received, port = _send_raw(peers.cluster.daemons[2].data, hello + GARBAGE)
    # The handshake completed (the daemon answered with its own HELLO) before the garbage.
    answers = _frames(received)
    assert answers and answers[0].kind == FrameKind.HELLO
    assert answers[0].meta == {"peer": peers.cluster.daemons[2].peer_id}
    wait_for_log(log, ["ProtocolError", str(port)], since=since)
    _world_still_works(peers)


def test_hello_impersonating_a_member_cannot_hijack_its_link(peers: Peers) -> None:
    log = _data_log(peers, 2)
    since = log_size(log)
    member = peers.cluster.daemons[0].peer_id
    hello = frame_bytes(FrameKind.HELLO, {"peer": member, "conn": 0, "k": CONNECTIONS})
    _, port = _send_raw(peers.cluster.daemons[2].data, hello)
    wait_for_log(log, ["ProtocolError", str(port)], since=since)
    _world_still_works(peers)


def test_malformed_data_metadata_after_hello_closes_only_that_link(peers: Peers) -> None:
    log = _data_log(peers, 1)
    since = log_size(log)
    hello = frame_bytes(FrameKind.HELLO, {"peer": "stranger", "conn": 0, "k": CONNECTIONS})
    data = frame_bytes(FrameKind.DATA, ["not", "seven", "fields"], b"\x00" * 4)
    _, port = _send_raw(peers.cluster.daemons[1].data, hello + data)
    wait_for_log(log, ["bad DATA metadata", str(port)], since=since)
    _world_still_works(peers)


def _stranger(peers: Peers, index: int) -> socket.socket:
    """A connection to daemon ``index`` that completed the handshake as a non-member."""
    return handshake_as(peers.cluster.daemons[index].data, "stranger", 0, CONNECTIONS)


def _members_all_reduce(peers: Peers, tag: str) -> list[Any]:
    return run_on_all_outcomes(
        peers.comms,
        lambda r, c: c.all_reduce(np.full(64, r + 1, np.int64), tag=tag, timeout_s=5.0),
    )


@pytest.mark.parametrize(
    ("frame", "logged"),
    [
        pytest.param(
            frame_bytes(FrameKind.CONTROL, {"t": "fetch", "ranges": "all of it"}),
            "bad state fetch request",
            id="fetch-not-a-list",
        ),
        pytest.param(
            frame_bytes(FrameKind.CONTROL, {"t": "fetch", "ranges": [[1, ["w", -1, 8, "x", "0"]]]}),
            "bad state fetch of 'w'",
            id="fetch-negative-offset",
        ),
        pytest.param(
            frame_bytes(FrameKind.CONTROL, {"t": "steal_state"}),
            "unknown control message",
            id="unknown-control",
        ),
        pytest.param(
            frame_bytes(FrameKind.DATA, ["S", "fid", 0, 8], b"\x00" * 8),
            "bad state DATA metadata",
            id="state-data-bad-meta",
        ),
    ],
)
def test_malformed_state_sync_frames_close_only_that_link(
    peers: Peers, frame: bytes, logged: str
) -> None:
    log = _data_log(peers, 1)
    since = log_size(log)
    with _stranger(peers, 1) as sock:
        port = sock.getsockname()[1]
        sock.sendall(frame)
        read_until_closed(sock)
    wait_for_log(log, [logged, str(port)], since=since)
    _world_still_works(peers)


def test_state_fetch_outside_a_sync_is_refused_with_a_typed_answer(peers: Peers) -> None:
    holder = peers.cluster.daemons[1].peer_id
    fetch = ["w", 0, 8, holder, "0" * 32]
    # A whole link (every connection), so the daemon has a link to answer on.
    extra = socket.create_connection(hostport(peers.cluster.daemons[1].data), timeout=10)
    with _stranger(peers, 1) as sock, extra:
        extra.sendall(
            frame_bytes(FrameKind.HELLO, {"peer": "stranger", "conn": 1, "k": CONNECTIONS})
        )
        time.sleep(0.3)  # the second connection attaches; no acknowledgement exists
        sock.sendall(frame_bytes(FrameKind.CONTROL, {"t": "fetch", "ranges": [[5, fetch]]}))
        reader = FrameReader()
        answers: list[Any] = []
        while not answers:
            chunk = sock.recv(4096)
            assert chunk, "the daemon closed the link instead of answering"
            answers = [f.meta for f in reader.feed(chunk) if f.kind == FrameKind.CONTROL]
    assert answers[0]["t"] == "fetch_error" and answers[0]["id"] == 5
    assert answers[0]["error"]["kind"] == "MismatchError", answers[0]
    _world_still_works(peers)


def test_data_from_a_non_member_for_a_collective_not_started_yet_does_not_abort_it(
    peers: Peers,
) -> None:
    epoch, tag = peers.comms[0].world.epoch, fresh_tag()
    with _stranger(peers, 1) as sock:
        # A piece of the members' next collective, sent before any of them starts it.
        sock.sendall(frame_bytes(FrameKind.DATA, [epoch, tag, 0, 0, 0, 0, 8], b"\xff" * 8))
        time.sleep(0.3)  # no acknowledgement exists; give the daemon time to stash it
        outcomes = _members_all_reduce(peers, tag)
    expected = sum(range(1, WORLD + 1))
    for rank, out in enumerate(outcomes):
        assert isinstance(out, np.ndarray), f"rank {rank}: {out!r}"
        assert (out == expected).all()
    _world_still_works(peers)


def test_abort_from_a_non_member_does_not_abort_the_members_collective(peers: Peers) -> None:
    epoch, tag = peers.comms[0].world.epoch, fresh_tag()
    error = {"kind": "CollectiveAborted", "message": "forged", "fields": {}}
    with _stranger(peers, 1) as sock:
        sock.sendall(frame_bytes(FrameKind.ABORT, [epoch, tag, error]))
        time.sleep(0.3)  # no acknowledgement exists; give the daemon time to act on it
    outcomes = _members_all_reduce(peers, tag)
    expected = sum(range(1, WORLD + 1))
    for rank, out in enumerate(outcomes):
        assert isinstance(out, np.ndarray), f"rank {rank}: {out!r}"
        assert (out == expected).all()
    _world_still_works(peers)


# -- coordinator -----------------------------------------------------------------


def _coordinator_log(peers: Peers) -> Path:
    return peers.cluster.workdir / "coordinator.log"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        pytest.param(GARBAGE, "ProtocolError", id="garbage"),
        pytest.param(_huge_payload_header(FrameKind.CONTROL), "FrameTooLarge", id="huge-payload"),
        pytest.param(
            frame_bytes(FrameKind.CONTROL, {"t": "world"}), "ProtocolError", id="no-request-id"
        ),
        pytest.param(
            frame_bytes(FrameKind.CONTROL, {"t": "world", "id": 1}),
            "ProtocolError",
            id="before-register",
        ),
        pytest.param(frame_bytes(FrameKind.DATA, [1]), "ProtocolError", id="data-frame"),
        pytest.param(
            frame_bytes(FrameKind.CONTROL, {"t": "barrier", "id": 1}, b"\x80" * 64),
            "ProtocolError",
            id="payload-before-handshake",
        ),
        pytest.param(
            frame_bytes(FrameKind.CONTROL, {"t": "register", "id": 1, "peer": "nonsense"}),
            "ProtocolError",
            id="bad-peer-record",
        ),
    ],
)
def test_bad_frames_on_the_coordinator_port_close_only_that_connection(
    peers: Peers, payload: bytes, error: str
) -> None:
    log = _coordinator_log(peers)
    since = log_size(log)
    _, port = _send_raw(peers.cluster.coordinator_addr, payload)
    wait_for_log(log, [error, str(port)], since=since)
    _world_still_works(peers)


def test_peer_registering_then_sending_garbage_leaves_no_pending_member(peers: Peers) -> None:
    log = _coordinator_log(peers)
    since = log_size(log)
    register = frame_bytes(FrameKind.HELLO, {}) + frame_bytes(
        FrameKind.CONTROL, {"t": "register", "id": 1, "peer": ["ghost", "127.0.0.1", 1]}
    )
    received, port = _send_raw(peers.cluster.coordinator_addr, register + GARBAGE)
    replies = [f.meta for f in _frames(received) if f.kind == FrameKind.CONTROL]
    assert replies and replies[0]["ok"] is True and "ghost" in replies[0]["world"]["pending"]
    wait_for_log(log, ["ProtocolError", str(port)], since=since)
    assert "ghost" not in peers.comms[0].world.pending
    _world_still_works(peers)


def test_coordinator_refuses_requests_before_the_handshake(peers: Peers) -> None:
    log = _coordinator_log(peers)
    since = log_size(log)
    register = frame_bytes(
        FrameKind.CONTROL, {"t": "register", "id": 1, "peer": ["sneaky", "127.0.0.1", 1]}
    )
    received, port = _send_raw(peers.cluster.coordinator_addr, register)
    assert not [f for f in _frames(received) if f.kind == FrameKind.CONTROL]
    wait_for_log(log, ["ProtocolError", "expected HELLO", str(port)], since=since)
    assert "sneaky" not in peers.comms[0].world.pending
    _world_still_works(peers)


# -- IPC -------------------------------------------------------------------------


@pytest.fixture
def dealer(peers: Peers) -> Iterator[zmq.Socket[bytes]]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(peers.cluster.daemons[0].ipc)
    try:
        yield sock
    finally:
        sock.close(0)


def _ipc_reply(sock: zmq.Socket[bytes], body: bytes) -> dict[str, Any]:
    sock.send(body)
    assert sock.poll(10_000, zmq.POLLIN), "the daemon did not answer"
    reply = msgpack.unpackb(sock.recv(), raw=False)
    assert isinstance(reply, dict)
    return reply


def _req(**fields: Any) -> bytes:
    return msgpack.packb({"id": 7, **fields}, use_bin_type=True)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        pytest.param(b"\xc1 this is not msgpack", "ProtocolError", id="not-msgpack"),
        pytest.param(b"", "ProtocolError", id="empty"),
        pytest.param(msgpack.packb([1, 2, 3]), "ProtocolError", id="not-a-map"),
        pytest.param(msgpack.packb({1: "int keys"}), "ProtocolError", id="int-keys"),
        pytest.param(_req(), "ProtocolError", id="no-op"),
        pytest.param(_req(op=5), "ProtocolError", id="op-not-a-string"),
        pytest.param(_req(op="format_disk"), "InvalidArgument", id="unknown-op"),
        pytest.param(_req(op="all_reduce"), "InvalidArgument", id="all-reduce-without-fields"),
        pytest.param(
            _req(op="all_reduce", shm="collnet-x", count="ten", dtype="float32", tag=1),
            "InvalidArgument",
            id="count-not-an-int",
        ),
        pytest.param(
            _req(op="all_reduce", shm="collnet-x", count=True, dtype="float32", tag=1),
            "InvalidArgument",
            id="count-is-a-bool",
        ),
        pytest.param(
            _req(op="all_reduce", shm="../../etc/passwd", count=1, dtype="float32", tag=1),
            "InvalidArgument",
            id="shm-path-traversal",
        ),
        pytest.param(
            _req(op="all_reduce", shm="collnet-does-not-exist", count=1, dtype="float32", tag=1),
            "InvalidArgument",
            id="shm-missing",
        ),
        pytest.param(
            _req(op="all_reduce", shm="collnet-x", count=1, dtype="complex128", tag=1),
            "InvalidArgument",
            id="bad-dtype",
        ),
        pytest.param(
            _req(op="all_reduce", shm="collnet-x", count=1, dtype="float32", tag=[1]),
            "InvalidArgument",
            id="bad-tag",
        ),
        pytest.param(_req(op="release"), "InvalidArgument", id="release-without-name"),
        pytest.param(
            _req(op="sync_state", revision=1, tensors="w"), "InvalidArgument", id="sync-not-a-list"
        ),
        pytest.param(
            _req(op="sync_state", revision=1, tensors=[["w", "collnet-x", 0, "float32", [-1]]]),
            "InvalidArgument",
            id="sync-negative-shape",
        ),
        pytest.param(
            _req(op="sync_state", revision=1, tensors=[["w", "collnet-x", 0, "object", [1]]]),
            "InvalidArgument",
            id="sync-bad-dtype",
        ),
        pytest.param(
            _req(op="sync_state", revision=-1, tensors=[]), "InvalidArgument", id="sync-bad-rev"
        ),
    ],
)
def test_bad_ipc_requests_get_a_typed_error_reply_and_the_daemon_keeps_serving(
    peers: Peers, dealer: zmq.Socket[bytes], body: bytes, kind: str
) -> None:
    reply = _ipc_reply(dealer, body)
    assert reply["ok"] is False
    assert reply["error"]["kind"] == kind, reply
    # The same socket is still served.
    assert _ipc_reply(dealer, _req(op="hello"))["ok"] is True
    _world_still_works(peers)


def test_shared_memory_out_of_range_is_refused(peers: Peers, dealer: zmq.Socket[bytes]) -> None:
    with collnet_client.connect(peers.cluster.daemons[0].ipc, timeout_s=CALL_TIMEOUT_S) as comm:
        arr = comm.empty(16, np.float32)
        seg_name = comm.memory.locate(arr)[0].name  # type: ignore[index]
        body = _req(op="all_reduce", shm=seg_name, offset=32, count=16, dtype="float32", tag="oob")
        reply = _ipc_reply(dealer, body)
        del arr
    assert reply["ok"] is False and reply["error"]["kind"] == "InvalidArgument", reply
    _world_still_works(peers)


def test_oversized_ipc_message_does_not_take_the_daemon_down(
    peers: Peers, dealer: zmq.Socket[bytes]
) -> None:
    dealer.send(b"\x00" * (MAX_REQUEST_BYTES + 1))
    dealer.send_multipart([b"three", b"part", b"message"])
    # Whatever happened to that client, other clients are served.
    with collnet_client.connect(peers.cluster.daemons[0].ipc, timeout_s=CALL_TIMEOUT_S) as comm:
        assert comm.world.size == WORLD
    _world_still_works(peers)


def test_connection_that_never_says_hello_is_closed_after_the_connect_timeout(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    workdir = tmp_path_factory.mktemp("silent")
    with running_peers(2, workdir, extra_args=["--connect-timeout-s", "1"]) as p:
        victim = p.cluster.daemons[0]
        log = p.cluster.workdir / "daemon0.log"
        since = log_size(log)
        with socket.create_connection(hostport(victim.data), timeout=10) as sock:
            sock.sendall(HEADER.pack(MAGIC, VERSION, FrameKind.HELLO, 0, 8, 0)[:7])  # half a header
            started = time.monotonic()
            read_until_closed(sock, timeout_s=8.0)
            assert time.monotonic() - started < 5.0
        wait_for_log(log, ["no HELLO within 1.0s"], since)
        inputs = peer_inputs(2, 101, np.dtype(np.float32), "sum", seed=4)
        assert_bit_identical(p.all_reduce(inputs, op="sum"))
