"""Link probing on a real cluster: the matrix in ``collnet status`` is measured,
kept fresh by collective traffic, and bounded by the world.

Three daemons on loopback. Each probes its new links (RTT pings, one
bandwidth burst while idle) and reports to the coordinator; ``collnet
status --json`` then holds every ordered pair of members with a bandwidth
and an RTT. A large all-reduce refreshes the bandwidth of the pairs it
used (their age drops), and a departed peer's rows go with it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_harness import running_peers, status_json, wait_until


def _links(status: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["src"], row["dst"]): row for row in status["links"]}


def _complete(links: dict[tuple[str, str], dict[str, Any]], ids: list[str]) -> bool:
    pairs = [(a, b) for a in ids for b in ids if a != b]
    return all(
        p in links and links[p]["bandwidth_bps"] is not None and links[p]["rtt_s"] is not None
        for p in pairs
    )


@pytest.mark.timeout(120)
def test_status_shows_a_measured_matrix_refreshed_by_traffic_and_bounded_by_the_world(
    tmp_path: Path,
) -> None:
    with running_peers(3, tmp_path / "c", extra_args=["--connections", "2"]) as p:
        addr = p.cluster.coordinator_addr
        ids = [d.peer_id for d in p.cluster.daemons]
        wait_until(lambda: _complete(_links(status_json(addr)), ids), 30.0, "a full matrix")
        status = status_json(addr)
        links = _links(status)
        assert len(links) == 6  # every ordered pair of members, nothing else
        for row in links.values():
            # Loopback: well under a second round trip, and far faster than 50 Mbit/s
            # (a burst of 4 MiB, or a collective's pieces), but no faster than memory.
            assert 0 < row["rtt_s"] < 0.5, row
            assert 50e6 < row["bandwidth_bps"] < 1e12, row
            assert row["bandwidth_age_s"] >= 0 and row["rtt_age_s"] >= 0
        assert {r["peer"]: r["reachable"] for r in status["reachability"]} == dict.fromkeys(
            ids, True
        )

        # Let the probes' figures age, then move real data: the ring's hops are
        # measured again from the collective's own pieces.
        time.sleep(4.0)
        before = _links(status_json(addr))
        assert all(row["bandwidth_age_s"] >= 3.0 for row in before.values()), before
        inputs = [np.full(8 << 20, float(r + 1), np.float32) for r in range(3)]
        results = p.all_reduce(inputs)
        assert all(np.array_equal(r, np.full(8 << 20, 6.0, np.float32)) for r in results)
        order = [row["id"] for row in sorted(status["peers"], key=lambda r: r["rank"])]
        hops = [(order[i], order[(i + 1) % 3]) for i in range(3)]

        def refreshed() -> bool:
            now = _links(status_json(addr))
            return all(now[h]["bandwidth_age_s"] < before[h]["bandwidth_age_s"] for h in hops)

        wait_until(refreshed, 15.0, "bandwidth of the ring's hops measured again")

        # A departed peer's rows leave the matrix, and its reachability row too.
        gone = p.cluster.daemons[2]
        p.comms[2].close()
        p.comms.pop()
        p.cluster.kill(gone)
        gone.proc.wait(10)

        def forgotten() -> bool:
            status = status_json(addr)
            return all(gone.peer_id not in pair for pair in _links(status)) and all(
                r["peer"] != gone.peer_id for r in status["reachability"]
            )

        wait_until(forgotten, 20.0, "the departed peer's links evicted")
        rest = _links(status_json(addr))
        assert set(rest) <= {(ids[0], ids[1]), (ids[1], ids[0])}
