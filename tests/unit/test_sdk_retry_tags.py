"""The SDK's retry and default tags, against a scripted daemon (no sockets).

After a ``PeerLost`` the world moves to a new epoch where default tags count
from 1 for every member, a trainer admitted there (a restarted one) included:
a retried collective with a default tag must be that epoch's next one, or it
would never pair with the newcomer's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from collnet_client.feedback import ErrorFeedback
from collnet_client.handles import AllReduces
from collnet_client.memory import SharedMemory
from collnet_client.world import Agreement, World

from collnet.errors import PeerLost
from collnet.membership.world import PeerInfo, WorldView
from collnet.wire.localapi import AllReduce, Request, UpdateTopology
from collnet.wire.localreplies import WorldReply


class ScriptedDaemon:
    """Fails the first all-reduce with PeerLost; ``update_topology`` moves the epoch."""

    def __init__(self) -> None:
        self.epoch = 1
        self.sent: list[Request] = []

    def _world(self) -> WorldView:
        return WorldView(self.epoch, (PeerInfo("a", "127.0.0.1", 1), PeerInfo("b", "h", 2)))

    def send(self, request: Request) -> int:
        self.sent.append(request)
        return len(self.sent)

    def wait(self, rid: int, timeout_s: float | None = None) -> dict[str, Any]:
        request = self.sent[rid - 1]
        if isinstance(request, UpdateTopology):
            self.epoch += 1  # a trainer was admitted
            return WorldReply(self._world()).to_wire()
        if rid == 1:
            raise PeerLost("peer c lost", peer="c", epoch=request.epoch)
        return {}

    def call(self, request: Request, timeout_s: float | None = None) -> dict[str, Any]:
        return self.wait(self.send(request), timeout_s)

    def poll(self, rid: int) -> bool:
        return True


def test_a_retried_default_tag_collective_is_the_next_one_of_the_new_epoch() -> None:
    daemon = ScriptedDaemon()
    agreement = Agreement(daemon, World(1, ("a", "b"), ()), 1)  # type: ignore[arg-type]
    memory = SharedMemory()
    try:
        reduces = AllReduces(daemon, memory, agreement, ErrorFeedback(256), 1)  # type: ignore[arg-type]
        for _ in range(6):  # this trainer is at default tag 7 of epoch 1
            agreement.next_tag()
        handle = reduces.start(
            np.ones(8, np.float32), "sum", "none", "auto", None, None,
            retry=1, error_feedback=False, feedback_key=None,
        )  # fmt: skip
        handle.wait()
        runs = [r for r in daemon.sent if isinstance(r, AllReduce)]
        assert [(r.epoch, r.tag) for r in runs] == [(1, 7), (2, 1)]
        # ... and the trainer's next default-tag collective is tag 2 of epoch 2.
        assert agreement.next_tag() == 2
    finally:
        memory.close()


def test_a_retried_collective_with_its_own_tag_keeps_it() -> None:
    daemon = ScriptedDaemon()
    agreement = Agreement(daemon, World(1, ("a", "b"), ()), 1)  # type: ignore[arg-type]
    memory = SharedMemory()
    try:
        reduces = AllReduces(daemon, memory, agreement, ErrorFeedback(256), 1)  # type: ignore[arg-type]
        handle = reduces.start(
            np.ones(8, np.float32), "sum", "none", "auto", "step-9", None,
            retry=1, error_feedback=False, feedback_key=None,
        )  # fmt: skip
        handle.wait()
        runs = [r for r in daemon.sent if isinstance(r, AllReduce)]
        assert [(r.epoch, r.tag) for r in runs] == [(1, "step-9"), (2, "step-9")]
    finally:
        memory.close()


def test_a_retry_under_a_new_default_tag_says_which_tag_it_first_ran_under() -> None:
    daemon = ScriptedDaemon()
    agreement = Agreement(daemon, World(1, ("a", "b"), ()), 1)  # type: ignore[arg-type]
    memory = SharedMemory()
    try:
        reduces = AllReduces(daemon, memory, agreement, ErrorFeedback(256), 1)  # type: ignore[arg-type]
        for _ in range(4):
            agreement.next_tag()
        handle = reduces.start(
            np.ones(8, np.float32), "sum", "none", "auto", None, None,
            retry=1, error_feedback=False, feedback_key=None,
        )  # fmt: skip
        handle.wait()
        first, retried = [r for r in daemon.sent if isinstance(r, AllReduce)]
        assert first.retry_of is None
        # A fresh collective of a restarted trainer (retry_of None) or the next step
        # of a peer (another retry_of) has another digest: MismatchError, not a mix.
        assert (retried.tag, retried.retry_of) == (1, 5)
        assert AllReduce.from_wire(retried.to_wire()) == retried
    finally:
        memory.close()
