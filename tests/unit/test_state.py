"""Tensor digests and state manifests: determinism, sensitivity, wire validation."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collnet.errors import InvalidArgument, ProtocolError
from collnet.state import (
    MAX_NAME_CHARS,
    MAX_TENSORS,
    StateManifest,
    TensorInfo,
    allocate,
    byte_view,
    manifest_of,
    numpy_dtype,
    tensor_digest,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.int64),
    np.dtype(np.uint8),
    np.dtype(np.bool_),
    np.dtype(np.complex64),
]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    count = int(np.prod(shape, dtype=np.int64))
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    arr: np.ndarray = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape).copy()
    return arr


def reencode(wire: Any) -> Any:
    """What actually arrives: the wire form through msgpack."""
    return msgpack.unpackb(msgpack.packb(wire), strict_map_key=False)


# ---------------------------------------------------------------- digests


def test_digest_is_32_lowercase_hex_and_deterministic() -> None:
    a = np.arange(1000, dtype=np.float32)
    d = tensor_digest(a)
    assert len(d) == 32 and set(d) <= set("0123456789abcdef")
    assert tensor_digest(a.copy()) == d
    # a fixed value: the digest is part of the protocol, so it must not drift
    # between versions or machines without a deliberate change of scheme
    assert tensor_digest(np.zeros(4, dtype=np.float32)) == "d6e26288a77c0f978b0dee223e9f0c92"
    assert tensor_digest(np.arange(6, dtype=np.int64).reshape(2, 3)) == (
        "d07b17b67a3db98f358545a5d11589b4"
    )


def test_digest_is_of_logical_content_not_memory_layout() -> None:
    c = np.arange(24, dtype=np.int32).reshape(4, 6)
    f = np.asfortranarray(c)
    assert not f.flags.c_contiguous
    assert tensor_digest(f) == tensor_digest(c)
    strided = np.arange(48, dtype=np.int32)[::2].reshape(4, 6)
    assert tensor_digest(strided) == tensor_digest(np.ascontiguousarray(strided))
    # and layout-equal but value-different arrays still differ
    assert tensor_digest(c.T.copy()) != tensor_digest(c)


@FAST
@given(arrays().filter(lambda a: a.nbytes > 0), st.data())
def test_digest_changes_on_any_single_bit_flip(arr: np.ndarray, data: st.DataObject) -> None:
    bit = data.draw(st.integers(0, arr.nbytes * 8 - 1))
    flipped = arr.copy()
    byte_view(flipped)[bit // 8] ^= np.uint8(1 << (bit % 8))
    assert tensor_digest(flipped) != tensor_digest(arr)


def test_digest_changes_on_dtype_reinterpretation() -> None:
    a = np.linspace(-3, 3, 64, dtype=np.float32)
    digests = {
        tensor_digest(a),
        tensor_digest(a.view(np.int32)),
        tensor_digest(a.view(np.uint32)),
        tensor_digest(a.view(np.uint8)),
        tensor_digest(a.view(np.float16)),
        tensor_digest(a.view(ml_dtypes.bfloat16)),
    }
    assert len(digests) == 6
    h = np.ones(8, dtype=np.float16)
    assert tensor_digest(h) != tensor_digest(h.view(ml_dtypes.bfloat16))


def test_digest_changes_on_reshape_including_empty_and_scalar_shapes() -> None:
    a = np.arange(12, dtype=np.float64)
    shapes = [(12,), (3, 4), (4, 3), (2, 6), (1, 12), (12, 1), (2, 2, 3)]
    assert len({tensor_digest(a.reshape(s)) for s in shapes}) == len(shapes)
    empties = [(0,), (0, 3), (3, 0), (0, 0), (1, 0, 2)]
    assert len({tensor_digest(np.zeros(s)) for s in empties}) == len(empties)
    assert tensor_digest(np.array(5.0)) != tensor_digest(np.array([5.0]))


@pytest.mark.parametrize(
    "arr",
    [
        np.array([1, "x"], dtype=object),
        np.zeros(3, dtype=">f4"),
        np.zeros(3, dtype="f4,i4"),
        np.array(["ab"]),
        np.zeros(2, dtype="M8[ns]"),
    ],
    ids=["object", "big-endian", "structured", "unicode", "datetime"],
)
def test_digest_rejects_dtypes_a_manifest_cannot_carry(arr: np.ndarray) -> None:
    with pytest.raises(InvalidArgument):
        tensor_digest(arr)


def test_byte_view_is_a_writable_view_and_refuses_non_contiguous() -> None:
    a = np.zeros((2, 3), dtype=ml_dtypes.bfloat16)
    v = byte_view(a)
    assert v.shape == (12,) and v.dtype == np.uint8
    v[0] = 0x80  # low byte of the first bf16 (little endian)
    assert byte_view(a)[0] == 0x80
    assert byte_view(np.array(1.5, dtype=np.float32)).shape == (4,)
    with pytest.raises(InvalidArgument):
        byte_view(np.zeros((4, 4))[:, ::2])


def test_numpy_dtype_resolves_every_supported_name_and_nothing_else() -> None:
    for dt in DTYPES:
        assert numpy_dtype(dt.name) == dt
    for bad in ["O", "f4", "<f4", ">f4", "float32,int8", "S5", "object", "float128", ""]:
        with pytest.raises(InvalidArgument):
            numpy_dtype(bad)


# ---------------------------------------------------------------- manifests


@st.composite
def states(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(min_size=1, max_size=12), max_size=6, unique=True))
    return {n: draw(arrays()) for n in names}


@FAST
@given(states(), st.integers(0, 2**63 - 1))
def test_manifest_wire_round_trip_through_msgpack(state: dict[str, np.ndarray], rev: int) -> None:
    m = manifest_of(state, rev)
    assert set(m.entries) == set(state)
    for name, arr in state.items():
        info = m.entries[name]
        assert info == TensorInfo(arr.dtype.name, arr.shape, arr.nbytes, tensor_digest(arr))
        assert allocate(info).shape == arr.shape and allocate(info).dtype == arr.dtype
    back = StateManifest.from_wire(reencode(m.to_wire()))
    assert back == m
    assert back.state_digest() == m.state_digest()
    assert hash(back) == hash(m)


def test_manifest_is_a_snapshot_not_a_view_of_the_callers_dict() -> None:
    info = TensorInfo.of(np.zeros(3, dtype=np.float32))
    entries = {"w": info}
    m = StateManifest(1, entries)
    entries["x"] = info
    assert set(m.entries) == {"w"}
    with pytest.raises(TypeError):
        m.entries["y"] = info  # type: ignore[index]


def test_state_digest_sees_content_and_names_but_not_revision() -> None:
    a = {"w": np.arange(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    base = manifest_of(a, 3)
    assert manifest_of(a, 4).state_digest() == base.state_digest()
    changed = dict(a, b=np.ones(2, dtype=np.float32))
    assert manifest_of(changed, 3).state_digest() != base.state_digest()
    renamed = {"w": a["w"], "c": a["b"]}
    assert manifest_of(renamed, 3).state_digest() != base.state_digest()
    assert manifest_of({"w": a["w"]}, 3).state_digest() != base.state_digest()


def test_manifest_of_rejects_state_it_cannot_describe() -> None:
    ok = np.zeros(2, dtype=np.float32)
    for bad_rev in [-1, 2**63, True, 1.0]:
        with pytest.raises(InvalidArgument):
            manifest_of({"w": ok}, bad_rev)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        manifest_of({"": ok}, 1)
    with pytest.raises(InvalidArgument):
        manifest_of({"x" * (MAX_NAME_CHARS + 1): ok}, 1)
    with pytest.raises(InvalidArgument):
        manifest_of({"w": np.zeros(2, dtype=">f8")}, 1)


GOOD_DIGEST = "0123456789abcdef0123456789abcdef"


def good_wire() -> dict[str, Any]:
    return {
        "revision": 7,
        "entries": {
            "w": ["float32", [2, 3], 24, GOOD_DIGEST],
            "e": ["bfloat16", [0], 0, GOOD_DIGEST],
            "s": ["int64", [], 8, GOOD_DIGEST],
        },
    }


def test_good_wire_decodes() -> None:
    m = StateManifest.from_wire(reencode(good_wire()))
    assert m.revision == 7
    assert m.entries["w"] == TensorInfo("float32", (2, 3), 24, GOOD_DIGEST)
    assert m.entries["s"].shape == () and m.nbytes == 32


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    wire = good_wire()
    target: Any = wire
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return wire


MALFORMED: list[tuple[str, Any]] = [
    ("not a map", [7, {}]),
    ("no revision", {"entries": {}}),
    ("revision str", _with(("revision",), "7")),
    ("revision bool", _with(("revision",), True)),
    ("revision negative", _with(("revision",), -1)),
    ("revision too big", _with(("revision",), 2**63)),
    ("entries list", _with(("entries",), [])),
    ("entry not list", _with(("entries", "w"), {"dtype": "float32"})),
    ("entry too short", _with(("entries", "w"), ["float32", [2, 3], 24])),
    ("entry too long", _with(("entries", "w"), ["float32", [2, 3], 24, GOOD_DIGEST, 0])),
    ("dtype unknown", _with(("entries", "w", 0), "float128")),
    ("dtype alias", _with(("entries", "w", 0), "f4")),
    ("dtype big endian", _with(("entries", "w", 0), ">f4")),
    ("dtype object", _with(("entries", "w", 0), "O")),
    ("dtype structured", _with(("entries", "w", 0), "float32,int32")),
    ("dtype not str", _with(("entries", "w", 0), 4)),
    ("shape not list", _with(("entries", "w", 1), 6)),
    ("shape negative", _with(("entries", "w", 1), [-2, -3])),
    ("shape float", _with(("entries", "w", 1), [2.0, 3])),
    ("shape bool", _with(("entries", "w", 1), [True, 6])),
    ("shape huge dim", _with(("entries", "w", 1), [10**30, 0])),
    ("shape too many dims", _with(("entries", "w", 1), [1] * 65)),
    ("nbytes negative", _with(("entries", "w", 2), -24)),
    ("nbytes inconsistent", _with(("entries", "w", 2), 25)),
    ("nbytes elements not bytes", _with(("entries", "w", 2), 6)),
    ("nbytes str", _with(("entries", "w", 2), "24")),
    ("nbytes huge", _with(("entries", "w", 2), 2**64)),
    ("digest short", _with(("entries", "w", 3), GOOD_DIGEST[:31])),
    ("digest long", _with(("entries", "w", 3), GOOD_DIGEST + "0")),
    ("digest upper", _with(("entries", "w", 3), GOOD_DIGEST.upper())),
    ("digest not hex", _with(("entries", "w", 3), "g" * 32)),
    ("digest bytes", _with(("entries", "w", 3), GOOD_DIGEST.encode())),
    ("digest newline", _with(("entries", "w", 3), GOOD_DIGEST + "\n")),
    ("name empty", {"revision": 1, "entries": {"": ["int8", [], 1, GOOD_DIGEST]}}),
    ("name bytes", {"revision": 1, "entries": {b"w": ["int8", [], 1, GOOD_DIGEST]}}),
    ("name int", {"revision": 1, "entries": {3: ["int8", [], 1, GOOD_DIGEST]}}),
    (
        "name too long",
        {"revision": 1, "entries": {"n" * (MAX_NAME_CHARS + 1): ["int8", [], 1, GOOD_DIGEST]}},
    ),
]


@pytest.mark.parametrize("wire", [w for _, w in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_manifest_is_a_protocol_error(wire: Any) -> None:
    with pytest.raises(ProtocolError):
        StateManifest.from_wire(wire)


def test_name_of_exactly_the_limit_is_accepted() -> None:
    wire = {"revision": 1, "entries": {"n" * MAX_NAME_CHARS: ["int8", [], 1, GOOD_DIGEST]}}
    assert len(StateManifest.from_wire(wire).entries) == 1


def test_too_many_entries_is_a_protocol_error() -> None:
    entry = ["int8", [], 1, GOOD_DIGEST]
    entries: dict[str, Any] = {f"t{i}": entry for i in range(MAX_TENSORS)}
    at_limit = {"revision": 1, "entries": entries}
    assert len(StateManifest.from_wire(at_limit).entries) == MAX_TENSORS
    entries["one more"] = entry
    with pytest.raises(ProtocolError, match="limit"):
        StateManifest.from_wire(at_limit)


garbage = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=5)
    ),
    max_leaves=25,
)


def _accepted_or_protocol_error(wire: Any) -> None:
    try:
        m = StateManifest.from_wire(wire)
    except ProtocolError:
        return
    # anything accepted must be a manifest that survives its own round trip
    assert StateManifest.from_wire(reencode(m.to_wire())) == m


@settings(max_examples=300, deadline=None)
@given(garbage)
def test_garbage_manifest_is_a_protocol_error_and_nothing_else(wire: Any) -> None:
    _accepted_or_protocol_error(wire)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["revision", "entries", "extra"]),
        garbage | st.dictionaries(st.text(max_size=4), garbage, max_size=3),
        max_size=3,
    )
)
def test_garbage_manifest_shaped_map_is_a_protocol_error_and_nothing_else(wire: Any) -> None:
    _accepted_or_protocol_error(wire)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["w", "e", "s"]), st.integers(0, 3), garbage)
def test_one_garbage_field_in_a_good_manifest_is_a_protocol_error_or_valid(
    name: str, field: int, value: Any
) -> None:
    _accepted_or_protocol_error(_with(("entries", name, field), value))
