"""A data link cut between two live peers (no peer died, the world is unchanged).

The kernel's socket-destroy (``ss -K``, root only) aborts the TCP connections
of exactly one link, as a middlebox resetting them would.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import (
    assert_bit_identical,
    fresh_tag,
    peer_inputs,
    running_peers,
)
from collnet_client import CollnetError, PeerLost

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)"),
]

# Every member must learn of the failure within this, not at its deadline.
FAIL_BOUND_S = 5.0
DEADLINE_S = 40.0


def _cut_connections_into(port: int) -> None:
    proc = subprocess.run(
        ["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"ss -K not permitted here: {proc.stderr.strip()}")


def test_a_cut_link_aborts_the_collective_on_every_member_then_the_world_goes_on(
    tmp_path: Path,
) -> None:
    with running_peers(3, tmp_path) as peers:
        ids = [c.peer_id for c in peers.comms]
        a, b, c = sorted(range(3), key=lambda i: ids[i])
        # The smaller id dials: the only connections into b's data port are a's.
        port_b = int(peers.cluster.daemons[b].data.rsplit(":", 1)[1])
        tag = fresh_tag()
        outcome: dict[int, BaseException | None] = {}

        def reduce(i: int) -> None:
            try:
                peers.comms[i].all_reduce(
                    np.ones(1 << 16, np.float32), tag=tag, timeout_s=DEADLINE_S
                )
                outcome[i] = None
            except CollnetError as exc:
                outcome[i] = exc

        threads = [threading.Thread(target=reduce, args=(i,)) for i in (a, b)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # a and b are in the collective, waiting for c
        _cut_connections_into(port_b)
        for t in threads:
            t.join(FAIL_BOUND_S)
        assert not any(t.is_alive() for t in threads), "the cut link's ends must fail at once"
        assert isinstance(outcome[a], PeerLost) and isinstance(outcome[b], PeerLost), outcome
        # c never saw the cut; it joins the collective late and must fail at once
        # (told by a and b), not wait out its deadline.
        started = time.monotonic()
        reduce(c)
        took = time.monotonic() - started
        assert isinstance(outcome[c], PeerLost), outcome[c]
        assert took < FAIL_BOUND_S, f"c failed only after {took:.1f}s"
        # Nobody left: the same world re-links and reduces correctly.
        inputs = peer_inputs(3, 4099, np.dtype(np.float32), "sum", seed=3)
        results = peers.all_reduce(inputs, op="sum")
        assert_bit_identical(results)
        assert np.allclose(results[0], np.sum(inputs, axis=0), atol=1e-5)
