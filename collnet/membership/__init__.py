"""Membership state machines (sans-I/O): the coordinator's view of the world."""

from collnet.membership.coordinator import (
    BarrierReply,
    CoordinatorState,
    Effect,
    Fail,
    Push,
    Reply,
)
from collnet.membership.world import PeerInfo, WorldView

__all__ = [
    "BarrierReply",
    "CoordinatorState",
    "Effect",
    "Fail",
    "PeerInfo",
    "Push",
    "Reply",
    "WorldView",
]
