"""Kernel buffers are fixed only where that beats autotuning (collnet.transport.sockbuf)."""

from __future__ import annotations

import socket

from collnet.transport.connection import tune_socket
from collnet.transport.sockbuf import BufferCaps, SocketCaps, kernel_caps

MIB = 1 << 20
STOCK = SocketCaps(send=BufferCaps(212992, 4 * MIB), receive=BufferCaps(212992, 6 * MIB))
# The WAN lab's machine: wmem_max = rmem_max = 4 MiB, tcp_rmem's ceiling 32 MiB.
TUNED = SocketCaps(send=BufferCaps(4 * MIB, 4 * MIB), receive=BufferCaps(4 * MIB, 32 * MIB))


def test_a_stock_host_leaves_both_buffers_to_autotuning() -> None:
    # Fixed, they would be 416 KiB: ~33 Mbit/s per stream on a 100 ms path.
    assert STOCK.send.request() is None
    assert STOCK.receive.request() is None
    assert STOCK.window_bytes() == 2 * MIB


def test_a_buffer_stays_fixed_where_that_is_at_least_what_autotuning_would_give() -> None:
    assert TUNED.send.request() == 8 * MIB  # fixed: 8 MiB, autotuning: 4 MiB
    assert TUNED.receive.request() == 8 * MIB  # fixed: 8 MiB = the 8 MiB wanted
    assert TUNED.window_bytes() == 4 * MIB
    # A fixed buffer only just under autotuning's reach is not asked for.
    assert BufferCaps(2 * MIB, 6 * MIB).request() is None
    assert BufferCaps(2 * MIB, 6 * MIB).effective_bytes() == 6 * MIB


def test_tune_socket_sets_exactly_what_the_caps_ask_for() -> None:
    caps = kernel_caps()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        before = (
            client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        )
        tune_socket(client)
        after = (
            client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        )
        for buffer, was, now in zip((caps.send, caps.receive), before, after, strict=True):
            if buffer.request() is None:
                assert now == was
            else:
                assert now == buffer.fixed_bytes()
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for s in (client, accepted, server):
            s.close()
