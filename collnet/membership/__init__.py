"""Membership state machines (sans-I/O): the coordinator's view of the world."""

from collnet.membership.coordinator import CoordinatorState, Effect, Push, Reply
from collnet.membership.world import PeerInfo, WorldView

__all__ = ["CoordinatorState", "Effect", "PeerInfo", "Push", "Reply", "WorldView"]
