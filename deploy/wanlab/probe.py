"""Small TCP tools run inside lab hosts: an echo/sink server, a ping and a blaster.

No iperf3 on the machine, and the lab needs only two questions answered: what
round trip does TCP see (``ping``: one byte back and forth, TCP_NODELAY), and
what rate does a path carry (``blast``: K streams for T seconds; the server
times the bytes from its first to its last, so RTT at the ends does not dilute
the rate). Each prints one JSON object.

    python -m wanlab.probe serve --listen 10.201.2.2:5201
    python -m wanlab.probe ping --to 10.201.2.2:5201 --count 50
    python -m wanlab.probe blast --to 10.201.2.2:5201 --seconds 5 --streams 4
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import threading
import time

_MODE_ECHO = b"e"
_MODE_SINK = b"s"
_BUF = 1 << 20


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _serve_one(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == _MODE_ECHO:
            while data := conn.recv(64):
                conn.sendall(data)
        elif mode == _MODE_SINK:
            buf = bytearray(_BUF)
            total, first, last = 0, 0.0, 0.0
            while n := conn.recv_into(buf):
                last = time.monotonic()
                if not total:
                    first = last
                total += n
            conn.sendall(struct.pack("!Qd", total, last - first))


def serve(listen: str, ready: str | None) -> None:
    srv = socket.create_server(_addr(listen), backlog=64)
    if ready:
        with open(ready, "w") as f:
            f.write(str(srv.getsockname()[1]))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


def ping(to: str, count: int) -> dict[str, object]:
    s = socket.create_connection(_addr(to), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(_MODE_ECHO)
    rtts = []
    for _ in range(count + 1):
        t0 = time.monotonic()
        s.sendall(b"x")
        if not s.recv(1):
            raise ConnectionError("echo server closed")
        rtts.append(time.monotonic() - t0)
        time.sleep(0.002)
    s.close()
    rtts = rtts[1:]  # the first one may still ride slow start / ARP
    return {
        "rtt_ms": [round(r * 1e3, 3) for r in rtts],
        "median_ms": round(statistics.median(rtts) * 1e3, 3),
        "min_ms": round(min(rtts) * 1e3, 3),
        "max_ms": round(max(rtts) * 1e3, 3),
    }


def _stream(to: str, seconds: float, out: list[tuple[int, float]]) -> None:
    s = socket.create_connection(_addr(to), timeout=60)
    s.sendall(_MODE_SINK)
    chunk = memoryview(bytearray(_BUF))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while len(reply) < 16:
        more = s.recv(16 - len(reply))
        if not more:
            raise ConnectionError("sink closed before its count")
        reply += more
    s.close()
    total, span = struct.unpack("!Qd", reply)
    out.append((total, span))


def blast(to: str, seconds: float, streams: int) -> dict[str, object]:
    results: list[tuple[int, float]] = []
    threads = [
        threading.Thread(target=_stream, args=(to, seconds, results)) for _ in range(streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(results) != streams:
        raise ConnectionError("a stream failed")
    total = sum(b for b, _ in results)
    span = max(s for _, s in results)
    return {"bytes": total, "seconds": round(span, 3), "mbit": round(total * 8 / span / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wanlab.probe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--listen", required=True)
    p.add_argument("--ready")
    p = sub.add_parser("ping")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=20)
    p = sub.add_parser("blast")
    p.add_argument("--to", required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--streams", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.listen, args.ready)
        return 0
    if args.cmd == "ping":
        print(json.dumps(ping(args.to, args.count)))
    else:
        print(json.dumps(blast(args.to, args.seconds, args.streams)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
