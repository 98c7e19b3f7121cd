"""Bytes per peer stay monotonic across link failures and replacements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from collnet_daemon.metrics import LinkTraffic


@dataclass(eq=False)
class FakeLink:
    peer: str
    sent: int = 0
    received: int = 0
    failed: bool = False

    def bytes_sent(self) -> int:
        return self.sent

    def bytes_received(self) -> int:
        return self.received


def test_a_link_that_dies_between_scrapes_still_counts_fully() -> None:
    traffic = LinkTraffic()
    first = FakeLink("b")
    traffic.track(cast(Any, first))
    first.sent, first.received = 100, 40
    traffic.update()
    assert (traffic.sent["b"], traffic.received["b"]) == (100, 40)

    first.sent, first.received = 250, 90
    first.failed = True  # its last bytes arrived before the next scrape
    second = FakeLink("b")  # the mesh made a new link to the same peer
    traffic.track(cast(Any, second))
    second.sent = 7
    traffic.update()
    assert (traffic.sent["b"], traffic.received["b"]) == (257, 90)

    second.sent = 10
    traffic.update()
    traffic.update()  # the failed link is forgotten, not counted twice
    assert (traffic.sent["b"], traffic.received["b"]) == (260, 90)


def test_a_link_made_and_failed_between_two_scrapes_is_counted() -> None:
    traffic = LinkTraffic()
    link = FakeLink("c", sent=5, received=3, failed=True)
    traffic.track(cast(Any, link))
    traffic.update()
    assert (traffic.sent["c"], traffic.received["c"]) == (5, 3)
