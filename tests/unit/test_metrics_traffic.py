"""Bytes per peer stay monotonic across link failures and replacements, and the
series of a peer gone from the world and its links are dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from collnet_daemon.metrics import MAX_RETIRED_SERIES, LinkTraffic


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


def test_a_stranger_is_shown_once_more_with_its_final_counts_then_forgotten() -> None:
    traffic = LinkTraffic(lambda: {"a"})
    stranger = FakeLink("intruder", sent=9, received=4)
    member = FakeLink("a", sent=1)
    traffic.track(cast(Any, stranger))
    traffic.track(cast(Any, member))
    stranger.failed = member.failed = True
    traffic.update()
    assert traffic.sent == {"intruder": 9, "a": 1}  # the scrape after the failure
    traffic.update()
    assert traffic.sent == {"a": 1} and traffic.received == {"a": 0}


def test_a_member_that_left_the_world_is_forgotten() -> None:
    members = {"a", "b"}
    traffic = LinkTraffic(lambda: members)
    link = FakeLink("b", sent=5)
    traffic.track(cast(Any, link))
    link.failed = True
    traffic.update()
    traffic.update()
    assert traffic.sent["b"] == 5  # still a member: its series stays
    members.discard("b")
    traffic.update()
    traffic.update()
    assert "b" not in traffic.sent


def test_claimed_ids_do_not_pile_up_where_nobody_scrapes() -> None:
    traffic = LinkTraffic(lambda: {"a"})
    for i in range(5 * MAX_RETIRED_SERIES):
        traffic.track(cast(Any, FakeLink(f"claimed-{i}", sent=1, failed=True)))
    assert len(traffic.sent) <= MAX_RETIRED_SERIES + 1
    assert len(traffic._links) <= 1
