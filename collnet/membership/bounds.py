"""What a peer id, a data address, an epoch and a world may be, checked where they arrive.

Every control message that names a peer or a world is parsed with
``peer_from_wire`` / ``world_from_wire``, so past the boundary code holds only
values within these bounds:

- a peer id is a certificate name (``identity.NAME_PATTERN``: 1 to 64 of
  ``[A-Za-z0-9._-]``, starting with a letter or digit): safe in a log line, a
  file name and a metric label, and no newline or terminal escape can ride in
  on it;
- a data address is an IP literal or an RFC 1123 host name (underscores
  allowed, as container runtimes use them) and a port 1..65535;
- an epoch is at most ``MAX_EPOCH`` (2**53 - 1: exact in a JSON number, and
  far from msgpack's 2**64 - 1, where one more bump cannot be encoded);
- a world names at most ``MAX_WORLD_PEERS`` peers, none twice.

``check_claim`` is what a restarted coordinator asks of a world a rejoining
member hands back before adopting it: on top of the above, the epoch leaves
``EPOCH_HEADROOM`` bumps below ``MAX_EPOCH``, and the claimant is in it with
the very record it registered.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final

from collnet.errors import ProtocolError
from collnet.membership.identity import valid_name
from collnet.membership.world import PeerInfo, WorldView
from collnet.topology.costmodel import LinkCosts

MAX_EPOCH: Final = 2**53 - 1
# A claimed world must leave this many epoch bumps before MAX_EPOCH.
EPOCH_HEADROOM: Final = 2**52
MAX_WORLD_PEERS: Final = 1024
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def valid_peer_id(value: object) -> bool:
    return valid_name(value)


def valid_host(value: object) -> bool:
    """An IP literal (v4, or v6 with an optional zone) or an RFC 1123 host name."""
    if not isinstance(value, str) or not 0 < len(value) <= 253:
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    return all(_HOST_LABEL.fullmatch(label) for label in value.removesuffix(".").split("."))


def valid_port(value: object) -> bool:
    return type(value) is int and 1 <= value <= 0xFFFF


def peer_from_wire(obj: Any, what: str) -> PeerInfo:
    """A ``[id, host, port]`` record, each field within bounds."""
    if not (isinstance(obj, list) and len(obj) == 3):
        raise ProtocolError(f"{what}: bad peer record {obj!r:.80}; expected [id, host, port]")
    peer_id, host, port = obj
    if not valid_peer_id(peer_id):
        raise ProtocolError(
            f"{what}: bad peer id {peer_id!r:.80}; expected 1-64 of A-Za-z0-9._- "
            "starting with a letter or digit"
        )
    if not valid_host(host):
        raise ProtocolError(f"{what}: peer {peer_id}: bad host {host!r:.80}")
    if not valid_port(port):
        raise ProtocolError(f"{what}: peer {peer_id}: bad port {port!r:.20}; expected 1-65535")
    return PeerInfo(peer_id, host, port)


def epoch_from_wire(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_EPOCH:
        raise ProtocolError(f"{what}: 'epoch' must be an integer in [0, 2**53), got {value!r:.40}")
    return value


def world_from_wire(obj: Any, what: str) -> WorldView:
    """A ``{"epoch", "peers", "pending"}`` map, within bounds."""
    what = f"{what}: world"
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a map, got {obj!r:.40}")
    peers, pending = obj.get("peers"), obj.get("pending")
    if not isinstance(peers, list) or not isinstance(pending, list):
        raise ProtocolError(f"{what}: 'peers' and 'pending' must be lists")
    if len(peers) + len(pending) > MAX_WORLD_PEERS:
        raise ProtocolError(f"{what} names {len(peers) + len(pending)} peers (at most 1024)")
    for peer_id in pending:
        if not valid_peer_id(peer_id):
            raise ProtocolError(f"{what}: bad pending peer id {peer_id!r:.80}")
    members = tuple(peer_from_wire(p, what) for p in peers)
    ids = [p.id for p in members] + pending
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{what} names a peer twice")
    costs = LinkCosts.from_wire(obj.get("costs"))
    return WorldView(epoch_from_wire(obj.get("epoch"), what), members, tuple(pending), costs)


def check_claim(claimant: PeerInfo, world: WorldView) -> None:
    """Raise ``ProtocolError`` unless ``world`` is one a restarted coordinator may take
    back from ``claimant`` (see the module docstring). ``claimant`` is the record the
    connection's identity registered: the caller decides that identity."""
    if not 0 <= world.epoch <= MAX_EPOCH - EPOCH_HEADROOM:
        raise ProtocolError(f"claimed world: epoch {world.epoch} is out of range (below 2**52)")
    if len(world.peers) + len(world.pending) > MAX_WORLD_PEERS:
        raise ProtocolError(f"claimed world: {len(world.peers)} members (at most 1024)")
    for peer in world.peers:
        if not (valid_peer_id(peer.id) and valid_host(peer.host) and valid_port(peer.port)):
            raise ProtocolError(f"claimed world: bad member record {peer.to_wire()!r:.80}")
    if len(set(world.ids)) != len(world.ids):
        raise ProtocolError("claimed world names a member twice")
    mine = next((p for p in world.peers if p.id == claimant.id), None)
    if mine is None:
        raise ProtocolError(f"claimed world: {claimant.id} is not a member of it")
    if mine != claimant:
        raise ProtocolError(
            f"claimed world: {claimant.id} is in it at {mine.host}:{mine.port}, "
            f"but registered {claimant.host}:{claimant.port}"
        )
