"""Prometheus metrics of the daemon and the coordinator.

Every metric object lives here, in a registry per ``DaemonMetrics`` /
``CoordinatorMetrics`` (not prometheus_client's global one), so several
daemons in one process (tests) keep apart. Metric names and labels are
listed in docs/operations.md.

Nothing here runs on the data path. Bytes per peer come from the byte
counters every ``FrameConnection`` keeps anyway and are read at scrape time;
a link is tracked from the moment the mesh makes it until it has failed and
its final counts are taken, so a link that dies between two scrapes still
counts fully. A peer's series last while it is a member of the world (active
or pending) or has a live link: ids a stranger claims leave nothing behind,
and a member that left stops being listed. RTT and bandwidth are the
heartbeat's smoothed RTT and the link's ``ThroughputMeter``. Requests are
observed by wrapping the IPC handler: one histogram observation and a few
counter increments per request, with the labelled children cached.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from collnet.codec.registry import CODEC_NAMES, LZ4_SUFFIX
from collnet.errors import CollnetError
from collnet.membership.world import WorldView
from collnet.transport.link import PeerLink
from collnet_daemon.coordinator import coordinator_status
from collnet_daemon.exporter import MetricsServer
from collnet_daemon.progress import Progress

if TYPE_CHECKING:
    from collnet_daemon.coordinator import CoordinatorService

log = logging.getLogger(__name__)

Handler = Callable[[bytes, dict[str, Any]], Awaitable[dict[str, Any]]]

# From a star over loopback (~100 us) to a multi-GB ring over a slow WAN link.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

# All-reduces at least this large log their start, progress and rate.
PROGRESS_BYTES = 256 << 20

# Request names come from clients: past this many distinct ones, "other".
MAX_OP_LABELS = 32

# Peers gone from the world and from every link whose series wait for a scrape.
MAX_RETIRED_SERIES = 256


class LinkTraffic:
    """Bytes sent to and received from each peer, summed over every link it ever had.

    A peer that is neither a member (``members``) nor on a live link is shown
    at one more scrape, with its final counts, and then forgotten; where nobody
    scrapes, at most ``MAX_RETIRED_SERIES`` such peers are kept."""

    def __init__(self, members: Callable[[], Collection[str]] = frozenset) -> None:
        self.members = members
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self._links: dict[PeerLink, tuple[int, int]] = {}
        # Peers shown at the last scrape with no live link and no membership.
        self._retired: set[str] = set()

    def track(self, link: PeerLink) -> None:
        self._fold()
        unkept = self._unkept()
        for peer in unkept[: max(0, len(unkept) - MAX_RETIRED_SERIES)]:
            self._forget(peer)
        self._links.setdefault(link, (0, 0))
        self.sent.setdefault(link.peer, 0)
        self.received.setdefault(link.peer, 0)

    def update(self) -> None:
        """At a scrape: take every link's counts, and forget the peers that were
        shown retired at the previous one."""
        self._fold()
        unkept = self._unkept()
        for peer in unkept:
            if peer in self._retired:
                self._forget(peer)
        self._retired = {peer for peer in unkept if peer in self.sent}

    def _fold(self) -> None:
        for link, (sent0, received0) in list(self._links.items()):
            sent, received = link.bytes_sent(), link.bytes_received()
            self.sent[link.peer] += sent - sent0
            self.received[link.peer] += received - received0
            if link.failed:
                # Its connections are closed: these counts are final.
                del self._links[link]
            else:
                self._links[link] = (sent, received)

    def _unkept(self) -> list[str]:
        """Peers with no live link that are not members, oldest first."""
        keep = {link.peer for link in self._links}
        keep.update(self.members())
        return [peer for peer in self.sent if peer not in keep]

    def _forget(self, peer: str) -> None:
        del self.sent[peer], self.received[peer]
        self._retired.discard(peer)


def _op_label(seen: set[str], op: object) -> str:
    if not isinstance(op, str):
        return "invalid"
    if op in seen:
        return op
    if len(seen) >= MAX_OP_LABELS or not op.isidentifier() or len(op) > 40:
        return "other"
    seen.add(op)
    return op


def _codec_label(name: object) -> str:
    if not isinstance(name, str):
        return "invalid"
    base = name.removesuffix(LZ4_SUFFIX)
    return name if base in CODEC_NAMES else "invalid"


class _Exported:
    """A registry with the process's own metrics, and its HTTP endpoint once served."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.server: MetricsServer | None = None

    async def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` over HTTP on the running loop; the bound address."""
        self.server = MetricsServer(self.registry)
        return await self.server.start(host, port)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


@dataclass(frozen=True, slots=True)
class DaemonSnapshot:
    """What the daemon's metrics read of it at scrape time."""

    peer_id: str
    world: WorldView
    collectives_in_flight: int
    coordinator_connected: bool
    coordinator_rtt_s: float | None
    links: Mapping[str, PeerLink]


class DaemonMetrics(_Exported):
    """The metrics of one daemon: ``observed`` wraps its request handler,
    ``collective`` times its collectives, ``traffic.track`` counts a new link,
    and ``snapshot`` is read at every scrape."""

    def __init__(self, snapshot: Callable[[], DaemonSnapshot]) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.traffic = LinkTraffic(self._members)
        r = self.registry
        self.requests = Counter(
            "collnet_requests", "Requests from local clients, by op.", ["op"], registry=r
        )
        self.failures = Counter(
            "collnet_failures",
            "Requests that failed, by op and error kind (CollnetError.kind).",
            ["op", "kind"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "collnet_request_duration_seconds",
            "Time from a client's request to the reply, by op, failures included "
            "(update_topology: the wait at the barrier; sync_state: the whole sync).",
            ["op"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.collective_seconds = Histogram(
            "collnet_collective_duration_seconds",
            "Duration of successful collectives on this daemon, by algorithm and codec.",
            ["op", "algo", "codec"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.collective_bytes = Counter(
            "collnet_collective_bytes",
            "Tensor bytes of successful collectives, by algorithm and codec.",
            ["op", "algo", "codec"],
            registry=r,
        )
        r.register(_DaemonCollector(self))
        self._ops: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}

    def _members(self) -> set[str]:
        world = self.snapshot().world
        return {*world.ids, *world.pending}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observed(self, handler: Handler) -> Handler:
        """``handler`` counted: requests and failures by op, and their durations."""

        async def handle(ident: bytes, req: dict[str, Any]) -> dict[str, Any]:
            op = _op_label(self._ops, req.get("op"))
            self._child(self.requests, op).inc()
            started = time.perf_counter()
            try:
                return await handler(ident, req)
            except CollnetError as exc:
                self._child(self.failures, op, exc.kind).inc()
                raise
            except Exception:
                self._child(self.failures, op, "internal").inc()
                raise
            finally:
                elapsed_s = time.perf_counter() - started
                self._child(self.request_seconds, op).observe(elapsed_s)

        return handle

    @contextlib.contextmanager
    def collective(
        self, op: str, key: tuple[int, int | str], algo: str, codec: str, nbytes: int, peers: int
    ) -> Iterator[None]:
        """Times collective ``key`` (successes only); big ones log progress."""
        codec = _codec_label(codec)
        progress = None
        if nbytes >= PROGRESS_BYTES:
            what = f"{op} {key[1]!r} (epoch {key[0]}, {algo}, {codec}, {peers} peers)"
            progress = Progress(log, what, nbytes)
        started = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            if progress is not None:
                progress.failed(exc)
            raise
        self._child(self.collective_seconds, op, algo, codec).observe(time.perf_counter() - started)
        self._child(self.collective_bytes, op, algo, codec).inc(nbytes)
        if progress is not None:
            progress.done()


class _DaemonCollector:
    """Metrics read from the daemon's state at scrape time."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        daemon = self.metrics.snapshot()
        world = daemon.world
        yield _gauge("collnet_epoch", "Epoch of the world this daemon holds.", world.epoch)
        yield _gauge("collnet_world_size", "Active members of that world.", world.size)
        yield _gauge("collnet_pending_peers", "Peers waiting for admission.", len(world.pending))
        yield _gauge(
            "collnet_member",
            "1 when this daemon is an active member.",
            daemon.peer_id in world.ids,
        )
        yield _gauge(
            "collnet_collectives_in_flight",
            "Collectives running on this daemon.",
            daemon.collectives_in_flight,
        )
        coord_rtt = daemon.coordinator_rtt_s
        yield _gauge(
            "collnet_coordinator_connected",
            "1 while the control connection to the coordinator is up.",
            daemon.coordinator_connected,
        )
        if coord_rtt is not None:
            yield _gauge(
                "collnet_coordinator_rtt_seconds",
                "Smoothed heartbeat RTT to the coordinator.",
                coord_rtt,
            )

        traffic = self.metrics.traffic
        traffic.update()
        sent = CounterMetricFamily(
            "collnet_peer_sent_bytes",
            "Bytes sent to each peer (frames, all links).",
            labels=["peer"],
        )
        received = CounterMetricFamily(
            "collnet_peer_received_bytes",
            "Bytes received from each peer (frames, all links).",
            labels=["peer"],
        )
        for peer in sorted(traffic.sent):
            sent.add_metric([peer], traffic.sent[peer])
            received.add_metric([peer], traffic.received[peer])
        yield sent
        yield received

        up = GaugeMetricFamily("collnet_link_up", "1 for each ready data link.", labels=["peer"])
        rtt = GaugeMetricFamily(
            "collnet_link_rtt_seconds", "Smoothed heartbeat RTT of each data link.", labels=["peer"]
        )
        bandwidth = GaugeMetricFamily(
            "collnet_link_bandwidth_bytes_per_second",
            "Receive throughput of each link measured while large pieces flowed.",
            labels=["peer"],
        )
        for peer, link in sorted(daemon.links.items()):
            if link.failed or not link.ready.is_set():
                continue
            up.add_metric([peer], 1)
            if link.heartbeat.liveness.srtt_s is not None:
                rtt.add_metric([peer], link.heartbeat.liveness.srtt_s)
            if link.rx_meter.bytes_per_s is not None:
                bandwidth.add_metric([peer], link.rx_meter.bytes_per_s)
        yield up
        yield rtt
        yield bandwidth


class CoordinatorMetrics(_Exported):
    """The metrics of one ``CoordinatorService``, read from its state at scrape time."""

    def __init__(self, service: CoordinatorService) -> None:
        super().__init__()
        self.service = service
        self.registry.register(_CoordinatorCollector(service))


class _CoordinatorCollector:
    def __init__(self, service: CoordinatorService) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        status = coordinator_status(self.service)
        peers = status["peers"]
        yield _gauge("collnet_coordinator_epoch", "Epoch of the world.", status["epoch"])
        yield _gauge(
            "collnet_coordinator_world_size",
            "Active members.",
            sum(p["state"] != "pending" for p in peers),
        )
        yield _gauge(
            "collnet_coordinator_pending_peers",
            "Peers waiting for admission.",
            sum(p["state"] == "pending" for p in peers),
        )
        yield _gauge(
            "collnet_coordinator_control_connections",
            "Registered peers with an open control connection.",
            sum(bool(p["connected"]) for p in peers),
        )
        rtt = GaugeMetricFamily(
            "collnet_coordinator_peer_rtt_seconds",
            "Smoothed heartbeat RTT of each peer's control connection.",
            labels=["peer"],
        )
        for p in peers:
            if p.get("rtt_s") is not None:
                rtt.add_metric([p["id"]], p["rtt_s"])
        yield rtt


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))
