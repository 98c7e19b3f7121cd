"""One error hierarchy for the core, the daemon and the SDK.

Every error carries what a user needs to act on it (which peer, which
collective, which epoch) and can be rebuilt on the far side of the daemon's
IPC socket from ``kind`` and ``fields`` alone (see ``to_wire``/``from_wire``),
so nothing is ever pickled.
"""

from __future__ import annotations

from typing import Any


class CollnetError(Exception):
    """Root of every error collnet raises on purpose."""

    kind = "CollnetError"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "fields": self.fields}

    @staticmethod
    def from_wire(obj: dict[str, Any]) -> CollnetError:
        cls = _BY_KIND.get(str(obj.get("kind")), CollnetError)
        fields = obj.get("fields") or {}
        return cls(str(obj.get("message", "")), **(fields if isinstance(fields, dict) else {}))


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
        MismatchError,
        CollectiveAborted,
        DaemonUnavailable,
        InvalidArgument,
        AuthError,
    )
}
