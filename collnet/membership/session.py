"""A node's session: the trainers that joined the world through one daemon (sans-I/O).

A daemon outlives its trainers. It is a member of the world on their behalf;
once they are gone nobody would make its next collective or barrier call, so
a daemon that stayed a member would hold every other peer until its
deadline, and a trainer started again would count its default tags from 1
where the others are far ahead. So the session ends, and the daemon leaves
the active world, as soon as the node can no longer take part. Invariants:

- a trainer is a client that joined: it called ``update_topology`` or took
  part in a local group (``local_size > 1``). A client that only says hello,
  looks at the world or benchmarks never counts, so probes and health checks
  change nothing;
- the session ends when its last trainer is gone, or when any trainer of a
  local group is gone: the node's groups cannot complete without it;
- it ends once (later departures change nothing) and opens again only when
  the daemon has registered anew on behalf of a trainer that joined; the
  joiner and the survivors then meet in a new epoch (the admission bumps
  it), where default tags count from 1 for everyone.
"""

from __future__ import annotations


class Roster:
    """Who the node's trainers are, and whether its session is open.

    The daemon starts with an open session (it registers as pending at
    start-up) and no trainers.
    """

    def __init__(self) -> None:
        # identity -> the local_size it declared (1: not in a local group)
        self.trainers: dict[bytes, int] = {}
        self.open = True

    def joined(self, trainer: bytes, local_size: int = 1) -> None:
        """``trainer`` joined (or made another call that counts it as one)."""
        self.trainers[trainer] = max(local_size, self.trainers.get(trainer, 1))

    def knows(self, trainer: bytes) -> bool:
        return trainer in self.trainers

    def gone(self, trainer: bytes) -> bool:
        """A client disconnected; True if that ends the session now."""
        local_size = self.trainers.pop(trainer, None)
        if local_size is None or not self.open:
            return False
        if self.trainers and local_size == 1:
            return False
        self.open = False
        return True

    def opened(self) -> None:
        """The daemon registered again for a trainer that joined."""
        self.open = True
