"""The coordinator orders the ring for the bottleneck bandwidth, at agreed epochs.

Loopback links are all alike, so the link figures come from a file the
coordinator is given (``--link-matrix-file``, re-read when it changes): one
ring of fast hops, every other directed pair slow. The world's order (rank =
position) must be that ring when the peers are admitted, move to a new ring
only through a new epoch every member agrees to at ``update_topology``, and
all-reduces must stay exact across the move.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import (
    Peers,
    assert_bit_identical,
    assert_matches_reference,
    peer_inputs,
    running_peers,
)

pytestmark = pytest.mark.timeout(120)

IDS = [f"peer{i:02d}" for i in range(4)]
FAST_BPS, SLOW_BPS = 1e9, 1e7


def _write_ring(path: Path, ring: list[str]) -> None:
    hops = {(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))}
    rows = [
        {"src": a, "dst": b, "bandwidth_bps": FAST_BPS if (a, b) in hops else SLOW_BPS}
        for a in IDS
        for b in IDS
        if a != b
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)


def _reduce_and_check(peers: Peers, seed: int) -> None:
    inputs = peer_inputs(peers.size, 100_003, np.dtype(np.float32), "sum", seed)
    results = peers.all_reduce(inputs, algo="ring")
    assert_bit_identical(results)
    assert_matches_reference(results, inputs, "sum")


def test_ring_follows_the_link_matrix_and_moves_only_at_a_new_epoch(tmp_path: Path) -> None:
    links = tmp_path / "links.json"
    _write_ring(links, ["peer00", "peer02", "peer01", "peer03"])
    args = ["--link-matrix-file", str(links)]
    with running_peers(4, tmp_path / "c", coordinator_args=args) as peers:
        first = peers.sync_world()
        assert {w.peers for w in first} == {("peer00", "peer02", "peer01", "peer03")}
        _reduce_and_check(peers, 1)
        # Nothing changed: the next barrier keeps the epoch and the order.
        assert {w.epoch for w in peers.sync_world()} == {first[0].epoch}
        # A slow hop appears on the current ring: the next barrier re-plans,
        # as one new epoch on every member.
        _write_ring(links, ["peer00", "peer03", "peer02", "peer01"])
        moved = peers.sync_world()
        assert {w.epoch for w in moved} == {first[0].epoch + 1}
        assert {w.peers for w in moved} == {("peer00", "peer03", "peer02", "peer01")}
        _reduce_and_check(peers, 2)


def test_join_order_is_kept_when_asked_for(tmp_path: Path) -> None:
    links = tmp_path / "links.json"
    _write_ring(links, ["peer00", "peer02", "peer01", "peer03"])
    args = ["--link-matrix-file", str(links), "--ring-order", "join"]
    with running_peers(4, tmp_path / "c", coordinator_args=args) as peers:
        assert {w.peers for w in peers.sync_world()} == {tuple(IDS)}
        _reduce_and_check(peers, 3)
