"""One error hierarchy for the core, the daemon and the SDK.

Every error carries what a user needs to act on it (which peer, which
collective, which epoch) and can be rebuilt on the far side of the daemon's
IPC socket from ``kind`` and ``fields`` alone (see ``to_wire``/``from_wire``),
so nothing is ever pickled.

``buffer_modified`` says what a failed collective left in the caller's
tensor: True when the daemon may have written into it (partial sums), False
when it still holds the input, None when it does not apply. It is an
attribute set at construction; code that learns better later (the SDK knows a
staged tensor was never written back) raises a copy made by
``with_buffer_modified`` rather than editing the error it caught.
"""

from __future__ import annotations

from typing import Any, Self


class CollnetError(Exception):
    """Root of every error collnet raises on purpose."""

    kind = "CollnetError"

    def __init__(self, message: str, *, buffer_modified: bool | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.buffer_modified = buffer_modified
        self.fields = fields

    def with_buffer_modified(self, buffer_modified: bool | None) -> Self:
        """This error (same class, message and fields) saying ``buffer_modified``.

        The copy keeps the traceback and cause, so raising it reads like
        re-raising the original.
        """
        copy = type(self)(self.message, buffer_modified=buffer_modified, **self.fields)
        copy.__cause__ = self.__cause__
        copy.__suppress_context__ = self.__suppress_context__
        return copy.with_traceback(self.__traceback__)

    def to_wire(self) -> dict[str, Any]:
        fields = self.fields
        if self.buffer_modified is not None:
            fields = {**fields, "buffer_modified": self.buffer_modified}
        return {"kind": self.kind, "message": self.message, "fields": fields}

    @staticmethod
    def from_wire(obj: dict[str, Any]) -> CollnetError:
        cls = _BY_KIND.get(str(obj.get("kind")), CollnetError)
        fields = obj.get("fields")
        fields = dict(fields) if isinstance(fields, dict) else {}
        modified = fields.pop("buffer_modified", None)
        return cls(
            str(obj.get("message", "")),
            buffer_modified=modified if isinstance(modified, bool) else None,
            **fields,
        )


class ProtocolError(CollnetError):
    """A peer or client broke the wire protocol: bad magic, oversized frame, bad field."""

    kind = "ProtocolError"


class FrameTooLarge(ProtocolError):
    """A frame announced a metadata or payload length above the configured limit."""

    kind = "FrameTooLarge"


class CodecError(CollnetError):
    """A tensor cannot be encoded or decoded by the chosen codec."""

    kind = "CodecError"


class NonFiniteError(CodecError):
    """A quantizing codec was given NaN or Inf, which it has no code for."""

    kind = "NonFiniteError"


class PeerLost(CollnetError):
    """A peer taking part in a collective died or became unreachable."""

    kind = "PeerLost"

    @property
    def peer(self) -> str | None:
        peer = self.fields.get("peer")
        return None if peer is None else str(peer)


class Timeout(CollnetError):
    """An operation did not finish within its deadline."""

    kind = "Timeout"


class WaitTimeout(Timeout):
    """A wait in the SDK ran out of time before the daemon answered.

    Only the caller's wait gave up: the request is still running in the
    daemon (and may still succeed or fail). Wait again, or cancel it. A
    ``Timeout`` that is not a ``WaitTimeout`` is the daemon's verdict: the
    operation itself failed.
    """

    kind = "WaitTimeout"


class MismatchError(CollnetError):
    """Peers disagree on a collective's shape, dtype, op, codec or algorithm."""

    kind = "MismatchError"


class CollectiveAborted(CollnetError):
    """A collective was aborted (cancelled locally, or aborted by another peer)."""

    kind = "CollectiveAborted"


class DaemonUnavailable(CollnetError):
    """The local daemon cannot be reached or has gone away."""

    kind = "DaemonUnavailable"


class InvalidArgument(CollnetError):
    """A caller asked for something unsupported (unknown codec, avg over ints, ...)."""

    kind = "InvalidArgument"


class AuthError(CollnetError):
    """A handshake failed: wrong or missing shared secret."""

    kind = "AuthError"


_BY_KIND: dict[str, type[CollnetError]] = {
    cls.kind: cls
    for cls in (
        CollnetError,
        ProtocolError,
        FrameTooLarge,
        CodecError,
        NonFiniteError,
        PeerLost,
        Timeout,
        WaitTimeout,
        MismatchError,
        CollectiveAborted,
        DaemonUnavailable,
        InvalidArgument,
        AuthError,
    )
}
