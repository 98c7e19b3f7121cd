"""The local API's typed requests and replies: round trips, and every bad field refused.

``parse_request`` is the daemon's one check of a client's request, so each
rejection here is an ``InvalidArgument`` (or a ``ProtocolError`` for what is
not a request at all) that a trainer gets back instead of a crash or a hang.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collnet.algo import ALGORITHMS
from collnet.algo.ops import DTYPE_BY_NAME, OPS
from collnet.codec.registry import CODEC_NAMES, LZ4_SUFFIX
from collnet.errors import InvalidArgument, ProtocolError
from collnet.membership.world import PeerInfo, WorldView
from collnet.wire.localapi import (
    MAX_LOCAL_SIZE,
    REQUEST_TYPES,
    AllReduce,
    BenchAllReduce,
    Cancel,
    GetWorld,
    Hello,
    Leave,
    Release,
    Request,
    StateTensor,
    SyncState,
    UpdateTopology,
    parse_request,
)
from collnet.wire.localreplies import HelloReply, SyncStateReply, WorldReply

FAST = settings(max_examples=150, deadline=None)

tags = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=24))
epochs = st.one_of(st.none(), st.integers(0, 2**63 - 1))
timeouts = st.one_of(st.none(), st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False))
local_sizes = st.integers(1, MAX_LOCAL_SIZE)
names = st.text(max_size=24)
offsets = st.integers(0, 2**40)
codecs = st.sampled_from([n + s for n in CODEC_NAMES for s in ("", LZ4_SUFFIX)])
reductions = st.sampled_from(OPS)
algos = st.sampled_from(list(ALGORITHMS))
dtypes = st.sampled_from(list(DTYPE_BY_NAME))
state_dtypes = st.sampled_from(["float32", "float16", "bfloat16", "int64", "int32", "uint8"])

all_reduces = st.builds(
    AllReduce,
    tag=tags,
    shm=names,
    count=offsets,
    dtype=dtypes,
    offset=offsets,
    reduction=reductions,
    codec=codecs,
    algo=algos,
    epoch=epochs,
    timeout_s=timeouts,
    local_size=local_sizes,
)
state_tensors = st.builds(
    StateTensor,
    names,
    names,
    offsets,
    state_dtypes,
    st.lists(st.integers(0, 1 << 20), max_size=4).map(tuple),
)
sync_states = st.builds(
    SyncState,
    tensors=st.lists(state_tensors, max_size=6, unique_by=lambda t: t.name).map(tuple),
    revision=st.integers(0, 2**63 - 1),
    epoch=epochs,
    timeout_s=timeouts,
    local_size=local_sizes,
)
requests: st.SearchStrategy[Request] = st.one_of(
    st.just(Hello()),
    st.just(GetWorld()),
    st.just(Leave()),
    st.builds(UpdateTopology, timeout_s=timeouts, local_size=local_sizes),
    all_reduces,
    sync_states,
    st.builds(Cancel, epoch=st.integers(0, 2**63 - 1), tag=tags),
    st.builds(
        BenchAllReduce,
        tag=tags,
        count=st.integers(1, 2**40),
        iters=st.integers(1, 1000),
        dtype=dtypes,
        reduction=reductions,
        codec=codecs,
        algo=algos,
        barrier=st.booleans(),
        epoch=epochs,
        timeout_s=timeouts,
    ),
    st.builds(Release, names),
)


def _over_msgpack(wire: dict[str, Any]) -> dict[str, Any]:
    """What the daemon decodes: the map as the SDK's transport sends it."""
    body = msgpack.packb({"id": 7, **wire}, use_bin_type=True)
    decoded: dict[str, Any] = msgpack.unpackb(body, raw=False, strict_map_key=True)
    return decoded


@FAST
@given(requests)
def test_every_request_survives_the_wire(request: Request) -> None:
    assert parse_request(request.to_wire()) == request
    assert parse_request(_over_msgpack(request.to_wire())) == request


def test_every_request_kind_is_covered_and_named_on_the_wire_by_op() -> None:
    kinds = [cls.KIND for cls in REQUEST_TYPES]
    assert len(set(kinds)) == len(kinds) == 14  # nine of localapi, five of collnet.wire.collectives
    assert Hello().to_wire() == {"op": "hello"}
    assert GetWorld().to_wire() == {"op": "world"}


def test_all_reduce_keeps_the_maps_older_daemons_read() -> None:
    # "op" is the request kind and "reduce" the reduction, as before; absent
    # fields stay absent, and local_size is only sent for a group of trainers.
    req = AllReduce(tag=3, shm="collnet-a", count=10, dtype="float32", reduction="avg", epoch=2)
    assert req.to_wire() == {
        "op": "all_reduce",
        "tag": 3,
        "epoch": 2,
        "shm": "collnet-a",
        "offset": 0,
        "count": 10,
        "dtype": "float32",
        "reduce": "avg",
        "codec": "none",
        "algo": "auto",
    }
    assert "local_size" not in UpdateTopology().to_wire()
    assert UpdateTopology(local_size=4).to_wire() == {"op": "update_topology", "local_size": 4}
    tensor = StateTensor("w", "collnet-b", 64, "float32", (2, 3))
    assert tensor.count == 6
    assert SyncState(tensors=(tensor,), revision=1).to_wire() == {
        "op": "sync_state",
        "tensors": [["w", "collnet-b", 64, "float32", [2, 3]]],
        "revision": 1,
    }


def test_defaults_unknown_keys_and_nil_fields() -> None:
    raw = {"id": 1, "op": "all_reduce", "tag": "t", "shm": "s", "count": 1, "dtype": "float32"}
    assert parse_request({**raw, "future_field": [1, 2], "epoch": None}) == AllReduce(
        tag="t", shm="s", count=1, dtype="float32"
    )
    assert parse_request({"op": "bench_all_reduce", "tag": "b", "count": 5}) == BenchAllReduce(
        tag="b", count=5
    )


def test_what_is_not_a_request_is_a_protocol_error() -> None:
    for obj in ([1, 2], {}, {"op": 5}, {"op": None}, {"op": b"hello"}):
        with pytest.raises(ProtocolError, match="string 'op'"):
            parse_request(obj)  # type: ignore[arg-type]


def test_an_unknown_request_kind_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unknown request 'format_disk'"):
        parse_request({"op": "format_disk"})


_AR: dict[str, Any] = {
    "op": "all_reduce",
    "tag": 1,
    "shm": "collnet-x",
    "count": 4,
    "dtype": "float32",
}
_SYNC: dict[str, Any] = {"op": "sync_state", "revision": 1, "tensors": []}
_BENCH: dict[str, Any] = {"op": "bench_all_reduce", "tag": "b", "count": 8}
_W = ["w", "collnet-x", 0, "float32", [2]]


def _one(*entry: Any) -> dict[str, Any]:
    """A sync_state request of one tensor entry, as given."""
    return {**_SYNC, "tensors": [list(entry)]}


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        # all_reduce
        pytest.param({"op": "all_reduce"}, "int or str 'tag'", id="ar-no-tag"),
        pytest.param({**_AR, "tag": [1]}, "int or str 'tag'", id="ar-tag-list"),
        pytest.param({**_AR, "tag": True}, "int or str 'tag'", id="ar-tag-bool"),
        pytest.param({**_AR, "count": "ten"}, "'count' must be int", id="ar-count-str"),
        pytest.param({**_AR, "count": True}, "'count' must be int", id="ar-count-bool"),
        pytest.param({**_AR, "count": -1}, "'count' must not be negative", id="ar-count-neg"),
        pytest.param({**_AR, "count": 1.0}, "'count' must be int", id="ar-count-float"),
        pytest.param({**_AR, "offset": False}, "'offset' must be int", id="ar-offset-bool"),
        pytest.param({**_AR, "offset": -8}, "'offset' must not be negative", id="ar-offset-neg"),
        pytest.param({**_AR, "shm": None}, "needs field 'shm'", id="ar-no-shm"),
        pytest.param({**_AR, "shm": 5}, "'shm' must be str", id="ar-shm-int"),
        pytest.param({**_AR, "dtype": "complex128"}, "unsupported dtype", id="ar-dtype"),
        pytest.param({**_AR, "dtype": 4}, "'dtype' must be str", id="ar-dtype-int"),
        pytest.param({**_AR, "reduce": "median"}, "unknown reduce op 'median'", id="ar-op"),
        pytest.param({**_AR, "algo": "tree"}, "unknown algorithm 'tree'", id="ar-algo"),
        pytest.param({**_AR, "codec": "zstd"}, "unknown codec 'zstd'", id="ar-codec"),
        pytest.param({**_AR, "codec": "uint8+zstd"}, "uint8+zstd", id="ar-codec-suffix"),
        pytest.param({**_AR, "epoch": True}, "bad epoch", id="ar-epoch-bool"),
        pytest.param({**_AR, "epoch": -1}, "bad epoch", id="ar-epoch-neg"),
        pytest.param({**_AR, "epoch": "3"}, "bad epoch", id="ar-epoch-str"),
        pytest.param({**_AR, "timeout_s": "5"}, "'timeout_s' must be a number", id="ar-to-str"),
        pytest.param({**_AR, "timeout_s": True}, "'timeout_s' must be a number", id="ar-to-bool"),
        pytest.param({**_AR, "timeout_s": float("nan")}, "must be a number", id="ar-to-nan"),
        pytest.param({**_AR, "timeout_s": -1.0}, "must be positive", id="ar-timeout-neg"),
        pytest.param({**_AR, "local_size": 0}, "local_size must be an int", id="ar-local-0"),
        pytest.param({**_AR, "local_size": True}, "local_size must be an int", id="ar-local-bool"),
        pytest.param({**_AR, "local_size": 257}, "local_size must be an int", id="ar-local-big"),
        # sync_state
        pytest.param({**_SYNC, "tensors": "w"}, "needs a list 'tensors'", id="sync-not-a-list"),
        pytest.param({**_SYNC, "tensors": [["w"]]}, "[name, shm, offset", id="sync-short"),
        pytest.param({**_SYNC, "tensors": [_W, _W]}, "distinct", id="sync-dup-name"),
        pytest.param({**_SYNC, "tensors": [[5, *_W[1:]]]}, "distinct strings", id="sync-name-int"),
        pytest.param(_one("w", 5, 0, "float32", [1]), "location", id="sync-shm"),
        pytest.param(_one("w", "s", True, "float32", [1]), "location", id="sync-off"),
        pytest.param(_one("w", "s", -1, "float32", [1]), "location", id="sync-neg"),
        pytest.param(_one("w", "s", 0, "float32", [-1]), "bad shape", id="sync-dim"),
        pytest.param(_one("w", "s", 0, "float32", [True]), "bad shape", id="sync-b"),
        pytest.param(_one("w", "s", 0, "float32", 3), "bad shape", id="sync-shape"),
        pytest.param(_one("w", "s", 0, "object", [1]), "unsupported state", id="sync-dt"),
        pytest.param(_one("w", "s", 0, 4, [1]), "bad dtype", id="sync-dt-int"),
        pytest.param({**_SYNC, "revision": -1}, "revision must be an int", id="sync-rev-neg"),
        pytest.param({**_SYNC, "revision": True}, "revision must be an int", id="sync-rev-bool"),
        pytest.param({**_SYNC, "revision": 2**63}, "revision must be an int", id="sync-rev-big"),
        pytest.param({**_SYNC, "revision": None}, "needs field 'revision'", id="sync-no-rev"),
        pytest.param({**_SYNC, "epoch": False}, "bad epoch", id="sync-epoch-bool"),
        pytest.param({**_SYNC, "local_size": "2"}, "local_size", id="sync-local-str"),
        # update_topology
        pytest.param({"op": "update_topology", "local_size": 1.5}, "local_size", id="ut-local"),
        pytest.param({"op": "update_topology", "timeout_s": [1]}, "timeout_s", id="ut-timeout"),
        # cancel
        pytest.param({"op": "cancel", "tag": 1}, "needs field 'epoch'", id="cancel-no-epoch"),
        pytest.param({"op": "cancel", "tag": 1, "epoch": True}, "bad epoch", id="cancel-epoch"),
        pytest.param({"op": "cancel", "epoch": 1}, "cancel needs an int or str", id="cancel-tag"),
        # bench_all_reduce
        pytest.param({**_BENCH, "count": 0}, "count >= 1", id="bench-count-0"),
        pytest.param({**_BENCH, "count": True}, "'count' must be int", id="bench-count-bool"),
        pytest.param({**_BENCH, "iters": 1001}, "iters <= 1000", id="bench-iters"),
        pytest.param({**_BENCH, "iters": False}, "'iters' must be int", id="bench-iters-bool"),
        pytest.param({**_BENCH, "dtype": "complex64"}, "unsupported dtype", id="bench-dtype"),
        pytest.param({**_BENCH, "barrier": 1}, "'barrier' must be bool", id="bench-barrier"),
        pytest.param({**_BENCH, "reduce": "median"}, "unknown reduce op", id="bench-op"),
        pytest.param({**_BENCH, "tag": None}, "needs an int or str", id="bench-tag"),
        # release
        pytest.param({"op": "release"}, "needs field 'shm'", id="release-no-shm"),
        pytest.param({"op": "release", "shm": 1}, "'shm' must be str", id="release-shm-int"),
    ],
)  # fmt: skip
def test_a_bad_field_is_an_invalid_argument_naming_it(raw: dict[str, Any], mentions: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_request(raw)
    assert mentions in info.value.message


@FAST
@given(all_reduces, st.sampled_from(["count", "offset", "epoch", "local_size", "tag"]))
def test_a_bool_is_never_taken_for_an_int(request: AllReduce, name: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_request({**request.to_wire(), name: True})


@FAST
@given(all_reduces, st.sampled_from(["dtype", "reduce", "codec", "algo", "count", "shm"]))
def test_a_refused_all_reduce_names_its_collective(request: AllReduce, name: str) -> None:
    # The daemon aborts (epoch, tag) on the other peers, who would otherwise wait.
    with pytest.raises(InvalidArgument) as info:
        parse_request({**request.to_wire(), name: ["not", "valid"]})
    assert info.value.fields["tag"] == request.tag
    assert info.value.fields.get("epoch") == request.epoch


def _world() -> WorldView:
    return WorldView(4, (PeerInfo("a", "10.0.0.1", 7000), PeerInfo("b", "::1", 7001)), ("c",))


def test_replies_survive_the_wire() -> None:
    hello = HelloReply("a", _world(), 512)
    assert HelloReply.from_wire(hello.to_wire()) == hello
    world = WorldReply(_world())
    assert WorldReply.from_wire(world.to_wire()) == world
    sync = SyncStateReply(3, ("w", "m"), ("b",), 1024, True, "ab" * 16, 2)
    assert SyncStateReply.from_wire(_over_msgpack(sync.to_wire())) == sync


def test_a_hello_without_block_size_is_an_older_daemon_using_the_default() -> None:
    reply = HelloReply.from_wire({"peer": "a", "world": _world().to_wire()})
    assert reply.codec_block_size == HelloReply("a", _world()).codec_block_size


@pytest.mark.parametrize(
    ("parse", "obj"),
    [
        (HelloReply.from_wire, [1]),
        (HelloReply.from_wire, {"peer": 5, "world": {"epoch": 1}}),
        (HelloReply.from_wire, {"peer": "a", "world": None}),
        (HelloReply.from_wire, {"peer": "a", "world": {"epoch": 1}, "codec_block_size": True}),
        (WorldReply.from_wire, {"world": {"epoch": "1"}}),
        (SyncStateReply.from_wire, {"revision": 1}),
        (SyncStateReply.from_wire, {**SyncStateReply(1, (), (), 0, True, "", 1).to_wire(),
                                    "fetched": [1]}),
        (SyncStateReply.from_wire, {**SyncStateReply(1, (), (), 0, True, "", 1).to_wire(),
                                    "in_parity": 1}),
    ],
)  # fmt: skip
def test_a_malformed_reply_is_a_protocol_error(parse: Any, obj: Any) -> None:
    with pytest.raises(ProtocolError):
        parse(obj)
