"""Typed coordinator-protocol messages: every CONTROL frame between a daemon and the coordinator.

On the control connection a CONTROL frame's meta is a msgpack map with a type
``t`` (docs/protocol.md, "Control connection"). Each message is a frozen
dataclass here: ``to_wire()`` builds its map, exactly the keys, order and
values peers have always sent; ``from_wire()`` rebuilds it, validated, where
its frame arrives, so past that point code holds typed values only. Anything
malformed (not a map, a missing field, a wrong type, a bool where a number
belongs, an unknown ``t``, a payload on a message that carries none) raises
``ProtocolError`` naming the message and the field; unknown keys are ignored.

Requests (daemon -> coordinator) travel as ``Request(id, body)``, the body one
of ``Register``, ``UpdateTopology``, ``Barrier``, ``GetWorld``, ``Leave``,
``GetStatus``. Replies travel as ``Reply(id, outcome)``, the outcome an
``ErrorInfo`` (``"ok": false``) or the answer: ``WorldAnswer`` (register,
update_topology, world), ``BarrierAnswer``, ``Left`` (leave) or
``StatusAnswer``. A reply names only its request's ``id``: the caller knows
what it asked and parses the reply with that answer type. The coordinator
also pushes ``WorldPush``. The HELLO handshake (``collnet.membership.auth``)
and heartbeats (``collnet.transport.heartbeat``) have frame kinds of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, Self, TypeAlias, TypeVar

import msgpack

from collnet.errors import CollnetError, ProtocolError
from collnet.membership.bounds import epoch_from_wire, peer_from_wire, world_from_wire
from collnet.membership.world import PeerInfo, WorldView
from collnet.wire.topology import LinkAck, LinkReport, TopologyStatus

BARRIER_NAMES: Final = ("state", "synced")
PeerState: TypeAlias = Literal["active", "pending", "unconfirmed"]
PEER_STATES: Final[tuple[PeerState, ...]] = ("active", "pending", "unconfirmed")
Payload: TypeAlias = bytes | memoryview


# -- field checks ------------------------------------------------------------
_T = TypeVar("_T", int, float, str, bool)
_WANT = {int: "an integer >= 0", float: "a number", str: "a string", bool: "true or false"}


def _map(obj: Any, what: str, *, str_keys: bool = False) -> dict[str, Any]:
    if not isinstance(obj, dict) or (str_keys and not all(isinstance(k, str) for k in obj)):
        keys = " with string keys" if str_keys else ""
        raise ProtocolError(f"{what} must be a map{keys}, got {obj!r:.40}")
    return obj


def _get(msg: dict[str, Any], key: str, what: str, kind: type[_T]) -> _T:
    """``msg[key]`` if it is a ``kind`` (a bool is no number; integers are >= 0)."""
    value = msg.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (
        not isinstance(value, kind)
        or (isinstance(value, bool) and kind is not bool)
        or (isinstance(value, int) and value < 0)
    ):
        raise ProtocolError(f"{what}: {key!r} must be {_WANT[kind]}, got {value!r:.40}")
    return value


def _opt(msg: dict[str, Any], key: str, what: str, kind: type[_T]) -> _T | None:
    return None if msg.get(key) is None else _get(msg, key, what, kind)


def _no_payload(payload: Payload, what: str) -> None:
    if len(payload):
        raise ProtocolError(f"{what} carries no payload, got {len(payload)} bytes")


def _epoch(msg: dict[str, Any], what: str) -> int:
    return epoch_from_wire(msg.get("epoch"), what)


# Peer records and worlds are checked against ``collnet.membership.bounds``.
_peer = peer_from_wire
_world = world_from_wire


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} where plain msgpack belongs")


def _unpack_map(payload: Payload, what: str) -> dict[str, Any]:
    """A msgpack map with string keys, from untrusted bytes (no ext types)."""
    n = len(payload)
    try:
        # Lengths bounded by the input's size: a small payload cannot make msgpack allocate much.
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            **dict.fromkeys(("max_str_len", "max_bin_len", "max_array_len", "max_map_len"), n),
            max_ext_len=n,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # untrusted bytes: whatever msgpack raises is the sender's fault
        raise ProtocolError(f"{what} is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    return _map(obj, what, str_keys=True)


class _Message:
    """What every message has: the frame payload that goes with its meta (none)."""

    __slots__ = ()

    @property
    def payload(self) -> bytes:
        return b""


class _Empty(_Message):
    __slots__ = ()

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, msg: dict[str, Any], payload: Payload = b"") -> Self:
        _no_payload(payload, cls.__name__)
        return cls()


@dataclass(frozen=True, slots=True)
class ErrorInfo(_Message):
    """A typed error as it travels: ``{"kind", "message", "fields"}``."""

    kind: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def of(exc: CollnetError) -> ErrorInfo:
        return ErrorInfo(exc.kind, exc.message, dict(exc.fields))

    def exception(self) -> CollnetError:
        """The error rebuilt (an unknown kind becomes a plain ``CollnetError``)."""
        return CollnetError.from_wire(self.to_wire())

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "fields": self.fields}

    @staticmethod
    def from_wire(obj: Any, what: str = "error") -> ErrorInfo:
        err = _map(obj, what)
        fields = _map(err.get("fields", {}), f"{what}: fields", str_keys=True)
        return ErrorInfo(_get(err, "kind", what, str), _get(err, "message", what, str), fields)


# -- requests (daemon -> coordinator): to_wire() gives the fields after "t" and "id"


@dataclass(frozen=True, slots=True)
class Register(_Message):
    """Join as pending. A member reconnecting reports the world it holds: that is
    how a restarted coordinator, whose state is soft, gets the world back."""

    T: ClassVar[str] = "register"
    peer: PeerInfo
    world: WorldView | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peer": self.peer.to_wire()}
        if self.world is not None:
            out["world"] = self.world.to_wire()
        return out

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: Payload = b"") -> Register:
        _no_payload(payload, "register")
        world = None if msg.get("world") is None else _world(msg["world"], "register")
        return Register(_peer(msg.get("peer"), "register"), world)


@dataclass(frozen=True, slots=True)
class UpdateTopology(_Message):
    """The membership barrier; ``epoch`` is the caller's current one."""

    T: ClassVar[str] = "update_topology"
    epoch: int

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: Payload = b"") -> UpdateTopology:
        _no_payload(payload, "update_topology")
        return UpdateTopology(_epoch(msg, "update_topology"))


@dataclass(frozen=True, slots=True)
class Barrier(_Message):
    """Arrive at barrier ``name`` of ``epoch``. ``arrived``, which the coordinator does
    not interpret: for ``"state"`` the caller's msgpack state manifest (bytes, sent as
    the frame's payload), for ``"synced"`` its report (``{"revision", "digest"}`` or
    ``{"error"}``, sent in the meta as ``report``)."""

    T: ClassVar[str] = "barrier"
    name: str
    epoch: int
    arrived: bytes | dict[str, Any]

    @property
    def payload(self) -> bytes:
        return self.arrived if isinstance(self.arrived, bytes) else b""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "epoch": self.epoch}
        if not isinstance(self.arrived, bytes):
            out["report"] = self.arrived
        return out

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: Payload = b"") -> Barrier:
        name = msg.get("name")
        if name not in BARRIER_NAMES:
            raise ProtocolError(f"bad barrier request {name!r:.20}: no such barrier")
        what = f"barrier {name!r}"
        epoch = _epoch(msg, what)
        if name == "state":
            if "report" in msg:
                raise ProtocolError(f"{what} carries its manifest as payload, not 'report'")
            return Barrier(name, epoch, bytes(payload))
        _no_payload(payload, what)
        return Barrier(name, epoch, _map(msg.get("report"), f"{what}: report", str_keys=True))


@dataclass(frozen=True, slots=True)
class GetWorld(_Empty):
    """The current world, pending peers included."""

    T: ClassVar[str] = "world"


@dataclass(frozen=True, slots=True)
class Leave(_Empty):
    """Leave the world now; the survivors get a new epoch."""

    T: ClassVar[str] = "leave"


@dataclass(frozen=True, slots=True)
class GetStatus(_Empty):
    """The coordinator's view, for operators (``collnet status``); needs no register."""

    T: ClassVar[str] = "status"


RequestBody: TypeAlias = (
    Register | UpdateTopology | Barrier | GetWorld | Leave | GetStatus | LinkReport
)
_REQUESTS: Final[dict[str, type[RequestBody]]] = {
    cls.T: cls
    for cls in (Register, UpdateTopology, Barrier, GetWorld, Leave, GetStatus, LinkReport)
}


@dataclass(frozen=True, slots=True)
class Request:
    """``{"t": body.T, "id", **body}``: a request and the id its reply will carry."""

    id: int
    body: RequestBody

    @property
    def payload(self) -> bytes:
        return self.body.payload

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.body.T, "id": self.id, **self.body.to_wire()}

    @staticmethod
    def from_wire(meta: Any, payload: Payload = b"") -> Request:
        msg = _map(meta, "control request")
        rid = msg.get("id")
        if type(rid) is not int or rid < 0:
            raise ProtocolError("control request without an integer id")
        cls = _REQUESTS.get(message_type(msg, "control request"))
        if cls is None:
            raise ProtocolError(f"unknown control message {msg['t']!r:.40}")
        return Request(rid, cls.from_wire(msg, payload))


# -- answers and replies (coordinator -> daemon) -----------------------------
@dataclass(frozen=True, slots=True)
class WorldAnswer(_Message):
    """The answer to ``register``, ``update_topology`` and ``world``."""

    world: WorldView

    def to_wire(self) -> dict[str, Any]:
        return {"world": self.world.to_wire()}

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: Payload = b"") -> WorldAnswer:
        _no_payload(payload, "a world answer")
        return WorldAnswer(_world(msg.get("world"), "world answer"))


@dataclass(frozen=True, slots=True)
class BarrierAnswer(_Message):
    """A completed barrier: its epoch in the meta, and as the frame's payload one
    msgpack map of what every member arrived with, by peer id."""

    epoch: int
    payloads: dict[str, bytes | dict[str, Any]]

    @property
    def payload(self) -> bytes:
        packed: bytes = msgpack.packb(self.payloads, use_bin_type=True)
        return packed

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: Payload = b"") -> BarrierAnswer:
        payloads = _unpack_map(payload, "barrier answer")
        if not all(isinstance(v, bytes | dict) for v in payloads.values()):
            raise ProtocolError("barrier answer: each member's entry must be bytes or a map")
        return BarrierAnswer(_epoch(msg, "barrier answer"), payloads)


@dataclass(frozen=True, slots=True)
class Left(_Empty):
    """The answer to ``leave``: nothing."""


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One registered peer. ``rank`` is None unless active; ``rtt_s`` is its control
    connection's heartbeat RTT (None before the first pong); the last three come
    from the last shared-state sync it reported (``sync_error``: an error kind)."""

    id: str
    state: PeerState
    rank: int | None
    data: str  # "host:port" of its data listener
    connected: bool
    rtt_s: float | None
    revision: int | None = None
    state_digest: str | None = None
    sync_error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out = {"id": self.id, "state": self.state, "rank": self.rank, "data": self.data,
               "connected": self.connected, "rtt_s": self.rtt_s}  # fmt: skip
        for key in ("revision", "state_digest", "sync_error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @staticmethod
    def from_wire(obj: Any, what: str = "status peer") -> PeerStatus:
        row = _map(obj, what)
        state = row.get("state")
        if state not in PEER_STATES:
            raise ProtocolError(f"{what}: unknown state {state!r:.40}")
        return PeerStatus(
            _get(row, "id", what, str), state, _opt(row, "rank", what, int),
            _get(row, "data", what, str), _get(row, "connected", what, bool),
            _opt(row, "rtt_s", what, float), _opt(row, "revision", what, int),
            _opt(row, "state_digest", what, str), _opt(row, "sync_error", what, str),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class CoordinatorStatus:
    """The coordinator's view of the world, for operators."""

    epoch: int
    world: WorldView
    peers: tuple[PeerStatus, ...]
    address: str  # where the coordinator listens
    uptime_s: float
    topology: TopologyStatus | None = None  # link estimates and reachability

    def to_wire(self) -> dict[str, Any]:
        return {
            **(self.topology.to_wire() if self.topology is not None else {}),
            "epoch": self.epoch,
            "world": self.world.to_wire(),
            "peers": [p.to_wire() for p in self.peers],
            "coordinator": {"address": self.address, "uptime_s": self.uptime_s},
        }

    @staticmethod
    def from_wire(obj: Any, what: str = "status") -> CoordinatorStatus:
        status = _map(obj, what)
        peers = status.get("peers")
        if not isinstance(peers, list):
            raise ProtocolError(f"{what}: 'peers' must be a list")
        coord = _map(status.get("coordinator"), f"{what}: coordinator")
        return CoordinatorStatus(
            _epoch(status, what),
            _world(status.get("world"), what),
            tuple(PeerStatus.from_wire(p) for p in peers),
            _get(coord, "address", f"{what}: coordinator", str),
            _get(coord, "uptime_s", f"{what}: coordinator", float),
            TopologyStatus.from_wire(status),
        )


@dataclass(frozen=True, slots=True)
class StatusAnswer(_Message):
    """The answer to ``status``."""

    status: CoordinatorStatus

    def to_wire(self) -> dict[str, Any]:
        return {"status": self.status.to_wire()}

    @staticmethod
    def from_wire(msg: dict[str, Any], payload: Payload = b"") -> StatusAnswer:
        _no_payload(payload, "a status answer")
        return StatusAnswer(CoordinatorStatus.from_wire(msg.get("status")))


Answer: TypeAlias = WorldAnswer | BarrierAnswer | Left | StatusAnswer | LinkAck
A = TypeVar("A", WorldAnswer, BarrierAnswer, Left, StatusAnswer, LinkAck)


@dataclass(frozen=True, slots=True)
class Reply:
    """``{"t": "reply", "id", "ok": true, **answer}`` or ``{..., "ok": false, "error"}``."""

    T: ClassVar[str] = "reply"
    id: int
    outcome: Answer | ErrorInfo

    @property
    def payload(self) -> bytes:
        return self.outcome.payload

    def to_wire(self) -> dict[str, Any]:
        if isinstance(self.outcome, ErrorInfo):
            return {"t": self.T, "id": self.id, "ok": False, "error": self.outcome.to_wire()}
        return {"t": self.T, "id": self.id, "ok": True, **self.outcome.to_wire()}

    @staticmethod
    def id_of(meta: Any) -> int:
        """The id of a reply, checked: what finds the request it answers."""
        msg = _map(meta, "reply")
        rid = msg.get("id")
        if msg.get("t") != Reply.T or type(rid) is not int or rid < 0:
            raise ProtocolError(f"not a reply with an integer id: {msg!r:.80}")
        return rid

    @staticmethod
    def from_wire(meta: Any, payload: Payload, answer: type[Answer]) -> Reply:
        """A reply to a request whose answer is an ``answer``."""
        rid = Reply.id_of(meta)
        msg = _map(meta, "reply")
        if _get(msg, "ok", "reply", bool):
            return Reply(rid, answer.from_wire(msg, payload))
        _no_payload(payload, "an error reply")
        return Reply(rid, ErrorInfo.from_wire(msg.get("error"), "reply error"))


# -- pushes (coordinator -> daemon) ------------------------------------------
@dataclass(frozen=True, slots=True)
class WorldPush(_Message):
    """``{"t": "world", "world"}``: the world changed under this member (a member was
    lost or left), or this peer was admitted while not inside ``update_topology``."""

    T: ClassVar[str] = "world"
    world: WorldView

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.T, "world": self.world.to_wire()}

    @staticmethod
    def from_wire(meta: Any, payload: Payload = b"") -> WorldPush:
        if message_type(meta, "world push") != WorldPush.T:
            raise ProtocolError(f"not a world push: t={meta['t']!r:.40}")
        _no_payload(payload, "a world push")
        return WorldPush(_world(meta.get("world"), "world push"))


def message_type(meta: Any, what: str = "control message") -> str:
    """The ``t`` of a CONTROL frame's meta, checked to be a map with a string ``t``:
    what a receiver dispatches on before it parses the message."""
    t = _map(meta, what).get("t")
    if not isinstance(t, str):
        raise ProtocolError(f"{what} without a string type 't', got {t!r:.40}")
    return t
