"""iperf-style loopback throughput: what plain TCP can carry on this machine.

A receiver process listens on 127.0.0.1, accepts K connections and drains
each with ``recv_into`` into a 4 MiB buffer; a sender process opens K
connections and pushes ``nbytes / K`` bytes down each from its own thread
with ``sendall`` (threads, because ``sendall``/``recv_into`` release the GIL).
The clock runs in the sender from the moment all K connections are open
until the receiver has acknowledged the last byte on every connection, so
the figure is end to end. Each stream count is repeated and the median
reported, in GB/s (1e9 bytes per second).

Run on its own::

    python bench/rawtcp.py --streams 1,4 --bytes 256MiB --repeats 3
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from collnet_lab.localcluster import parse_size

CHUNK = 4 << 20


def _recv_exact_count(conn: socket.socket, nbytes: int, buf: bytearray) -> None:
    view = memoryview(buf)
    left = nbytes
    while left > 0:
        got = conn.recv_into(view[: min(left, len(buf))])
        if got == 0:
            raise ConnectionError(f"sender closed with {left} bytes outstanding")
        left -= got
    conn.sendall(b"k")


def serve(streams: int, nbytes: int) -> None:
    """Receiver: print the port, accept ``streams`` connections, drain them, ack each."""
    with socket.create_server(("127.0.0.1", 0), backlog=streams) as srv:
        print(srv.getsockname()[1], flush=True)
        conns = [srv.accept()[0] for _ in range(streams)]
    share = _shares(nbytes, streams)
    threads = [
        threading.Thread(target=_recv_exact_count, args=(c, s, bytearray(CHUNK)))
        for c, s in zip(conns, share, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()


def _shares(nbytes: int, streams: int) -> list[int]:
    base, extra = divmod(nbytes, streams)
    return [base + (1 if i < extra else 0) for i in range(streams)]


def _send(conn: socket.socket, nbytes: int, payload: memoryview) -> None:
    left = nbytes
    while left > 0:
        k = min(left, len(payload))
        conn.sendall(payload[:k])
        left -= k
    if conn.recv(1) != b"k":
        raise ConnectionError("receiver did not acknowledge")


def measure_once(streams: int, nbytes: int) -> float:
    """Seconds to move ``nbytes`` over ``streams`` loopback connections to another process."""
    rx = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--streams", str(streams), "--bytes", str(nbytes)],
        stdout=subprocess.PIPE,
    )
    try:
        assert rx.stdout is not None
        port = int(rx.stdout.readline())
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
        payload = memoryview(bytearray(b"\xa5" * CHUNK))
        threads = [
            threading.Thread(target=_send, args=(c, s, payload))
            for c, s in zip(conns, _shares(nbytes, streams), strict=True)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        for c in conns:
            c.close()
        if rx.wait(30) != 0:
            raise RuntimeError(f"receiver exited with {rx.returncode}")
        return elapsed
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


def measure(stream_counts: list[int], nbytes: int, repeats: int) -> dict[str, Any]:
    """Median GB/s per stream count; the same total ``nbytes`` for every count."""
    out: dict[str, Any] = {"bytes": nbytes, "repeats": repeats, "streams": {}}
    for k in stream_counts:
        times = [measure_once(k, nbytes) for _ in range(repeats)]
        t = statistics.median(times)
        out["streams"][str(k)] = {"time_s": t, "gbps": nbytes / t / 1e9, "times_s": times}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,4", help="Comma-separated stream counts.")
    ap.add_argument("--bytes", default="256MiB", help="Total bytes per measurement.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    nbytes = parse_size(args.bytes)
    counts = [int(s) for s in args.streams.split(",")]
    if args.serve:
        serve(counts[0], nbytes)
        return 0
    res = measure(counts, nbytes, args.repeats)
    if args.json:
        print(json.dumps(res))
    else:
        for k, row in res["streams"].items():
            print(f"{k:>3} stream(s): {row['gbps']:.3f} GB/s ({row['time_s'] * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
