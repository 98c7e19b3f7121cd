"""Daemon configuration: one dataclass, built in one place (the CLI)."""

from __future__ import annotations

import ipaddress
import secrets
import socket
from dataclasses import dataclass, field

from collnet.errors import InvalidArgument
from collnet.membership.liveness import Liveness
from collnet.transport.tls import Tls


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    return host, int(port)


def check_dialable(host: str, option: str) -> None:
    """Refuse an advertised host no peer can dial: an unspecified address
    (0.0.0.0, ::) means "every interface" to a listener and nothing to a dialler."""
    try:
        unspecified = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return  # a host name: whether it resolves is the reachability check's business
    if unspecified:
        hint = "" if option == "--advertise-host" else " without --advertise-host"
        raise InvalidArgument(
            f"{option} {host}{hint}: peers cannot dial the unspecified address {host}; "
            "give --advertise-host with an address of this host that the other peers "
            "can reach (and --advertise-port if a NAT maps the port)"
        )


def default_peer_id() -> str:
    return f"{socket.gethostname()[:24]}-{secrets.token_hex(3)}"


@dataclass
class DaemonConfig:
    coordinator: tuple[str, int]
    ipc: str
    listen: tuple[str, int] = ("127.0.0.1", 0)
    advertise_host: str | None = None
    # The port others dial when it is not the one listened on (a NAT's mapping).
    advertise_port: int | None = None
    # How often link estimates go to the coordinator (linkreport.py).
    link_report_s: float = 2.0
    # Connections per data link this daemon dials; None: from each link's
    # bandwidth-delay product (collnet.topology.striping).
    connections: int | None = None
    chunk_bytes: int = 1 << 20
    # Shared-state fetch ranges: big enough to stripe over K connections, small
    # enough that a tensor's ranges spread over several holders.
    state_chunk_bytes: int = 8 << 20
    star_max_bytes: int = 256 * 1024
    codec_block_size: int = 256
    collective_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    # Pieces that arrive before their collective starts here, charged what they
    # hold in memory (payload and overhead): in all, and from any one peer (a
    # ring's predecessor sends up to a 1/N segment of the tensor early).
    max_early_bytes: int = 1 << 30
    max_early_bytes_per_peer: int = 768 << 20
    drain_timeout_s: float = 30.0
    heartbeat_interval_s: float = 0.5
    heartbeat_floor_s: float = 2.0
    heartbeat_ceiling_s: float = 10.0
    # Once this node's trainers are gone the daemon always leaves the world (its
    # session ends, session.py); with this it also stops.
    leave_when_trainers_exit: bool = False
    # Also serve trainers on tcp://127.0.0.1:PORT (0, the default: only on ``ipc``);
    # every request there must carry the token from ``ipc_token_file``.
    ipc_tcp_port: int = 0
    # The ipc socket is 0600; with a group, 0660 and group-owned (its members'
    # trainers may use it too, each attaching only its own shared memory).
    ipc_group: str | None = None
    # Where the TCP endpoint's token is written (default: next to the ipc socket).
    ipc_token_file: str | None = None
    peer_id: str = field(default_factory=default_peer_id)
    secret: bytes | None = field(default=None, repr=False)
    # Mutual TLS on every control and data connection; the peer id is then the
    # name on this daemon's certificate.
    tls: Tls | None = field(default=None, repr=False)

    def advertised(self, bound: tuple[str, int]) -> tuple[str, int]:
        """The data address others dial, given where the listener is bound."""
        host = self.advertise_host or bound[0]
        check_dialable(host, "--advertise-host" if self.advertise_host else "--listen")
        return host, self.advertise_port or bound[1]

    def liveness(self) -> Liveness:
        """A fresh failure detector with this daemon's heartbeat settings."""
        return Liveness(self.heartbeat_interval_s, self.heartbeat_floor_s, self.heartbeat_ceiling_s)
