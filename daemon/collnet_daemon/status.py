"""``collnet status``: the world as the coordinator sees it.

The coordinator answers a ``status`` control request from any authenticated
connection, member or not (the same handshake as the daemons: with TLS, any
certificate of the cluster's CA, an operator's own included; otherwise the
shared secret is what lets an operator look): the epoch, every registered peer with
its state (``active`` in ring order, ``pending``, or ``unconfirmed`` after a
coordinator restart), data address, whether its control connection is up,
that connection's heartbeat RTT, and, once the peer has taken part in a
shared-state sync, the revision and state digest it reported. Then the link
matrix (``links``: per ordered pair of members the bandwidth measured at the
receiving end, the RTT, and each figure's age) and whether each peer's
advertised data port answered the coordinator's check (``reachability``).
The answer is ``collnet.wire.control.CoordinatorStatus``; the coordinator
builds it in ``CoordinatorService.status``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from collnet.transport.tls import Tls
from collnet.wire import control as wire
from collnet.wire.topology import TopologyStatus
from collnet_daemon.control import CoordinatorClient


async def fetch_status(
    host: str, port: int, secret: bytes | None, timeout_s: float = 10.0, tls: Tls | None = None
) -> dict[str, Any]:
    """Ask the coordinator at ``host:port`` for its status, without registering;
    the answer, validated, as its JSON-safe map. With ``tls``, the coordinator
    must present the certificate named ``coordinator``."""
    client = CoordinatorClient(lambda _world: None, secret=secret, tls=tls)
    await client.connect(host, port, timeout_s)
    try:
        answer = await asyncio.wait_for(client.call(wire.GetStatus(), wire.StatusAnswer), timeout_s)
    finally:
        client.close()
    return answer.status.to_wire()


def render_table(status: wire.CoordinatorStatus | dict[str, Any]) -> str:
    """``status`` (or its map, as ``fetch_status`` gives it) as the text ``collnet
    status`` prints."""
    if not isinstance(status, wire.CoordinatorStatus):
        status = wire.CoordinatorStatus.from_wire(status)
    world = status.world
    lines = [
        f"coordinator {status.address}  epoch {status.epoch}  "
        f"world size {world.size}  pending {len(world.pending)}",
    ]
    head = ("RANK", "PEER", "STATE", "DATA", "CONTROL", "RTT", "REVISION", "STATE DIGEST")
    table = [head]
    for p in status.peers:
        table.append(
            (
                "-" if p.rank is None else str(p.rank),
                p.id,
                p.state,
                p.data,
                "up" if p.connected else "down",
                "-" if p.rtt_s is None else f"{p.rtt_s * 1e3:.2f} ms",
                "-" if p.revision is None else str(p.revision),
                p.sync_error or (p.state_digest or "-")[:16],
            )
        )
    lines += _columns(table)
    if not status.peers:
        lines.append("(no peers registered)")
    if status.topology is not None:
        lines += _topology(status.topology)
    return "\n".join(lines)


def _columns(table: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def _topology(topology: TopologyStatus) -> list[str]:
    """After a blank line (the peers' table ends there): the unreachable data
    ports, then the link matrix, one ordered pair a row."""
    lines = [
        f"UNREACHABLE data port of {r.peer} at {r.address}: {r.error}"
        for r in topology.reachability
        if r.reachable is False
    ]
    rows = topology.links.to_wire(topology.now_s)
    if not rows:
        return ["", *lines] if lines else []
    table: list[tuple[str, ...]] = [("LINK", "BANDWIDTH", "AGE", "RTT", "AGE")]
    for row in rows:
        bw, rtt = row["bandwidth_bps"], row["rtt_s"]
        table.append(
            (
                f"{row['src']} -> {row['dst']}",
                "-" if bw is None else f"{bw / 1e6:.1f} Mbit/s",
                "-" if bw is None else f"{row['bandwidth_age_s']:.0f} s",
                "-" if rtt is None else f"{rtt * 1e3:.2f} ms",
                "-" if rtt is None else f"{row['rtt_age_s']:.0f} s",
            )
        )
    return ["", *lines, *_columns(table)]
