"""Star, direct or ring for ``auto``, from agreed link figures (sans-I/O).

No chunk rule: a chunk sized to a long link's bandwidth-delay product
(BDP / 4) was tried and is not applied. The link stripes every message into
pieces across its K connections, and their TCP windows, not the chunk, set
what is in flight: in the WAN lab (1 Gbit/s, 100 ms, 4 hosts) 4 MiB chunks
measured as 1 MiB ones (fp32 ring 0.924 against 0.923 of the link, uint8
1.97x against 2.01x; bench/RESULTS.md, 2026-12-03 12:10 UTC).

The figures are the world's, fixed for an epoch (``LinkCosts``: the largest
round-trip time among the members, the ring's bottleneck bandwidth and the
slowest pair's), so
every rank evaluates the same model on the same numbers and picks the same
schedule; a rank's own fresher estimates never enter.

The model, for ``W`` ranks and ``n`` bytes, with ``h`` the one-way latency of a
hop (half the RTT plus ``HOP_OVERHEAD_S`` of software per message) and ``B``
the bottleneck bandwidth in bytes per second (figures are in bits, as
``collnet.topology.matrix``):

- star: two hops (in to the root, out from it); the root's link carries
  ``W - 1`` full tensors each way and it handles ``2 (W - 1)`` messages of
  ``m`` (``MESSAGE_OVERHEAD_S``) each: ``2 h + 2 (W - 1) (m + n / B)``;
- ring: pipelined per chunk (``c`` bytes on the wire, at most ``n / W``), so
  it is bound either by the chain of one chunk through ``2 (W - 1)`` hops
  and the rest of the last step behind it,
  ``2 (W - 1) (h + c / B) + (n / W - c) / B``, or, when a step's ``n / W``
  bytes outlast a hop, by streaming its bytes and the last hop,
  ``2 (W - 1) n / (W B) + h``: the larger of the two (in the WAN lab, 64
  MiB in uint8 with 256 KiB chunks on the wire: 0.35 s modelled, 0.38 s
  measured; the chain alone said 0.31 s);
- direct: two hops, each rank sending ``n / W`` bytes to each of the other
  ``W - 1`` at once. A host's links to its peers usually share its access
  link, and the figures of a pair were measured with the pair alone, so the
  model charges the ring's bytes at the slowest pair's bandwidth ``P``;
  bound by the larger of its two-hop chain ``2 (h + c / P)`` and its stream
  ``2 (W - 1) n / (W P) + h``, and every rank handles ``4 (W - 1)``
  messages of ``m``.

The star and the direct schedule win on latency (2 hops against
``2 (W - 1)``), the ring and the direct schedule on bytes: where both stream
(big tensors) they tie, and the ring keeps the lead where one pair is much
slower than the links a planned ring uses. Ties
go to the star (fewer messages); the direct schedule must beat the ring by
``DIRECT_MARGIN``. ``n`` is what travels: a quantized tensor's encoded size.
With no
figures, ``auto`` keeps its size rule (``collnet.algo.select``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from collnet.errors import ProtocolError

# Per message and hop: a frame through two event loops and a reduction.
HOP_OVERHEAD_S: Final = 100e-6
# Per message a rank handles besides the hop's own: the star's root and every
# rank of the direct schedule handle 2 (W - 1) and 4 (W - 1) messages.
MESSAGE_OVERHEAD_S: Final = 50e-6
MIN_CHUNK_BYTES: Final = 1 << 20
# The direct schedule must beat the ring's modelled time by this share to be
# chosen: the model has no CPU term, and on a CPU-bound host (4 daemons on 2
# loopback cores, 64 MiB) it measured 5-10 % slower than the ring.
DIRECT_MARGIN: Final = 0.1
# Beyond these a figure is not one of a real link.
MAX_RTT_S: Final = 600.0
MAX_BPS: Final = 1e13


@dataclass(frozen=True, slots=True)
class LinkCosts:
    """Agreed figures of one epoch's world: its worst RTT, its ring's bottleneck
    and its slowest pair (None: not published, and the direct schedule is not
    modelled)."""

    max_rtt_s: float
    bottleneck_bps: float
    min_pair_bps: float | None = None

    def valid(self) -> bool:
        return (
            math.isfinite(self.max_rtt_s)
            and 0 <= self.max_rtt_s <= MAX_RTT_S
            and _valid_bps(self.bottleneck_bps)
            and (self.min_pair_bps is None or _valid_bps(self.min_pair_bps))
        )

    def to_wire(self) -> list[float]:
        out = [self.max_rtt_s, self.bottleneck_bps]
        return out if self.min_pair_bps is None else [*out, self.min_pair_bps]

    @staticmethod
    def from_wire(obj: Any) -> LinkCosts | None:
        """``[max_rtt_s, bottleneck_bps(, min_pair_bps)]`` or nil, within bounds
        (``ProtocolError``)."""
        if obj is None:
            return None
        if (
            not isinstance(obj, list)
            or len(obj) not in (2, 3)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in obj)
        ):
            raise ProtocolError(
                f"bad link costs {obj!r:.60}: expected [max_rtt_s, bottleneck_bps, min_pair_bps]"
            )
        costs = LinkCosts(float(obj[0]), float(obj[1]), float(obj[2]) if len(obj) == 3 else None)
        if not costs.valid():
            raise ProtocolError(f"link costs out of range: {obj!r:.60}")
        return costs


def _valid_bps(bps: float) -> bool:
    return math.isfinite(bps) and 0 < bps <= MAX_BPS


def star_seconds(costs: LinkCosts, world: int, nbytes: int) -> float:
    hop = costs.max_rtt_s / 2 + HOP_OVERHEAD_S
    messages = 2 * (world - 1) * MESSAGE_OVERHEAD_S
    return 2 * hop + messages + 2 * (world - 1) * nbytes * 8 / costs.bottleneck_bps


def ring_seconds(
    costs: LinkCosts, world: int, nbytes: int, chunk_bytes: int = MIN_CHUNK_BYTES
) -> float:
    hop = costs.max_rtt_s / 2 + HOP_OVERHEAD_S
    bps = costs.bottleneck_bps
    step = nbytes / world
    chunk = min(chunk_bytes, step)
    # The chain's last chunk leaves only after the rest of its step, which follow
    # the step's first through the last hop.
    chain = 2 * (world - 1) * (hop + chunk * 8 / bps) + (step - chunk) * 8 / bps
    stream = 2 * (world - 1) * step * 8 / bps + hop
    return max(chain, stream)


def direct_seconds(
    costs: LinkCosts, world: int, nbytes: int, chunk_bytes: int = MIN_CHUNK_BYTES
) -> float | None:
    """The direct schedule's time, or None without a slowest-pair figure."""
    if costs.min_pair_bps is None:
        return None
    hop = costs.max_rtt_s / 2 + HOP_OVERHEAD_S
    bps = costs.min_pair_bps
    messages = 4 * (world - 1) * MESSAGE_OVERHEAD_S
    chain = 2 * (hop + min(chunk_bytes, nbytes / world) * 8 / bps)
    stream = 2 * (world - 1) * nbytes * 8 / world / bps + hop
    return messages + max(chain, stream)


def best_algorithm(
    costs: LinkCosts, world: int, nbytes: int, chunk_bytes: int = MIN_CHUNK_BYTES
) -> str:
    """The model's choice for ``auto``: ``star``, ``direct`` or ``ring``, for
    ``nbytes`` on the wire (a quantized tensor's encoded size) in chunks of
    ``chunk_bytes`` on the wire."""
    star = star_seconds(costs, world, nbytes)
    direct = direct_seconds(costs, world, nbytes, chunk_bytes)
    if world <= 2:
        # A ring of two saves nothing; the direct schedule halves the star's bytes.
        return "direct" if direct is not None and direct < star else "star"
    ring = ring_seconds(costs, world, nbytes, chunk_bytes)
    if star <= ring and (direct is None or star <= direct):
        return "star"
    if direct is not None and direct <= (1 - DIRECT_MARGIN) * ring:
        return "direct"
    return "ring"
