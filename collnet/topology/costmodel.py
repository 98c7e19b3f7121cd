"""Star or ring for ``auto``, and the ring's chunk, from agreed link figures (sans-I/O).

The figures are the world's, fixed for an epoch (``LinkCosts``: the largest
round-trip time among the members and the ring's bottleneck bandwidth), so
every rank evaluates the same model on the same numbers and picks the same
schedule; a rank's own fresher estimates never enter.

The model, for ``W`` ranks and ``n`` bytes, with ``h`` the one-way latency of a
hop (half the RTT plus ``HOP_OVERHEAD_S`` of software per message) and ``B``
the bottleneck bandwidth in bytes per second (figures are in bits, as
``collnet.topology.matrix``):

- star: two hops (in to the root, out from it); the root's link carries
  ``W - 1`` full tensors each way: ``2 h + 2 (W - 1) n / B``;
- ring: ``2 (W - 1)`` steps, each a hop of ``n / W`` bytes:
  ``2 (W - 1) (h + n / (W B))``.

The star wins on latency (2 hops against ``2 (W - 1)``), the ring on bytes.
With no figures, ``auto`` keeps its size rule (``collnet.algo.select``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from collnet.errors import ProtocolError

# Per message and hop: a frame through two event loops and a reduction.
HOP_OVERHEAD_S: Final = 100e-6
MIN_CHUNK_BYTES: Final = 1 << 20
MAX_CHUNK_BYTES: Final = 16 << 20
# Chunks of one step the ring keeps in flight on a link, for the chunk rule.
PIPELINE_DEPTH: Final = 4
# Beyond these a figure is not one of a real link.
MAX_RTT_S: Final = 600.0
MAX_BPS: Final = 1e13


@dataclass(frozen=True, slots=True)
class LinkCosts:
    """Agreed figures of one epoch's world: its worst RTT and its ring's bottleneck."""

    max_rtt_s: float
    bottleneck_bps: float

    def valid(self) -> bool:
        return (
            math.isfinite(self.max_rtt_s)
            and 0 <= self.max_rtt_s <= MAX_RTT_S
            and math.isfinite(self.bottleneck_bps)
            and 0 < self.bottleneck_bps <= MAX_BPS
        )

    def to_wire(self) -> list[float]:
        return [self.max_rtt_s, self.bottleneck_bps]

    @staticmethod
    def from_wire(obj: Any) -> LinkCosts | None:
        """``[max_rtt_s, bottleneck_bps]`` or nil, within bounds (``ProtocolError``)."""
        if obj is None:
            return None
        if (
            not isinstance(obj, list)
            or len(obj) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in obj)
        ):
            raise ProtocolError(f"bad link costs {obj!r:.60}: expected [max_rtt_s, bottleneck_bps]")
        costs = LinkCosts(float(obj[0]), float(obj[1]))
        if not costs.valid():
            raise ProtocolError(f"link costs out of range: {obj!r:.60}")
        return costs


def star_seconds(costs: LinkCosts, world: int, nbytes: int) -> float:
    hop = costs.max_rtt_s / 2 + HOP_OVERHEAD_S
    return 2 * hop + 2 * (world - 1) * nbytes * 8 / costs.bottleneck_bps


def ring_seconds(costs: LinkCosts, world: int, nbytes: int) -> float:
    hop = costs.max_rtt_s / 2 + HOP_OVERHEAD_S
    return 2 * (world - 1) * (hop + nbytes * 8 / world / costs.bottleneck_bps)


def prefer_star(costs: LinkCosts, world: int, nbytes: int) -> bool:
    """The model's choice for ``auto`` (ties go to the star: fewer messages)."""
    if world <= 2:
        return True  # a ring of two saves no bandwidth
    return star_seconds(costs, world, nbytes) <= ring_seconds(costs, world, nbytes)


def chunk_bytes_for(costs: LinkCosts, default: int) -> int:
    """A ring chunk that keeps a long fat bottleneck busy: with ``PIPELINE_DEPTH``
    chunks in flight a hop must cover its bandwidth-delay product, so the chunk
    grows to ``BDP / PIPELINE_DEPTH`` (a power of two within the bounds); never
    smaller than ``default``."""
    bdp = costs.bottleneck_bps / 8 * costs.max_rtt_s
    want = max(default, MIN_CHUNK_BYTES, int(bdp / PIPELINE_DEPTH))
    chunk = 1 << max(0, math.ceil(math.log2(want)))
    return max(default, min(MAX_CHUNK_BYTES, chunk))
