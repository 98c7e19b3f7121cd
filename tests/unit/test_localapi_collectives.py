"""Broadcast, all-gather, all-gather-v, reduce-scatter and barrier requests on the wire.

Round trips through ``parse_request`` (and msgpack), and every bad field refused
with an ``InvalidArgument`` that names its collective, so the daemon can refuse
it on the other peers at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collnet.algo.ops import DTYPE_BY_NAME, OPS
from collnet.algo.select import BROADCAST_ALGORITHMS
from collnet.codec.registry import CODEC_NAMES
from collnet.errors import InvalidArgument
from collnet.membership.bounds import MAX_WORLD_PEERS
from collnet.wire.collectives import (
    COLLECTIVE_TYPES,
    AllGather,
    AllGatherV,
    Barrier,
    Broadcast,
    CollectiveRequest,
    ReduceScatter,
    counts_tag,
)
from collnet.wire.fields import MAX_LOCAL_SIZE
from collnet.wire.localapi import REQUEST_TYPES, parse_request

FAST = settings(max_examples=100, deadline=None)

tags = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=24))
epochs = st.one_of(st.none(), st.integers(0, 2**63 - 1))
timeouts = st.one_of(st.none(), st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False))
local_sizes = st.integers(1, 256)
names = st.text(max_size=24)
ints = st.integers(0, 2**40)
codecs = st.sampled_from(CODEC_NAMES)
dtypes = st.sampled_from(list(DTYPE_BY_NAME))
common = {
    "tag": tags,
    "shm": names,
    "count": ints,
    "dtype": dtypes,
    "offset": ints,
    "codec": codecs,
    "epoch": epochs,
    "timeout_s": timeouts,
    "local_size": local_sizes,
}
broadcasts = st.builds(
    Broadcast, root=st.integers(0, 1023), algo=st.sampled_from(BROADCAST_ALGORITHMS), **common
)
all_gathers = st.builds(AllGather, out_shm=names, out_offset=ints, **common)
counts = st.lists(st.integers(0, 2**40), min_size=1, max_size=9).map(tuple)
all_gather_vs = st.one_of(
    st.builds(AllGatherV, **common),
    st.builds(AllGatherV, out_shm=names, out_offset=ints, counts=counts, **common),
)
reduce_scatters = st.builds(
    ReduceScatter, out_shm=names, out_offset=ints, reduction=st.sampled_from(OPS), **common
)
barriers = st.builds(Barrier, tag=tags, epoch=epochs, timeout_s=timeouts, local_size=local_sizes)


def _with_local_rank(request: CollectiveRequest) -> st.SearchStrategy[CollectiveRequest]:
    """``request`` as one of its local group's trainers."""
    return st.integers(0, request.local_size - 1).map(
        lambda rank: dataclasses.replace(request, local_rank=rank)
    )


tensor_requests = st.one_of(broadcasts, all_gathers, all_gather_vs, reduce_scatters).flatmap(
    _with_local_rank
)
requests: st.SearchStrategy[CollectiveRequest] = st.one_of(
    tensor_requests, barriers.flatmap(_with_local_rank)
)


@FAST
@given(requests)
def test_every_collective_request_survives_the_wire(request: CollectiveRequest) -> None:
    assert parse_request(request.to_wire()) == request
    unpacked = msgpack.unpackb(msgpack.packb(request.to_wire()), raw=False)
    assert parse_request(unpacked) == request


def test_the_local_api_knows_every_collective_kind() -> None:
    assert set(COLLECTIVE_TYPES) <= set(REQUEST_TYPES)
    kinds = {cls.KIND for cls in COLLECTIVE_TYPES}
    assert kinds == {"broadcast", "all_gather", "all_gather_v", "reduce_scatter", "barrier"}


def test_maps_leave_out_what_is_absent() -> None:
    assert Barrier(tag=4).to_wire() == {"op": "barrier", "tag": 4}
    req = AllGatherV(tag="g", shm="s", count=3, dtype="int32")
    assert req.to_wire() == {
        "op": "all_gather_v",
        "tag": "g",
        "shm": "s",
        "offset": 0,
        "count": 3,
        "dtype": "int32",
        "out_offset": 0,
        "codec": "none",
    }
    rs = ReduceScatter(tag=1, shm="s", count=3, dtype="float32", out_shm="o", reduction="max")
    assert rs.to_wire()["reduce"] == "max"  # the same key as the all-reduce's


def test_the_counts_phase_has_a_tag_of_its_own_that_keeps_int_and_str_tags_apart() -> None:
    assert counts_tag(5) != counts_tag("5")
    assert counts_tag(5) != 5 and isinstance(counts_tag(5), str)


_BC: dict[str, Any] = {
    "op": "broadcast",
    "tag": 7,
    "shm": "s",
    "count": 4,
    "dtype": "float32",
    "root": 0,
}
_AG: dict[str, Any] = {
    "op": "all_gather",
    "tag": 7,
    "shm": "s",
    "count": 4,
    "dtype": "float32",
    "out_shm": "o",
}
_AGV: dict[str, Any] = {"op": "all_gather_v", "tag": 7, "shm": "s", "count": 4, "dtype": "int32"}
_RS: dict[str, Any] = {
    "op": "reduce_scatter",
    "tag": 7,
    "shm": "s",
    "count": 4,
    "dtype": "float32",
    "out_shm": "o",
}


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        pytest.param({**_BC, "root": None}, "needs field 'root'", id="bc-no-root"),
        pytest.param({**_BC, "root": -1}, "'root' must not be negative", id="bc-root-neg"),
        pytest.param({**_BC, "root": True}, "'root' must be int", id="bc-root-bool"),
        pytest.param({**_BC, "algo": "ring"}, "unknown broadcast algorithm", id="bc-algo"),
        pytest.param({**_BC, "codec": "zstd"}, "unknown codec", id="bc-codec"),
        pytest.param({**_BC, "dtype": "complex64"}, "unsupported dtype", id="bc-dtype"),
        pytest.param({**_BC, "count": 1.5}, "'count' must be int", id="bc-count"),
        pytest.param({**_BC, "shm": None}, "needs field 'shm'", id="bc-shm"),
        pytest.param({**_AG, "out_shm": None}, "needs field 'out_shm'", id="ag-no-out"),
        pytest.param({**_AG, "out_offset": -1}, "must not be negative", id="ag-out-off"),
        pytest.param({**_AG, "timeout_s": 0}, "must be positive", id="ag-timeout"),
        pytest.param({**_AG, "local_size": 0}, "local_size", id="ag-local"),
        pytest.param({**_AGV, "counts": [1, 2]}, "come together", id="agv-counts-alone"),
        pytest.param({**_AGV, "out_shm": "o"}, "come together", id="agv-out-alone"),
        pytest.param({**_AGV, "out_shm": "o", "counts": []}, "'counts' must", id="agv-empty"),
        pytest.param({**_AGV, "out_shm": "o", "counts": [-1]}, "non-negative", id="agv-neg"),
        pytest.param({**_AGV, "out_shm": "o", "counts": [True]}, "non-negative", id="agv-bool"),
        pytest.param({**_AGV, "out_shm": "o", "counts": 3}, "'counts' must", id="agv-int"),
        pytest.param(
            {**_AGV, "out_shm": "o", "counts": [0] * (MAX_WORLD_PEERS * MAX_LOCAL_SIZE + 1)},
            "'counts' must",
            id="agv-too-many",
        ),
        pytest.param({**_RS, "reduce": "median"}, "unknown reduce op", id="rs-op"),
        pytest.param({**_RS, "out_shm": 3}, "'out_shm' must be str", id="rs-out"),
        pytest.param({"op": "barrier", "tag": 1, "timeout_s": "x"}, "timeout_s", id="bar-to"),
        pytest.param({"op": "barrier", "tag": 1, "local_size": 300}, "local_size", id="bar-local"),
        pytest.param({"op": "barrier", "tag": 1, "epoch": -2}, "bad epoch", id="bar-epoch"),
        pytest.param({"op": "barrier", "tag": 1, "local_rank": 1}, "local_rank", id="bar-lrank"),
        pytest.param({**_AG, "local_size": 2, "local_rank": 2}, "local_rank", id="ag-lrank"),
        pytest.param({**_RS, "local_size": 2, "local_rank": -1}, "local_rank", id="rs-lrank"),
        pytest.param({**_BC, "local_size": 2, "local_rank": True}, "local_rank", id="bc-lrank"),
    ],
)
def test_a_bad_field_is_an_invalid_argument_naming_it(raw: dict[str, Any], mentions: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_request(raw)
    assert mentions in info.value.message


@pytest.mark.parametrize("base", [_BC, _AG, _AGV, _RS, {"op": "barrier"}], ids=lambda b: b["op"])
@pytest.mark.parametrize("tag", [None, True, [1], 1.5])
def test_a_request_without_a_valid_tag_is_refused(base: dict[str, Any], tag: Any) -> None:
    with pytest.raises(InvalidArgument, match="int or str 'tag'"):
        parse_request({**base, "tag": tag})


@FAST
@given(tensor_requests, st.sampled_from(["dtype", "codec", "count", "shm", "offset"]))
def test_a_refused_collective_names_itself_so_peers_are_told(
    request: CollectiveRequest, name: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_request({**request.to_wire(), name: ["not", "valid"]})
    assert info.value.fields["tag"] == request.tag
    assert info.value.fields.get("epoch") == request.epoch


@FAST
@given(barriers)
def test_a_refused_barrier_names_itself(request: Barrier) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_request({**request.to_wire(), "local_size": True})
    assert info.value.fields["tag"] == request.tag
