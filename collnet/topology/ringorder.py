"""The ring order that maximises the bottleneck bandwidth (sans-I/O).

A ring all-reduce moves at the pace of its slowest directed hop: rank i sends
to rank (i + 1) % n, so an order's worth is the minimum, over consecutive
pairs, of the bandwidth from one to the next. ``plan_ring`` picks the order
with the largest such bottleneck, breaking ties by the smallest sum of
inverse bandwidths (the ring's total serialisation time) and then by the
smallest total round-trip time. Both are properties of the directed matrix:
links may be asymmetric (two data centres joined by one slow link).

Invariants:

- the result is a permutation of ``members`` whose first element is
  ``members[0]`` (a ring has no start; fixing one keeps plans comparable
  and makes equal inputs give equal outputs);
- it is a pure function of its inputs: the same members and figures give
  the same order on every call, so whoever plans (the coordinator) and
  whoever checks get one answer;
- an unknown figure (``None``) is treated as the worst known one would be
  if nothing better is known: ``UNKNOWN_BPS``, never as infinitely fast, so
  an unmeasured link is not preferred over a measured one;
- small worlds (up to ``EXACT_MAX`` peers) are solved exactly: a search
  over orders with pruning by the bound found so far (bottleneck first,
  then the inverse-bandwidth sum), which is brute force in the worst case;
  larger worlds get a heuristic bounded by ``budget_s`` of work: a greedy
  ring (each step to the fastest unvisited peer) from every start, then
  2-opt-style segment reversals and single-peer moves (or-opt) while they
  improve and time remains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from collnet.topology.costmodel import LinkCosts

# A figure reported for a pair, or None when that pair has no estimate.
LinkFigure = Callable[[str, str], float | None]

# Worlds up to this size are solved exactly.
EXACT_MAX = 9
# Stands for a link with no bandwidth estimate: worse than any real link.
UNKNOWN_BPS = 0.0
# Beyond this the coordinator keeps the order it has: planning reads n^2
# figures and runs for its whole budget at every barrier.
MAX_PLANNED_PEERS = 256


@dataclass(frozen=True, slots=True)
class RingScore:
    """What an order is worth: larger ``bottleneck_bps`` first, then smaller
    ``inverse_sum`` (seconds per byte around the ring), then smaller ``rtt_s``."""

    bottleneck_bps: float
    inverse_sum: float
    rtt_s: float

    def key(self) -> tuple[float, float, float]:
        """Sort key: smaller is better."""
        return (-self.bottleneck_bps, self.inverse_sum, self.rtt_s)

    def beats(self, other: RingScore, margin: float = 0.0) -> bool:
        """Whether this bottleneck exceeds ``other``'s by more than ``margin``
        (a fraction): the hysteresis a re-plan must clear."""
        return self.bottleneck_bps > other.bottleneck_bps * (1.0 + margin)


class _Matrix:
    """Dense figures by index, looked up once (callables may be slow)."""

    def __init__(self, members: Sequence[str], bandwidth: LinkFigure, rtt: LinkFigure | None):
        n = len(members)
        self.n = n
        self.bw = [[UNKNOWN_BPS] * n for _ in range(n)]
        self.inv = [[math.inf] * n for _ in range(n)]
        self.rtt = [[0.0] * n for _ in range(n)]
        for i, a in enumerate(members):
            for j, b in enumerate(members):
                if i == j:
                    continue
                bps = bandwidth(a, b)
                if bps is not None and math.isfinite(bps) and bps > 0:
                    self.bw[i][j] = float(bps)
                    self.inv[i][j] = 1.0 / bps
                # An unknown inverse stays inf: any known link beats it.
                r = rtt(a, b) if rtt is not None else None
                if r is not None and math.isfinite(r) and r >= 0:
                    self.rtt[i][j] = float(r)

    def score(self, order: Sequence[int]) -> RingScore:
        n = len(order)
        if n < 2:
            return RingScore(math.inf, 0.0, 0.0)
        pairs = [(order[k], order[(k + 1) % n]) for k in range(n)]
        return RingScore(
            min(self.bw[a][b] for a, b in pairs),
            sum(self.inv[a][b] for a, b in pairs),
            sum(self.rtt[a][b] for a, b in pairs),
        )


def score_ring(
    order: Sequence[str], bandwidth: LinkFigure, rtt: LinkFigure | None = None
) -> RingScore:
    """The worth of ring ``order`` as it stands."""
    return _Matrix(order, bandwidth, rtt).score(range(len(order)))


def plan_ring(
    members: Sequence[str],
    bandwidth: LinkFigure,
    rtt: LinkFigure | None = None,
    budget_s: float = 0.5,
) -> list[str]:
    """The best ring order of ``members`` (see the module docstring)."""
    if len(set(members)) != len(members):
        raise ValueError("members must be distinct")
    if len(members) < 3:
        return list(members)  # one ring (three peers already have two directed ones)
    m = _Matrix(members, bandwidth, rtt)
    best = _exact(m) if len(members) <= EXACT_MAX else _heuristic(m, time.monotonic() + budget_s)
    return [members[i] for i in best]


def _exact(m: _Matrix) -> list[int]:
    """Depth-first search over orders starting at 0, pruned by the best so far.

    A partial path's bottleneck only falls and its inverse sum only grows as
    it extends, so a path already worse on (bottleneck, inverse sum) than the
    best complete ring cannot lead to a better one. Rtt is the last tie-break
    and is compared only on complete rings.
    """
    n = m.n
    best_order = list(range(n))
    best = m.score(best_order).key()
    path = [0]
    used = [False] * n
    used[0] = True

    def extend(bottleneck: float, inv: float, rtt_s: float) -> None:
        nonlocal best, best_order
        last = path[-1]
        if len(path) == n:
            closing = (
                min(bottleneck, m.bw[last][0]),
                inv + m.inv[last][0],
                rtt_s + m.rtt[last][0],
            )
            key = (-closing[0], closing[1], closing[2])
            if key < best:
                best, best_order = key, list(path)
            return
        for nxt in range(1, n):
            if used[nxt]:
                continue
            b = min(bottleneck, m.bw[last][nxt])
            v = inv + m.inv[last][nxt]
            # Prune: strictly worse already, or equal bottleneck and no better sum.
            if (-b, v) > best[:2]:
                continue
            used[nxt] = True
            path.append(nxt)
            extend(b, v, rtt_s + m.rtt[last][nxt])
            path.pop()
            used[nxt] = False

    extend(math.inf, 0.0, 0.0)
    return best_order


def _heuristic(m: _Matrix, deadline: float) -> list[int]:
    """Greedy rings from every start, then local moves until no gain or time."""
    n = m.n
    best_order = list(range(n))
    best = m.score(best_order).key()
    for start in range(n):
        if time.monotonic() > deadline:
            break
        order = _greedy(m, start)
        key = m.score(order).key()
        if key < best:
            best, best_order = key, order
    improved = True
    while improved and time.monotonic() <= deadline:
        improved = False
        for cand in _neighbours(best_order):
            if time.monotonic() > deadline:
                break
            key = m.score(cand).key()
            if key < best:
                best, best_order, improved = key, cand, True
                break
    # Rotate so member 0 leads, as the exact search does.
    at = best_order.index(0)
    return best_order[at:] + best_order[:at]


def _greedy(m: _Matrix, start: int) -> list[int]:
    order = [start]
    left = set(range(m.n)) - {start}
    while left:
        last = order[-1]
        nxt = max(left, key=lambda j: (m.bw[last][j], -j))
        order.append(nxt)
        left.discard(nxt)
    return order


def _neighbours(order: list[int]) -> Iterator[list[int]]:
    """Segment reversals (2-opt on a directed ring) and single-peer moves (or-opt),
    made one at a time: a large world has far more than a budget can score."""
    n = len(order)
    for i in range(1, n - 1):
        for j in range(i + 1, n):
            yield order[:i] + order[i : j + 1][::-1] + order[j + 1 :]
    for i in range(n):
        rest = order[:i] + order[i + 1 :]
        for j in range(n - 1):
            if j != i:
                yield [*rest[:j], order[i], *rest[j:]]


class RingPlanner:
    """When the coordinator re-orders its world, and to what.

    ``plan(current, members_changed)`` answers the order the next epoch should
    have, or ``None`` to keep ``current``. A change of members is a new epoch
    anyway, so it always takes the best order; the same members are re-ordered
    only when the best order's bottleneck beats the current one's by more than
    ``margin`` (noisy estimates must not reshuffle ranks every epoch), and
    only once every pair has a bandwidth figure. A world
    of more than ``MAX_PLANNED_PEERS`` keeps its order and publishes no figures.
    """

    def __init__(
        self,
        bandwidth: LinkFigure,
        rtt: LinkFigure | None = None,
        margin: float = 0.1,
        budget_s: float = 0.5,
        costs_tolerance: float = 0.5,
    ) -> None:
        self.bandwidth = bandwidth
        self.rtt = rtt
        self.margin = margin
        self.budget_s = budget_s
        # Published figures are re-published when one moves by more than this.
        self.costs_tolerance = costs_tolerance

    def plan(self, current: Sequence[str], members_changed: bool) -> list[str] | None:
        if not 3 <= len(current) <= MAX_PLANNED_PEERS:
            return None
        if not members_changed and not self._complete(current):
            # Figures still arriving (a new link, a restarted coordinator): an
            # order that merely avoids the unmeasured pairs is no real gain.
            return None
        best = plan_ring(current, self.bandwidth, self.rtt, self.budget_s)
        if list(best) == list(current):
            return None
        if members_changed:
            return best
        now = score_ring(current, self.bandwidth, self.rtt)
        new = score_ring(best, self.bandwidth, self.rtt)
        return best if new.beats(now, self.margin) else None

    def _complete(self, members: Sequence[str]) -> bool:
        return all(self.bandwidth(a, b) is not None for a in members for b in members if a != b)

    def costs(self, order: Sequence[str]) -> LinkCosts | None:
        """The figures a world in ``order`` publishes for its epoch: the largest RTT
        between any two members, the ring's bottleneck and the slowest pair's
        bandwidth; None unless every pair
        has both figures (a partial guess must not steer every rank's choice)."""
        if not 2 <= len(order) <= MAX_PLANNED_PEERS or self.rtt is None:
            return None
        rtts = [self.rtt(a, b) for a in order for b in order if a != b]
        if any(r is None for r in rtts):
            return None
        m = _Matrix(order, self.bandwidth, self.rtt)
        if any(m.bw[i][j] <= UNKNOWN_BPS for i in range(m.n) for j in range(m.n) if i != j):
            return None
        slowest = min(m.bw[i][j] for i in range(m.n) for j in range(m.n) if i != j)
        costs = LinkCosts(
            max(r for r in rtts if r is not None), m.score(range(m.n)).bottleneck_bps, slowest
        )
        return costs if costs.valid() else None

    def costs_moved(self, held: LinkCosts | None, now: LinkCosts | None) -> bool:
        """Whether ``now`` differs from the ``held`` figures enough to publish."""
        if now is None:
            return False
        if held is None:
            return True
        rtt_floor = 1e-3  # below a millisecond every RTT is loopback to the model
        rtt_moved = abs(now.max_rtt_s - held.max_rtt_s) > self.costs_tolerance * max(
            held.max_rtt_s, rtt_floor
        )
        bps_moved = abs(now.bottleneck_bps - held.bottleneck_bps) > (
            self.costs_tolerance * held.bottleneck_bps
        )
        pair_moved = (held.min_pair_bps is None) != (now.min_pair_bps is None) or (
            held.min_pair_bps is not None
            and now.min_pair_bps is not None
            and abs(now.min_pair_bps - held.min_pair_bps) > self.costs_tolerance * held.min_pair_bps
        )
        return rtt_moved or bps_moved or pair_moved
