"""Errors cross the IPC socket as ``kind`` and ``fields``, and come back as the same type.

``buffer_modified`` is an attribute set at construction and travels among
the fields; ``WaitTimeout`` (a wait that gave up, its request still running)
is a ``Timeout`` of its own type.
"""

from __future__ import annotations

import msgpack
import pytest

from collnet.errors import (
    CollnetError,
    InvalidArgument,
    PeerLost,
    Timeout,
    WaitTimeout,
)


def _over_the_wire(exc: CollnetError) -> CollnetError:
    body = msgpack.packb(exc.to_wire(), use_bin_type=True)
    return CollnetError.from_wire(msgpack.unpackb(body, raw=False))


@pytest.mark.parametrize("modified", [True, False, None])
def test_buffer_modified_survives_the_wire_as_an_attribute(modified: bool | None) -> None:
    exc = PeerLost("b died", buffer_modified=modified, peer="b", epoch=3)
    back = _over_the_wire(exc)
    assert type(back) is PeerLost and back.message == "b died"
    assert back.buffer_modified is modified
    assert back.fields == {"peer": "b", "epoch": 3}  # the flag is not a field
    wire = exc.to_wire()["fields"]
    assert wire.get("buffer_modified") is modified and ("buffer_modified" in wire) == (
        modified is not None
    )


def test_a_flag_an_older_peer_wrote_into_the_fields_is_read_as_the_attribute() -> None:
    back = CollnetError.from_wire(
        {"kind": "Timeout", "message": "late", "fields": {"buffer_modified": True, "tag": 1}}
    )
    assert isinstance(back, Timeout) and back.buffer_modified is True
    assert back.fields == {"tag": 1}
    ignored = CollnetError.from_wire(
        {"kind": "Timeout", "message": "late", "fields": {"buffer_modified": "yes"}}
    )
    assert ignored.buffer_modified is None


def test_with_buffer_modified_is_a_copy_of_the_same_error() -> None:
    try:
        raise PeerLost("b died", buffer_modified=True, peer="b")
    except PeerLost as caught:
        original = caught
    copy = original.with_buffer_modified(False)
    assert type(copy) is PeerLost and copy is not original
    assert (copy.message, copy.fields, copy.peer) == ("b died", {"peer": "b"}, "b")
    assert copy.buffer_modified is False and original.buffer_modified is True
    assert copy.__traceback__ is original.__traceback__


def test_a_wait_timeout_is_a_timeout_of_its_own_kind() -> None:
    exc = WaitTimeout("no reply within 0.2s")
    assert isinstance(exc, Timeout) and exc.kind == "WaitTimeout"
    back = _over_the_wire(exc)
    assert type(back) is WaitTimeout
    assert type(_over_the_wire(Timeout("daemon deadline"))) is Timeout


def test_an_unknown_kind_comes_back_as_the_root_error() -> None:
    back = CollnetError.from_wire({"kind": "Martian", "message": "?", "fields": [1]})
    assert type(back) is CollnetError and back.fields == {}
    assert type(_over_the_wire(InvalidArgument("bad", codec="x"))) is InvalidArgument
