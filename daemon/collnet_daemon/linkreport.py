"""Link estimates of this daemon, kept fresh and sent to the coordinator.

Every ``link_report_s`` the reporter looks at the data links that are up:

- a link seen for the first time gets a few extra heartbeat pings at once
  (its RTT, ``collnet.topology.rtt.MinRtt``, is then known in one round trip
  rather than one heartbeat interval), and a bandwidth probe burst when the
  policy allows it (``collnet.topology.probe.BurstPolicy``: only while this
  daemon is quiet, BDP-sized, behind an untimed warm-up on a long path, at
  most one per link a minute, and after the first only when no large
  traffic has refreshed the far end's estimate (a direct or star all-reduce's
  does not: ``PeerLink.timed_bytes_sent``); in rounds on the wall
  clock, each daemon to its next peer id, then the one after, so that the
  bursts of one round land on different peers: ``round_target``). The far end times the
  burst with the meter it uses for collective traffic, so probes and real
  transfers feed one estimate.
  Quiet means no collective running now nor started for ``QUIET_TICKS``
  intervals: a burst (up to 64 MiB on a long path) in the short gaps of a
  loop of collectives would delay the next one, while a training run's
  minutes between all-reduces leave room for it;
- then one ``LinkReport`` goes to the coordinator: for each peer the
  bandwidth of what this daemon received from it (bits/s) and that
  figure's age, and the RTT. The answer carries the coordinator's verdict
  on this daemon's advertised data port; an unreachable one is logged as an
  error (once per change), since the peers will fail to link to it.

Failure model: a report that cannot be sent (no coordinator, not
registered) is skipped; the next one carries fresh figures anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from collnet.errors import CollnetError
from collnet.topology.matrix import LinkSample
from collnet.topology.probe import BurstPolicy, ProbeState
from collnet.transport.link import PeerLink
from collnet.transport.mesh import Mesh
from collnet.wire.topology import MAX_REPORT_LINKS, LinkAck, LinkReport
from collnet_daemon.control import ControlPlane
from collnet_daemon.tasks import TaskSet

log = logging.getLogger(__name__)

# Extra pings on a new link: a first RTT within one round trip.
FIRST_PINGS = 3
# Intervals without a collective before a bandwidth probe may go out.
QUIET_TICKS = 2
# Ticks per probe round (see LinkReporter.round_target).
PROBE_ROUND_TICKS = 2


class LinkReporter:
    """See the module docstring."""

    def __init__(
        self,
        peer_id: str,
        interval_s: float,
        mesh: Mesh,
        control: ControlPlane,
        busy: Callable[[], bool],
        policy: BurstPolicy | None = None,
        activity: Callable[[], int] | None = None,
    ) -> None:
        self.id = peer_id
        self.interval_s = interval_s
        self.mesh = mesh
        self.control = control
        self.busy = busy
        self.policy = policy or BurstPolicy()
        # Collectives started so far (None: only ``busy`` tells), and since when
        # the daemon has been quiet.
        self.activity = activity
        self._seen_activity = -1
        self._quiet_since: float | None = None
        # Per peer: the link object last seen and what the prober remembers of it.
        self._probes: dict[str, tuple[PeerLink, ProbeState]] = {}
        self._verdict = LinkAck()
        self._tasks = TaskSet(lambda exc: log.warning("link report failed: %r", exc))

    def start(self) -> None:
        self._tasks.spawn(self._run())

    def close(self) -> None:
        self._tasks.cancel()

    async def _run(self) -> None:
        while True:
            # Ticks fall on the wall clock's multiples of the interval, so every
            # daemon's fall together (as far as their clocks agree): probe rounds.
            await asyncio.sleep(self.interval_s - time.time() % self.interval_s)
            now = time.monotonic()
            self.probe(now, self.round_target(time.time()))
            try:
                ack = await self.control.report_links(self.report(now), self.interval_s * 2)
            except (CollnetError, TimeoutError) as exc:
                log.debug("daemon %s: link report not sent: %s", self.id, exc)
                continue
            self._heard(ack)

    def _ready(self) -> dict[str, PeerLink]:
        return {
            peer: link
            for peer, link in self.mesh.links.items()
            if link.ready.is_set() and not link.failed
        }

    def round_target(self, wall_s: float) -> str | None:
        """The one peer this daemon may send a burst to at a tick at ``wall_s``
        (None: none at this tick).

        Probe rounds last ``PROBE_ROUND_TICKS`` ticks of the wall clock; a burst
        may start only at a round's first tick, and in round ``r`` only to the
        ``r``-th peer (modulo their number) of this daemon's rotation of the
        world it knows (``_rotation``). Every daemon counts the same rounds, so
        in each round the bursts go to distinct peers and each has the round to
        finish before the next round's start (a warm-up and its burst took
        about 1.2 s at 100 ms in the WAN lab, 2.4 s at 200 ms)."""
        tick = round(wall_s / self.interval_s)
        rnd, at = divmod(tick, PROBE_ROUND_TICKS)
        order = self._rotation(self.mesh.links)
        return order[rnd % len(order)] if at == 0 and order else None

    def probe(self, now_s: float, target: str | None = None) -> None:
        """Pings for new links, and a bandwidth burst where the policy allows one:
        to ``target`` alone (None: to none)."""
        links = self._ready()
        for peer in [p for p in self._probes if p not in links]:
            del self._probes[peer]
        busy = not self._quiet(now_s)
        for peer in self._rotation(links):
            link = links[peer]
            seen = self._probes.get(peer)
            if seen is None or seen[0] is not link:
                seen = self._probes[peer] = (link, ProbeState(sent_bytes=link.timed_bytes_sent()))
                for _ in range(FIRST_PINGS):
                    link.heartbeat.probe()
            state = seen[1]
            state.saw_sent(link.timed_bytes_sent(), now_s)
            received_bps = link.rx_meter.bytes_per_s
            # What it received tells the likely rate of what it sends.
            bps = None if received_bps is None else received_bps * 8
            rtt_s = link.rtt.value(now_s)
            nbytes = self.policy.burst_bytes(state, now_s, busy or peer != target, bps, rtt_s)
            if nbytes:
                try:
                    link.send_probe(nbytes, self.policy.warm_bytes(bps, rtt_s))
                except CollnetError:
                    continue
                log.debug("daemon %s: probing the link to %s with %d bytes", self.id, peer, nbytes)
                state.burst_s = now_s
                state.sent_bytes = link.timed_bytes_sent()
                busy = True  # one burst at a time: the next link waits for the next tick

    def _rotation(self, peers: dict[str, PeerLink]) -> list[str]:
        """``peers`` in the order this daemon probes them: the ids sorted, starting
        after its own. Every daemon goes the same way round, so the first burst of
        each goes to the next id, the second to the one after, and so on: no two
        bursts of one round share a receiver (in a round where all sent their first,
        the world's first bursts would otherwise all land on the same peer, which
        would read a share of its link)."""
        order = sorted([*peers, self.id])
        at = order.index(self.id)
        return order[at + 1 :] + order[:at]

    def _quiet(self, now_s: float) -> bool:
        """No collective now, and (with ``activity``) none started for ``QUIET_TICKS``
        intervals."""
        if self.busy():
            self._quiet_since = None
            return False
        if self.activity is None:
            return True
        count = self.activity()
        if count != self._seen_activity or self._quiet_since is None:
            self._seen_activity = count
            self._quiet_since = now_s
        return now_s - self._quiet_since >= QUIET_TICKS * self.interval_s

    def report(self, now_s: float) -> LinkReport:
        samples = []
        for peer, link in sorted(self._ready().items())[:MAX_REPORT_LINKS]:
            meter = link.rx_meter
            bps = None if meter.bytes_per_s is None else meter.bytes_per_s * 8
            age_s = 0.0 if meter.sampled_s is None else max(0.0, now_s - meter.sampled_s)
            samples.append(LinkSample(peer, bps, round(age_s, 3), link.rtt.value(now_s)))
        return LinkReport(tuple(samples))

    def _heard(self, ack: LinkAck) -> None:
        before, self._verdict = self._verdict, ack
        if ack.reachable is False and (before.reachable is not False or before.error != ack.error):
            log.error(
                "daemon %s: the coordinator cannot reach this daemon's advertised data port: "
                "%s; other peers will fail to link to it (check --advertise-host and "
                "--advertise-port, firewalls and NAT port mappings)",
                self.id,
                ack.error,
            )
        elif ack.reachable and before.reachable is False:
            log.info("daemon %s: the coordinator reaches this daemon's data port now", self.id)

    @property
    def reachable(self) -> bool | None:
        """The coordinator's last verdict on this daemon's data port (None: none yet)."""
        return self._verdict.reachable
