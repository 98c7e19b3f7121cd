"""The kernel's timed round trip of a real TCP connection (collnet.transport.tcpinfo)."""

from __future__ import annotations

import socket

from collnet.transport.tcpinfo import smoothed_rtt_s


def test_a_real_loopback_connection_has_a_small_positive_rtt() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        accepted, _ = server.accept()
        with accepted:
            rtt = smoothed_rtt_s(client)
            assert rtt is not None and 0 < rtt < 0.5
            assert smoothed_rtt_s(accepted) is not None


def test_no_socket_or_no_tcp_means_unknown() -> None:
    assert smoothed_rtt_s(None) is None
    a, b = socket.socketpair()
    with a, b:
        assert smoothed_rtt_s(a) is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert smoothed_rtt_s(udp) is None
