"""The tc commands that shape a lab's links (htb, both directions of every link).

Pure: returns argv lists, so what gets shaped can be read and tested without
root. Each host link gets one htb tree on each end:

* on the host's ``eth0`` (what it sends): the default leaf at the host's
  ``up`` rate, plus a leaf per destination that has its own pair rate,
  selected by a u32 match on the destination address;
* on the router's ``h<i>`` (what host i receives): the default leaf at its
  ``down`` rate, plus a leaf per source with a pair rate, matched on the
  source address.

Every leaf queues into a bfifo holding ``QUEUE_S`` of its rate (at least 8
packets), the buffer of a WAN router rather than veth's 1000 packets of 64 KB.
"""

from __future__ import annotations

from wanlab.spec import LabSpec

QUEUE_S = 0.05
# Stands for "unshaped" where an htb class needs a rate (a pair with its own
# rate on an otherwise unshaped link).
UNSHAPED_BIT = 100 * 10**9


def _leaf(ns: str, dev: str, classid: int, rate: int, mtu: int) -> list[list[str]]:
    burst = max(2 * mtu, rate // 8 // 500)  # >= 2 ms at the rate: htb's timer needs slack
    quantum = min(200_000, 2 * mtu)
    limit = max(8 * mtu, int(rate / 8 * QUEUE_S))
    tc = ["tc", "-n", ns]
    return [
        [*tc, "class", "add", "dev", dev, "parent", "1:1", "classid", f"1:{classid}", "htb",
         "rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", str(burst), "cburst", str(burst),
         "quantum", str(quantum)],
        [*tc, "qdisc", "add", "dev", dev, "parent", f"1:{classid}", "handle", f"{classid}:",
         "bfifo", "limit", str(limit)],
    ]  # fmt: skip


def _tree(
    ns: str, dev: str, default: int | None, pairs: dict[str, int], match: str, mtu: int
) -> list[list[str]]:
    """htb on ``dev``: ``pairs`` maps a peer address to its own rate."""
    if default is None and not pairs:
        return []
    base = default if default is not None else UNSHAPED_BIT
    top = max([base, *pairs.values()])
    tc = ["tc", "-n", ns]
    burst = str(max(2 * mtu, top // 8 // 500))
    cmds = [
        [*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "2"],
        [*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
         "rate", f"{top}bit", "ceil", f"{top}bit", "burst", burst, "cburst", burst],
    ]  # fmt: skip
    cmds += _leaf(ns, dev, 2, base, mtu)
    for k, (addr, rate) in enumerate(sorted(pairs.items())):
        cid = 10 + k
        cmds += _leaf(ns, dev, cid, rate, mtu)
        cmds.append(
            [*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
             "u32", "match", "ip", match, f"{addr}/32", "flowid", f"1:{cid}"]
        )  # fmt: skip
    return cmds


def shaping_commands(spec: LabSpec) -> list[list[str]]:
    cmds: list[list[str]] = []
    for h in range(spec.hosts):
        others = [o for o in range(spec.hosts) if o != h]
        sends = {spec.addr(o): r for o in others if (r := spec.path(h, o).rate_bit) is not None}
        gets = {spec.addr(o): r for o in others if (r := spec.path(o, h).rate_bit) is not None}
        cmds += _tree(spec.host_ns(h), "eth0", spec.up_rate(h), sends, "dst", spec.mtu)
        cmds += _tree(spec.router_ns, f"h{h}", spec.down_rate(h), gets, "src", spec.mtu)
    return cmds
