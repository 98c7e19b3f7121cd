"""Connections per link from the bandwidth-delay product, and the star/ring cost model."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from recording_router import RecordingRouter

from collnet.algo.select import choose_algorithm
from collnet.errors import PeerLost, ProtocolError
from collnet.membership import PeerInfo, WorldView
from collnet.membership.bounds import world_from_wire
from collnet.topology.costmodel import (
    DIRECT_MARGIN,
    HOP_OVERHEAD_S,
    LinkCosts,
    best_algorithm,
    direct_seconds,
    ring_seconds,
    star_seconds,
)
from collnet.topology.striping import (
    MAX_CONNECTIONS,
    UNKNOWN_LINK_CONNECTIONS,
    LinkFigures,
    connections_after,
    connections_for,
    connections_sharing,
    is_loopback,
)
from collnet.transport.mesh import Mesh

GBIT = 1e9
WINDOW = 4 << 20


def test_loopback_gets_one_connection_with_or_without_an_estimate() -> None:
    assert connections_for(None, "127.0.0.1") == 1
    assert connections_for(None, "::1") == 1
    assert connections_for(None, "localhost") == 1
    assert connections_for(LinkFigures(40 * GBIT, 50e-6), "127.0.0.1", WINDOW) == 1


def test_an_unknown_remote_link_keeps_the_fixed_default() -> None:
    assert connections_for(None, "10.0.0.2") == UNKNOWN_LINK_CONNECTIONS
    assert not is_loopback("10.0.0.2") and not is_loopback("example.org")


def test_a_timed_round_trip_sizes_an_unknown_link_for_a_nominal_gigabit() -> None:
    far = "10.0.0.2"
    # Up to ~134 ms a nominal gigabit (with headroom) fits in the default 4 windows.
    assert connections_for(None, far, WINDOW, rtt_s=0.1) == UNKNOWN_LINK_CONNECTIONS
    assert connections_for(None, far, WINDOW, rtt_s=0.0005) == UNKNOWN_LINK_CONNECTIONS
    # 200 ms: 1.25 x 25 MB over 4 MiB windows -> 8; 150 ms -> 6.
    assert connections_for(None, far, WINDOW, rtt_s=0.2) == 8
    assert connections_for(None, far, WINDOW, rtt_s=0.15) == 6
    assert connections_for(None, far, WINDOW, rtt_s=5.0) == MAX_CONNECTIONS
    # Loopback stays one stream; a nonsense RTT is no RTT; an estimate wins.
    assert connections_for(None, "127.0.0.1", WINDOW, rtt_s=0.2) == 1
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        assert connections_for(None, far, WINDOW, rtt_s=bad) == UNKNOWN_LINK_CONNECTIONS
    assert connections_for(LinkFigures(GBIT, 0.2), far, WINDOW, rtt_s=0.2) == 6


@given(st.floats(min_value=1e-6, max_value=10.0), st.floats(min_value=1e-6, max_value=10.0))
def test_a_longer_timed_round_trip_never_gets_fewer_streams(a: float, b: float) -> None:
    short, long_ = sorted((a, b))
    k_short = connections_for(None, "10.0.0.2", WINDOW, rtt_s=short)
    k_long = connections_for(None, "10.0.0.2", WINDOW, rtt_s=long_)
    assert UNKNOWN_LINK_CONNECTIONS <= k_short <= k_long <= MAX_CONNECTIONS


def test_a_long_fat_link_gets_enough_streams_to_cover_its_bdp() -> None:
    # 1 Gbit/s at 100 ms: 12.5 MB in flight, 4 MiB per stream -> 3 streams.
    assert connections_for(LinkFigures(GBIT, 0.1), "10.0.0.2", WINDOW) == 3
    # 1 Gbit/s at 200 ms: 25 MB -> 6.
    assert connections_for(LinkFigures(GBIT, 0.2), "10.0.0.2", WINDOW) == 6
    # 10 Gbit/s at 300 ms is past the bound.
    assert connections_for(LinkFigures(10 * GBIT, 0.3), "10.0.0.2", WINDOW) == MAX_CONNECTIONS
    # A LAN: one window covers it.
    assert connections_for(LinkFigures(GBIT, 0.001), "10.0.0.2", WINDOW) == 1


@given(
    st.floats(min_value=1e3, max_value=1e12),
    st.floats(min_value=0.0, max_value=10.0),
    st.integers(min_value=64 << 10, max_value=64 << 20),
)
def test_k_is_the_ceiling_of_bdp_over_window_within_bounds(bps: float, rtt: float, w: int) -> None:
    k = connections_for(LinkFigures(bps, rtt), "10.1.2.3", w)
    want = math.ceil(bps / 8 * rtt / w) if bps * rtt > 0 else 1
    assert k == max(1, min(MAX_CONNECTIONS, want))


# -- the star/ring model ------------------------------------------------------
WAN = LinkCosts(max_rtt_s=0.1, bottleneck_bps=GBIT)
LOOPBACK = LinkCosts(max_rtt_s=50e-6, bottleneck_bps=20 * GBIT)


@given(st.integers(1, MAX_CONNECTIONS), st.integers(1, 64))
def test_links_sharing_a_node_split_its_connections_and_keep_them_all_in_flight(
    k: int, fan: int
) -> None:
    share = connections_sharing(k, fan)
    assert 1 <= share <= k
    assert share * fan >= k  # together at least the K windows the link was sized for
    assert (share - 1) * fan < k  # and no more of them than that takes
    assert connections_sharing(k, 1) == k


def test_a_direct_all_reduce_among_four_at_400_mbit_and_200ms_uses_three_per_peer() -> None:
    # The dial sizes that unmeasured link for a nominal 1 Gbit/s: K = 8; the
    # three links of a direct all-reduce share the node's, 3 connections each.
    k = connections_for(None, "10.0.0.2", WINDOW, rtt_s=0.2)
    assert k == 8 and connections_sharing(k, 3) == 3


def test_on_a_100ms_wan_small_and_mid_tensors_take_the_star_big_ones_the_ring() -> None:
    assert best_algorithm(WAN, 4, 4 << 10) == "star"
    assert best_algorithm(WAN, 4, 1 << 20) == "star"
    assert best_algorithm(WAN, 4, 64 << 20) != "star"


def test_on_loopback_the_ring_wins_from_a_megabyte() -> None:
    assert best_algorithm(LOOPBACK, 4, 4 << 10) == "star"
    assert best_algorithm(LOOPBACK, 4, 1 << 20) != "star"


def test_two_ranks_always_take_the_star() -> None:
    assert (
        best_algorithm(WAN, 2, 1 << 30) == "star" and best_algorithm(LOOPBACK, 2, 1 << 30) == "star"
    )


@given(
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=1e6, max_value=1e11),
    st.integers(min_value=3, max_value=64),
    st.integers(min_value=1, max_value=1 << 32),
)
def test_the_choice_is_the_cheaper_model_and_the_crossover_is_monotone(
    rtt: float, bps: float, world: int, nbytes: int
) -> None:
    costs = LinkCosts(rtt, bps)
    star, ring = star_seconds(costs, world, nbytes), ring_seconds(costs, world, nbytes)
    assert (best_algorithm(costs, world, nbytes) == "star") == (star <= ring)
    # A bigger tensor never turns the ring's choice back into the star's.
    if best_algorithm(costs, world, nbytes) != "star":
        assert best_algorithm(costs, world, nbytes * 2) != "star"


def test_figures_that_are_not_a_real_link_are_invalid() -> None:
    assert LOOPBACK.valid() and WAN.valid()
    assert not LinkCosts(math.nan, GBIT).valid() and not LinkCosts(0.1, 0.0).valid()


# -- auto from the epoch's agreed figures ---------------------------------------
def test_auto_follows_the_model_when_the_world_publishes_figures() -> None:
    assert choose_algorithm("auto", 4, 1 << 20, costs=WAN) == "star"
    assert choose_algorithm("auto", 4, 1 << 20, costs=LOOPBACK) == "ring"
    assert choose_algorithm("auto", 4, 64 << 20, costs=WAN) == "ring"
    # Without figures, the size rule; a named algorithm is never overridden.
    assert choose_algorithm("auto", 4, 1 << 20) == "ring"
    assert choose_algorithm("auto", 4, 4 << 10) == "star"
    assert choose_algorithm("ring", 4, 4 << 10, costs=WAN) == "ring"


def test_world_carries_its_costs_through_the_wire_and_refuses_bad_ones() -> None:
    world = WorldView(3, (PeerInfo("a", "127.0.0.1", 1), PeerInfo("b", "127.0.0.1", 2)), ("c",))
    for costs in (None, LinkCosts(0.1, 1e9), LinkCosts(0, 5e6)):
        w = WorldView(world.epoch, world.peers, world.pending, costs)
        wire = w.to_wire()
        assert ("costs" in wire) == (costs is not None)
        assert WorldView.from_wire(wire) == w == world_from_wire(wire, "test")
    for bad in ([0.1], [0.1, 0], [-1, 1e9], [0.1, float("nan")], ["0.1", 1e9], [True, 1e9], 7):
        wire = {**world.to_wire(), "costs": bad}
        with pytest.raises(ProtocolError):
            WorldView.from_wire(wire)
        with pytest.raises(ProtocolError):
            world_from_wire(wire, "test")


# -- the mesh: the dialler's K over real loopback sockets ------------------------
@pytest.mark.timeout(30)
async def test_the_acceptor_takes_the_diallers_k_and_an_undialled_wait_fails_once() -> None:
    # "m" sorts after "a", so "a" dials and "m" waits for it.
    waiter_router, dialler_router = RecordingRouter(), RecordingRouter()
    waiter = Mesh("m", None, waiter_router, connect_timeout_s=0.5)
    dialler = Mesh("a", 3, dialler_router, connect_timeout_s=5.0)
    try:
        addr = await waiter.listen("127.0.0.1", 0)
        # Nobody dials yet: every waiter fails with PeerLost, the daemon hears once.
        outcomes = await asyncio.gather(
            waiter.get_link("a", ("127.0.0.1", 1)),
            waiter.get_link("a", ("127.0.0.1", 1)),
            return_exceptions=True,
        )
        assert all(isinstance(o, PeerLost) for o in outcomes), outcomes
        assert [peer for peer, _ in waiter_router.lost] == ["a"]
        # Now "a" dials with a forced K of 3; the auto side takes it.
        accepted = asyncio.ensure_future(waiter.get_link("a", ("127.0.0.1", 1)))
        dialled = await dialler.get_link("m", addr)
        link = await accepted
        assert (dialled.k, link.k) == (3, 3)
        assert all(c is not None for c in link.conns)
        # An auto dialler to a loopback address uses one connection.
        assert waiter.connections_to("b", "127.0.0.1") == 1
        assert waiter.connections_to("b", "192.0.2.7") == UNKNOWN_LINK_CONNECTIONS
    finally:
        await dialler.close()
        await waiter.close()


def test_a_relink_doubles_a_window_bound_stripe_and_otherwise_follows_the_measured_bdp() -> None:
    # Four streams that each kept a full window in flight: the windows were the limit.
    busy = LinkFigures(4 * WINDOW * 8 / 0.1, 0.1)
    assert connections_after(busy, 4, WINDOW) == 8
    full16 = LinkFigures(16 * WINDOW * 8 / 0.1, 0.1)
    assert connections_after(full16, 16, WINDOW) == MAX_CONNECTIONS
    # A link that carried far less than its windows hold: sized by what it carried.
    assert connections_after(LinkFigures(GBIT, 0.001), 4, WINDOW) == 1
    assert connections_after(LinkFigures(GBIT, 0.1), 8, WINDOW) == 3


# -- with the slowest pair's figure: star, direct or ring ------------------------
WAN3 = LinkCosts(max_rtt_s=0.1, bottleneck_bps=GBIT, min_pair_bps=GBIT)
LOOPBACK3 = LinkCosts(max_rtt_s=50e-6, bottleneck_bps=20 * GBIT, min_pair_bps=20 * GBIT)


def test_without_a_slowest_pair_figure_the_direct_schedule_is_not_modelled() -> None:
    assert direct_seconds(WAN, 4, 1 << 20) is None
    for nbytes in (4 << 10, 1 << 20, 64 << 20):
        assert best_algorithm(WAN, 4, nbytes) == (
            "star" if best_algorithm(WAN, 4, nbytes) == "star" else "ring"
        )


def test_on_a_100ms_wan_the_direct_schedule_takes_what_the_ring_cannot_stream() -> None:
    assert best_algorithm(WAN3, 4, 4 << 10) == "star"
    assert best_algorithm(WAN3, 4, 1 << 20) == "direct"
    # 16 MiB on the wire (64 MiB in uint8): a ring step's 4 MiB outlasts no hop,
    # so the ring is its chain of 6 hops (0.31 s); direct streams (0.25 s).
    assert best_algorithm(WAN3, 4, 16 << 20) == "direct"
    # 64 MiB: a step's 16 MiB outlasts a hop, both stream the same bytes (0.86 s).
    assert best_algorithm(WAN3, 4, 64 << 20) == "ring"
    assert ring_seconds(WAN3, 4, 64 << 20) == pytest.approx(0.855, abs=0.01)


def test_on_loopback_big_tensors_keep_the_ring() -> None:
    # Two hops fewer save microseconds: less than the margin.
    assert best_algorithm(LOOPBACK3, 4, 64 << 20) == "ring"
    assert best_algorithm(LOOPBACK3, 4, 4 << 10) == "star"


def test_one_slow_pair_sends_the_direct_schedule_back_to_the_ring() -> None:
    skewed = LinkCosts(max_rtt_s=0.1, bottleneck_bps=GBIT, min_pair_bps=GBIT / 4)
    assert best_algorithm(skewed, 4, 64 << 20) == "ring"


def test_costs_travel_with_and_without_the_slowest_pair() -> None:
    assert LinkCosts.from_wire(WAN.to_wire()) == WAN
    assert LinkCosts.from_wire(WAN3.to_wire()) == WAN3
    with pytest.raises(ProtocolError):
        LinkCosts.from_wire([0.1, GBIT, -1.0])
    with pytest.raises(ProtocolError):
        LinkCosts.from_wire([0.1, GBIT, 1.0, 2.0])


@given(
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=1e6, max_value=1e11),
    st.floats(min_value=0.01, max_value=1.0),
    st.integers(min_value=2, max_value=64),
    st.integers(min_value=1, max_value=1 << 32),
)
def test_the_choice_is_never_slower_in_the_model_than_the_star_or_the_ring(
    rtt: float, bps: float, pair_share: float, world: int, nbytes: int
) -> None:
    costs = LinkCosts(rtt, bps, bps * pair_share)
    times = {
        "star": star_seconds(costs, world, nbytes),
        "ring": ring_seconds(costs, world, nbytes),
        "direct": direct_seconds(costs, world, nbytes),
    }
    choice = best_algorithm(costs, world, nbytes)
    chosen = times[choice]
    assert chosen is not None
    star = times["star"]
    assert star is not None
    assert chosen <= star
    ring = times["ring"]
    assert ring is not None
    if world > 2:
        assert chosen <= ring
    if choice == "direct" and world > 2:
        assert chosen <= (1 - DIRECT_MARGIN) * ring


def test_a_chain_bound_ring_still_streams_the_rest_of_its_last_step() -> None:
    # 64 MiB in uint8 (16 MiB on the wire, 256 KiB chunks) at 100 ms: the ring's
    # chain of 6 hops, then 4 MiB less a chunk behind it (WAN lab: 0.38 s).
    wire, chunk = 16 << 20, 256 << 10
    chain = 6 * (0.05 + HOP_OVERHEAD_S + chunk * 8 / GBIT) + ((4 << 20) - chunk) * 8 / GBIT
    assert ring_seconds(WAN3, 4, wire, chunk) == pytest.approx(chain)
    # So direct (0.30 s) wins even where the slowest pair read 20 % under the ring's.
    assert best_algorithm(LinkCosts(0.1, GBIT, 0.8 * GBIT), 4, wire, chunk) == "direct"
