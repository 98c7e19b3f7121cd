"""Coordinator-protocol messages: round trips through real frames, the exact maps
peers have always sent, and rejection of malformed ones."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collnet.errors import CollnetError, InvalidArgument, PeerLost, ProtocolError
from collnet.membership import PeerInfo, WorldView
from collnet.membership.bounds import MAX_EPOCH, MAX_WORLD_PEERS
from collnet.wire import FrameKind, FrameReader, Limits, frame_bytes
from collnet.wire import control as wire

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,11}", fullmatch=True)
u64 = st.integers(0, 2**63 - 1)
epochs = st.integers(0, MAX_EPOCH)
hosts = st.sampled_from(["h", "10.0.0.1", "::1", "fe80::1%eth0", "node_3.example.org."]) | (
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]{1,5}){0,3}", fullmatch=True)
)
peers = st.builds(PeerInfo, ids, hosts, st.integers(1, 0xFFFF))


@st.composite
def worlds(draw: st.DrawFn) -> WorldView:
    members = draw(st.lists(peers, max_size=5, unique_by=lambda p: p.id))
    taken = {p.id for p in members}
    pending = draw(st.lists(ids.filter(lambda i: i not in taken), max_size=3, unique=True))
    return WorldView(draw(epochs), tuple(members), tuple(pending))


# msgpack-safe opaque values, as a report or an error's fields may hold.
opaque = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
    | st.binary(max_size=8) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
reports = st.dictionaries(st.text(max_size=8), opaque, max_size=4)
errors = st.builds(wire.ErrorInfo, st.text(max_size=12), st.text(max_size=30), reports)
barriers = st.builds(wire.Barrier, st.just("state"), epochs, st.binary(max_size=64)) | st.builds(
    wire.Barrier, st.just("synced"), epochs, reports
)
bodies = st.one_of(
    st.builds(wire.Register, peers, st.none() | worlds()),
    st.builds(wire.UpdateTopology, epochs),
    barriers,
    st.just(wire.GetWorld()),
    st.just(wire.Leave()),
    st.just(wire.GetStatus()),
)
peer_status = st.builds(
    wire.PeerStatus,
    ids,
    st.sampled_from(wire.PEER_STATES),
    st.none() | st.integers(0, 64),
    st.text(max_size=20),
    st.booleans(),
    st.none() | st.floats(0, 10),
    st.none() | u64,
    st.none() | st.text(max_size=16),
    st.none() | st.text(max_size=16),
)
statuses = st.builds(
    wire.CoordinatorStatus,
    epochs,
    worlds(),
    st.lists(peer_status, max_size=4).map(tuple),
    st.text(max_size=20),
    st.floats(0, 1e6),
)
answers = st.one_of(
    st.builds(wire.WorldAnswer, worlds()),
    st.builds(
        wire.BarrierAnswer,
        epochs,
        st.dictionaries(ids, st.binary(max_size=16) | reports, max_size=4),
    ),
    st.just(wire.Left()),
    st.builds(wire.StatusAnswer, statuses),
)


def through_a_frame(meta: Any, payload: bytes) -> tuple[Any, memoryview]:
    """What the receiving end's reader hands over for a CONTROL frame."""
    reader = FrameReader(Limits(max_payload_bytes=1 << 20))
    (frame,) = reader.feed(frame_bytes(FrameKind.CONTROL, meta, payload))
    return frame.meta, frame.payload


@FAST
@given(st.integers(0, 2**32), bodies)
def test_every_request_round_trips_through_a_frame(rid: int, body: wire.RequestBody) -> None:
    sent = wire.Request(rid, body)
    assert wire.Request.from_wire(*through_a_frame(sent.to_wire(), sent.payload)) == sent


@FAST
@given(st.integers(0, 2**32), answers | errors)
def test_every_reply_round_trips_through_a_frame(
    rid: int, outcome: wire.Answer | wire.ErrorInfo
) -> None:
    sent = wire.Reply(rid, outcome)
    meta, payload = through_a_frame(sent.to_wire(), sent.payload)
    answer = type(outcome) if not isinstance(outcome, wire.ErrorInfo) else wire.WorldAnswer
    assert wire.Reply.id_of(meta) == rid
    assert wire.Reply.from_wire(meta, payload, answer) == sent


@FAST
@given(worlds())
def test_world_push_round_trips_through_a_frame(world: WorldView) -> None:
    push = wire.WorldPush(world)
    meta, payload = through_a_frame(push.to_wire(), push.payload)
    assert wire.message_type(meta) == "world"
    assert wire.WorldPush.from_wire(meta, payload) == push


def test_maps_are_the_ones_peers_have_always_sent() -> None:
    me = PeerInfo("a", "10.0.0.1", 7000)
    world = WorldView(3, (me, PeerInfo("b", "h", 1)), ("c",))
    w = {"epoch": 3, "peers": [["a", "10.0.0.1", 7000], ["b", "h", 1]], "pending": ["c"]}
    cases: list[tuple[Any, dict[str, Any]]] = [
        (wire.Request(1, wire.Register(me)), {"t": "register", "id": 1, "peer": me.to_wire()}),
        (
            wire.Request(2, wire.Register(me, world)),
            {"t": "register", "id": 2, "peer": ["a", "10.0.0.1", 7000], "world": w},
        ),
        (wire.Request(3, wire.UpdateTopology(3)), {"t": "update_topology", "id": 3, "epoch": 3}),
        (
            wire.Request(4, wire.Barrier("synced", 3, {"revision": 1})),
            {"t": "barrier", "id": 4, "name": "synced", "epoch": 3, "report": {"revision": 1}},
        ),
        (
            wire.Request(5, wire.Barrier("state", 3, b"manifest")),
            {"t": "barrier", "id": 5, "name": "state", "epoch": 3},
        ),
        (wire.Request(6, wire.GetWorld()), {"t": "world", "id": 6}),
        (wire.Request(7, wire.Leave()), {"t": "leave", "id": 7}),
        (wire.Request(8, wire.GetStatus()), {"t": "status", "id": 8}),
        (wire.Reply(1, wire.WorldAnswer(world)), {"t": "reply", "id": 1, "ok": True, "world": w}),
        (wire.Reply(7, wire.Left()), {"t": "reply", "id": 7, "ok": True}),
        (
            wire.Reply(5, wire.BarrierAnswer(3, {"a": b"x"})),
            {"t": "reply", "id": 5, "ok": True, "epoch": 3},
        ),
        (wire.WorldPush(world), {"t": "world", "world": w}),
    ]
    for msg, expected in cases:
        got = msg.to_wire()
        # Same keys in the same order, same values: the same msgpack bytes.
        assert msgpack.packb(got, use_bin_type=True) == msgpack.packb(expected, use_bin_type=True)
    assert wire.Request(5, wire.Barrier("state", 3, b"manifest")).payload == b"manifest"
    answer = wire.BarrierAnswer(3, {"a": b"x"})
    assert msgpack.unpackb(answer.payload) == {"a": b"x"}
    exc = PeerLost("gone", peer="b", epoch=3)
    assert wire.Reply(9, wire.ErrorInfo.of(exc)).to_wire() == {
        "t": "reply",
        "id": 9,
        "ok": False,
        "error": exc.to_wire(),
    }


def test_an_error_reply_rebuilds_the_typed_error() -> None:
    sent = wire.Reply(3, wire.ErrorInfo.of(InvalidArgument("no", peer="p")))
    got = wire.Reply.from_wire(sent.to_wire(), b"", wire.WorldAnswer).outcome
    assert isinstance(got, wire.ErrorInfo)
    err = got.exception()
    assert isinstance(err, InvalidArgument) and err.message == "no" and err.fields == {"peer": "p"}
    # A kind this side does not know still comes back as an error.
    assert type(wire.ErrorInfo("Novel", "m").exception()) is CollnetError


GOOD_WORLD = {"epoch": 1, "peers": [["a", "h", 1]], "pending": []}
BAD_REQUESTS: list[tuple[Any, bytes, str]] = [
    (["t", "register"], b"", "must be a map"),
    ({"t": "register"}, b"", "integer id"),
    ({"t": "register", "id": True, "peer": ["a", "h", 1]}, b"", "integer id"),
    ({"t": "register", "id": -1, "peer": ["a", "h", 1]}, b"", "integer id"),
    ({"t": "register", "id": "1", "peer": ["a", "h", 1]}, b"", "integer id"),
    ({"t": "dance", "id": 1}, b"", "unknown control message"),
    ({"t": 7, "id": 1}, b"", "type 't'"),
    ({"id": 1}, b"", "type 't'"),
    ({"t": "register", "id": 1, "peer": ["a", "h", True]}, b"", "bad port"),
    ({"t": "register", "id": 1, "peer": ["a", "h", 70000]}, b"", "bad port"),
    ({"t": "register", "id": 1, "peer": ["a", "h"]}, b"", "bad peer record"),
    ({"t": "register", "id": 1, "peer": ["a", "h", 1]}, b"x", "carries no payload"),
    ({"t": "register", "id": 1, "peer": ["a", "h", 1], "world": 3}, b"", "must be a map"),
    (
        {"t": "register", "id": 1, "peer": ["a", "h", 1], "world": {**GOOD_WORLD, "epoch": True}},
        b"",
        "'epoch' must be an integer",
    ),
    (
        {
            "t": "register",
            "id": 1,
            "peer": ["a", "h", 1],
            "world": {**GOOD_WORLD, "pending": ["a"]},
        },
        b"",
        "names a peer twice",
    ),
    (
        {"t": "register", "id": 1, "peer": ["a", "h", 1], "world": {"epoch": 1, "peers": []}},
        b"",
        "must be lists",
    ),
    ({"t": "update_topology", "id": 1}, b"", "'epoch' must be an integer"),
    ({"t": "update_topology", "id": 1, "epoch": False}, b"", "'epoch' must be an integer"),
    ({"t": "update_topology", "id": 1, "epoch": 1.0}, b"", "'epoch' must be an integer"),
    ({"t": "barrier", "id": 1, "name": "lunch", "epoch": 1}, b"", "no such barrier"),
    ({"t": "barrier", "id": 1, "name": "state", "epoch": "1"}, b"m", "'epoch' must be"),
    ({"t": "barrier", "id": 1, "name": "state", "epoch": 1, "report": {}}, b"m", "as payload"),
    ({"t": "barrier", "id": 1, "name": "synced", "epoch": 1}, b"", "report must be a map"),
    ({"t": "barrier", "id": 1, "name": "synced", "epoch": 1, "report": {}}, b"m", "no payload"),
    ({"t": "barrier", "id": 1, "name": "synced", "epoch": 1, "report": {b"k": 1}}, b"", "string"),
    ({"t": "leave", "id": 1}, b"x", "carries no payload"),
]


@pytest.mark.parametrize(("meta", "payload", "why"), BAD_REQUESTS)
def test_malformed_requests_are_protocol_errors(meta: Any, payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        wire.Request.from_wire(meta, payload)


BAD_REPLIES: list[tuple[Any, bytes, type[wire.Answer], str]] = [
    ({"t": "reply", "id": 1, "ok": 1, "world": GOOD_WORLD}, b"", wire.WorldAnswer, "true or false"),
    ({"t": "reply", "id": 1, "world": GOOD_WORLD}, b"", wire.WorldAnswer, "true or false"),
    ({"t": "reply", "id": 1, "ok": True}, b"", wire.WorldAnswer, "world must be a map"),
    ({"t": "reply", "id": 1, "ok": True, "world": GOOD_WORLD}, b"p", wire.WorldAnswer, "payload"),
    ({"t": "reply", "id": 1, "ok": False}, b"", wire.WorldAnswer, "error must be a map"),
    (
        {"t": "reply", "id": 1, "ok": False, "error": {"kind": "X", "message": 3}},
        b"",
        wire.Left,
        "'message' must be a string",
    ),
    (
        {"t": "reply", "id": 1, "ok": False, "error": {"kind": "X", "message": "m", "fields": []}},
        b"",
        wire.Left,
        "fields must be a map",
    ),
    ({"t": "reply", "id": 1, "ok": True, "epoch": 2}, b"\xc1", wire.BarrierAnswer, "not valid"),
    (
        {"t": "reply", "id": 1, "ok": True, "epoch": 2},
        msgpack.packb([1, 2]),
        wire.BarrierAnswer,
        "must be a map",
    ),
    (
        {"t": "reply", "id": 1, "ok": True, "epoch": 2},
        msgpack.packb({"a": 1}),
        wire.BarrierAnswer,
        "bytes or a map",
    ),
    (
        {"t": "reply", "id": 1, "ok": True, "epoch": 2},
        msgpack.packb({"a": msgpack.ExtType(5, b"x")}),
        wire.BarrierAnswer,
        "ext type",
    ),
    (
        {"t": "reply", "id": 1, "ok": True, "epoch": 2},
        msgpack.packb({"a": b"x"}) + b"\x00",
        wire.BarrierAnswer,
        "not valid msgpack",
    ),
    ({"t": "reply", "id": 1, "ok": True}, msgpack.packb({}), wire.BarrierAnswer, "'epoch'"),
    ({"t": "reply", "id": 1, "ok": True, "status": []}, b"", wire.StatusAnswer, "must be a map"),
    ({"t": "reply", "id": "1", "ok": True}, b"", wire.Left, "integer id"),
    ({"t": "world", "id": 1, "ok": True}, b"", wire.Left, "not a reply"),
]


@pytest.mark.parametrize(("meta", "payload", "answer", "why"), BAD_REPLIES)
def test_malformed_replies_are_protocol_errors(
    meta: Any, payload: bytes, answer: type[wire.Answer], why: str
) -> None:
    with pytest.raises(ProtocolError, match=why):
        wire.Reply.from_wire(meta, payload, answer)


def test_malformed_status_rows_are_protocol_errors() -> None:
    status = wire.CoordinatorStatus(
        1,
        WorldView(1, (PeerInfo("a", "h", 1),)),
        (wire.PeerStatus("a", "active", 0, "h:1", True, 0.001, 4, "ab", None),),
        "c:1",
        2.5,
    )
    good = status.to_wire()
    assert wire.CoordinatorStatus.from_wire(good) == status
    row = good["peers"][0]
    for key, value, why in [
        ("state", "sleeping", "unknown state"),
        ("connected", 1, "true or false"),
        ("rank", True, "'rank' must be an integer"),
        ("rtt_s", "fast", "'rtt_s' must be a number"),
        ("rtt_s", False, "'rtt_s' must be a number"),
        ("revision", -1, "'revision' must be an integer >= 0"),
        ("state_digest", b"ab", "'state_digest' must be a string"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            wire.CoordinatorStatus.from_wire({**good, "peers": [{**row, key: value}]})
    with pytest.raises(ProtocolError, match="uptime_s"):
        wire.CoordinatorStatus.from_wire({**good, "coordinator": {"address": "c:1"}})
    # An integer RTT or uptime is a number all the same.
    assert wire.CoordinatorStatus.from_wire({**good, "coordinator": {"address": "", "uptime_s": 3}})


def test_a_world_push_is_checked_like_any_world() -> None:
    with pytest.raises(ProtocolError, match="must be a map"):
        wire.WorldPush.from_wire({"t": "world", "world": None})
    with pytest.raises(ProtocolError, match="not a world push"):
        wire.WorldPush.from_wire({"t": "reply", "world": GOOD_WORLD})
    with pytest.raises(ProtocolError, match="no payload"):
        wire.WorldPush.from_wire({"t": "world", "world": GOOD_WORLD}, b"x")


@FAST
@given(st.dictionaries(st.sampled_from(["t", "id", "peer", "epoch", "name", "report", "world"]),
                       opaque, max_size=6), st.binary(max_size=8))  # fmt: skip
def test_arbitrary_maps_parse_or_raise_protocol_error_only(
    meta: dict[str, Any], payload: bytes
) -> None:
    for parse in (
        lambda: wire.Request.from_wire(meta, payload),
        lambda: wire.Reply.from_wire({**meta, "t": "reply"}, payload, wire.WorldAnswer),
        lambda: wire.Reply.from_wire({**meta, "t": "reply"}, payload, wire.BarrierAnswer),
        lambda: wire.WorldPush.from_wire({**meta, "t": "world"}, payload),
    ):
        with contextlib.suppress(ProtocolError):
            parse()


# -- bounds: peer ids, data addresses, epochs and world sizes ------------------
def _register(peer: Any, world: Any = None) -> dict[str, Any]:
    msg = {"t": "register", "id": 1, "peer": peer}
    return msg if world is None else {**msg, "world": world}


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (["", "h", 1], "bad peer id"),
        (["a" * 65, "h", 1], "bad peer id"),
        (["-a", "h", 1], "bad peer id"),
        (["a\nWARNING forged line", "h", 1], "bad peer id"),
        (["a\x1b[31m", "h", 1], "bad peer id"),
        (["a/b", "h", 1], "bad peer id"),
        ([7, "h", 1], "bad peer id"),
        (["a", "", 1], "bad host"),
        (["a", "two words", 1], "bad host"),
        (["a", "-lead.example", 1], "bad host"),
        (["a", "trail-.example", 1], "bad host"),
        (["a", "a..b", 1], "bad host"),
        (["a", "x" * 254, 1], "bad host"),
        (["a", "h\r\n", 1], "bad host"),
        (["a", b"h", 1], "bad host"),
        (["a", "h", 0], "bad port"),
        (["a", "h", 65536], "bad port"),
        (["a", "h", -1], "bad port"),
        (["a", "h", "80"], "bad port"),
    ],
)
def test_peer_records_out_of_bounds_are_protocol_errors(record: list[Any], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        wire.Request.from_wire(_register(record))
    # The same record inside a claimed world is refused just the same.
    world = {"epoch": 1, "peers": [["a", "h", 1], record], "pending": []}
    with pytest.raises(ProtocolError, match=why):
        wire.Request.from_wire(_register(["a", "h", 1], world))


@pytest.mark.parametrize("epoch", [MAX_EPOCH + 1, 2**63, 2**64 - 1])
def test_epochs_past_2_53_are_refused_wherever_they_appear(epoch: int) -> None:
    world = {**GOOD_WORLD, "epoch": epoch}
    for meta in (
        _register(["a", "h", 1], world),
        {"t": "update_topology", "id": 1, "epoch": epoch},
        {"t": "barrier", "id": 1, "name": "synced", "epoch": epoch, "report": {}},
    ):
        with pytest.raises(ProtocolError, match=r"'epoch' must be an integer in \[0, 2\*\*53\)"):
            wire.Request.from_wire(*through_a_frame(meta, b""))
    with pytest.raises(ProtocolError, match="epoch"):
        wire.WorldPush.from_wire({"t": "world", "world": world})
    ok = wire.Request.from_wire(_register(["a", "h", 1], {**GOOD_WORLD, "epoch": MAX_EPOCH}))
    assert isinstance(ok.body, wire.Register) and ok.body.world is not None
    assert ok.body.world.epoch == MAX_EPOCH


def test_a_world_names_at_most_max_world_peers() -> None:
    members = [[f"p{i}", "10.0.0.1", 1 + i] for i in range(MAX_WORLD_PEERS)]
    full = {"epoch": 1, "peers": members[:-1], "pending": [members[-1][0]]}
    assert wire.WorldPush.from_wire({"t": "world", "world": full}).world.size == MAX_WORLD_PEERS - 1
    over = {**full, "pending": [members[-1][0], "one-more"]}
    with pytest.raises(ProtocolError, match="names 1025 peers"):
        wire.WorldPush.from_wire({"t": "world", "world": over})
    with pytest.raises(ProtocolError, match="bad pending peer id"):
        wire.WorldPush.from_wire({"t": "world", "world": {**GOOD_WORLD, "pending": ["x\n"]}})


@FAST
@given(st.text(max_size=70), st.text(max_size=260), st.integers(-5, 70000))
def test_any_peer_record_parses_within_bounds_or_is_a_protocol_error(
    peer_id: str, host: str, port: int
) -> None:
    try:
        got = wire.Request.from_wire(_register([peer_id, host, port])).body
    except ProtocolError:
        return
    assert isinstance(got, wire.Register)
    assert got.peer == PeerInfo(peer_id, host, port)
    # What gets past the boundary is safe to log and to key on as it is.
    assert 1 <= len(peer_id) <= 64 and peer_id.isascii() and peer_id.isprintable()
    assert " " not in host and host.isprintable() and 1 <= port <= 0xFFFF
