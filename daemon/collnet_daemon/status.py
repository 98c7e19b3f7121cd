"""``collnet status``: the world as the coordinator sees it.

The coordinator answers a ``status`` control request from any authenticated
connection, member or not (the same HMAC handshake as the daemons, so the
secret is what lets an operator look): the epoch, every registered peer with
its state (``active`` in ring order, ``pending``, or ``unconfirmed`` after a
coordinator restart), data address, whether its control connection is up,
that connection's heartbeat RTT, and, once the peer has taken part in a
shared-state sync, the revision and state digest it reported.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from collnet.membership import WorldView
from collnet_daemon.control import CoordinatorClient

if TYPE_CHECKING:
    from collnet_daemon.coordinator import CoordinatorService

_STARTED_S = time.monotonic()


def _control_rtt_s(service: CoordinatorService, peer: str) -> float | None:
    conn = service.conns.get(peer)
    heartbeat = getattr(conn.handler, "heartbeat", None) if conn is not None else None
    return None if heartbeat is None else heartbeat.liveness.srtt_s


def _reported(service: CoordinatorService, peer: str) -> dict[str, Any]:
    report = getattr(service.state, "reported", {}).get(peer)
    if not isinstance(report, dict):
        return {}
    out: dict[str, Any] = {}
    if "revision" in report:
        out["revision"] = report["revision"]
    if "digest" in report:
        digest = report["digest"]
        out["state_digest"] = digest.hex() if isinstance(digest, bytes) else digest
    if "error" in report:
        out["sync_error"] = (report["error"] or {}).get("kind", "error")
    return out


def coordinator_status(service: CoordinatorService) -> dict[str, Any]:
    """The coordinator's view of the world (see the module docstring); msgpack-safe."""
    state = service.state
    peers: list[dict[str, Any]] = []
    rows = [(p, "active", rank) for rank, p in enumerate(state.active)]
    rows += [(p, "pending", None) for p in state.pending.values()]
    for info, kind, rank in rows:
        if info.id in state.unconfirmed:
            kind = "unconfirmed"
        conn = service.conns.get(info.id)
        peers.append(
            {
                "id": info.id,
                "state": kind,
                "rank": rank,
                "data": f"{info.host}:{info.port}",
                "connected": conn is not None and not conn.closed,
                "rtt_s": _control_rtt_s(service, info.id),
                **_reported(service, info.id),
            }
        )
    return {
        "epoch": state.epoch,
        "world": state.world().to_wire(),
        "peers": peers,
        "coordinator": {
            "address": ":".join(map(str, service.address or ("?", 0))),
            "uptime_s": round(time.monotonic() - _STARTED_S, 3),
        },
    }


async def fetch_status(
    host: str, port: int, secret: bytes | None, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Ask the coordinator at ``host:port`` for its status, without registering."""
    client = CoordinatorClient(lambda _world: None, secret=secret)
    await client.connect(host, port, timeout_s)
    try:
        reply = await asyncio.wait_for(client.call("status"), timeout_s)
    finally:
        client.close()
    status = reply.get("status")
    if not isinstance(status, dict):
        raise ValueError("the coordinator's status reply has no status map")
    return status


def render_table(status: dict[str, Any]) -> str:
    """``status`` as the text ``collnet status`` prints."""
    world = WorldView.from_wire(status["world"])
    coord = status.get("coordinator", {})
    peers = status.get("peers", [])
    lines = [
        f"coordinator {coord.get('address', '?')}  epoch {status['epoch']}  "
        f"world size {world.size}  pending {len(world.pending)}",
    ]
    head = ("RANK", "PEER", "STATE", "DATA", "CONTROL", "RTT", "REVISION", "STATE DIGEST")
    table = [head]
    for p in peers:
        rtt = p.get("rtt_s")
        revision = p.get("revision")
        table.append(
            (
                "-" if p.get("rank") is None else str(p["rank"]),
                str(p["id"]),
                str(p["state"]),
                str(p.get("data", "")),
                "up" if p.get("connected") else "down",
                "-" if rtt is None else f"{rtt * 1e3:.2f} ms",
                "-" if revision is None else str(revision),
                p.get("sync_error") or str(p.get("state_digest", "-"))[:16],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    if not peers:
        lines.append("(no peers registered)")
    return "\n".join(lines)
