"""Messages on a data link between two daemons, one typed home for each.

A data link carries three kinds of frames besides its handshake and
heartbeats (see docs/protocol.md):

- DATA of a collective: metadata ``[epoch, tag, step, chunk, digest, offset,
  total]``. The link appends ``offset, total`` to the head the sender gives
  it, once per striped piece, so the receiver can place every piece without
  knowing the striping. ``digest`` is a hash of everything that shapes the
  messages (count, dtype, op, codec, algorithm, chunking): peers that run
  different collectives under one tag find out at the first piece. Step
  ``AGREE_STEP`` (chunk 0, no payload) is the collective's AGREE: the
  digest alone, sent to every member where the schedule's data does not
  prove agreement (``collnet.algo.actions.Schedule.needs_agreement``).
- DATA of a shared-state transfer: ``["S", fid, offset, total]``.
- ABORT of a collective: ``[epoch, tag, error]``; CONTROL of a state
  transfer: ``{"t": "fetch", "ranges": [[fid, fetch], ...]}`` and ``{"t":
  "fetch_error", "id": fid, "error": error}``.

Everything is validated here, once, where a frame is parsed; what comes out
is typed. Parsing a DATA head runs for every piece of every collective, so it
is a handful of type checks and no allocation beyond the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from collnet.errors import CollnetError, ProtocolError

# A collective is named by (epoch, tag) on every peer taking part.
Key = tuple[int, int | str]

STATE_DATA: Final = "S"
# Ranges per fetch message: keeps each request's metadata far below the frame limit.
RANGES_PER_FETCH: Final = 128
# The step of a collective's AGREE message; schedules number their steps from 0.
AGREE_STEP: Final = -1


@dataclass(frozen=True, slots=True)
class DataPiece:
    """A striped piece of message (step, chunk) of collective ``key``."""

    key: Key
    step: int
    chunk: int
    digest: int
    offset: int
    total: int


def data_head(key: Key, step: int, chunk: int, digest: int) -> list[Any]:
    """The metadata head of a collective's message; the link appends offset and total."""
    return [key[0], key[1], step, chunk, digest]


@dataclass(frozen=True, slots=True)
class StatePiece:
    """A striped piece of the answer to state fetch ``fid``."""

    fid: int
    offset: int
    total: int


def state_head(fid: int) -> list[Any]:
    return [STATE_DATA, fid]


def parse_data(meta: Any) -> DataPiece | StatePiece:
    """The typed metadata of a DATA frame; ``ProtocolError`` if it is malformed."""
    if type(meta) is not list:
        raise ProtocolError(f"bad DATA metadata {meta!r:.80}")
    if len(meta) == 7:
        epoch, tag, step, chunk, digest, offset, total = meta
        if (
            type(epoch) is int
            and type(step) is int
            and type(chunk) is int
            and type(digest) is int
            and type(offset) is int
            and type(total) is int
        ):
            if type(tag) is int or type(tag) is str:
                return DataPiece((epoch, tag), step, chunk, digest, offset, total)
            raise ProtocolError(f"bad DATA tag {tag!r:.40}")
    elif len(meta) == 4 and meta[0] == STATE_DATA:
        _, fid, offset, total = meta
        if type(fid) is int and type(offset) is int and type(total) is int:
            return StatePiece(fid, offset, total)
        raise ProtocolError(f"bad state DATA metadata {meta!r:.80}")
    raise ProtocolError(f"bad DATA metadata {meta!r:.80}")


@dataclass(frozen=True, slots=True)
class AbortMessage:
    """Collective ``key`` failed at the sender; ``error`` says why."""

    key: Key
    error: CollnetError

    def to_wire(self) -> list[Any]:
        return [self.key[0], self.key[1], self.error.to_wire()]

    @staticmethod
    def from_wire(meta: Any) -> AbortMessage:
        if (
            type(meta) is not list
            or len(meta) != 3
            or type(meta[0]) is not int
            or not (type(meta[1]) is int or type(meta[1]) is str)
            or not isinstance(meta[2], dict)
        ):
            raise ProtocolError(f"bad ABORT metadata {meta!r:.80}")
        return AbortMessage((meta[0], meta[1]), CollnetError.from_wire(meta[2]))


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Serve these byte ranges of the shared state: ``(fid, fetch)`` pairs, where
    ``fetch`` is a ``collnet.state.Fetch`` in wire form (checked by the server
    against what it declared)."""

    ranges: tuple[tuple[int, Any], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"t": "fetch", "ranges": [[fid, fetch] for fid, fetch in self.ranges]}


@dataclass(frozen=True, slots=True)
class FetchRefused:
    """The source cannot serve fetch ``fid``."""

    fid: int
    error: CollnetError

    def to_wire(self) -> dict[str, Any]:
        return {"t": "fetch_error", "id": self.fid, "error": self.error.to_wire()}


def parse_control(meta: Any) -> FetchRequest | FetchRefused:
    """The typed metadata of a CONTROL frame on a data link."""
    if not isinstance(meta, dict):
        raise ProtocolError(f"bad CONTROL metadata on a data link {meta!r:.80}")
    t = meta.get("t")
    if t == "fetch":
        ranges = meta.get("ranges")
        if type(ranges) is not list or not 0 < len(ranges) <= RANGES_PER_FETCH:
            raise ProtocolError("bad state fetch request")
        parsed: list[tuple[int, Any]] = []
        for item in ranges:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not int:
                raise ProtocolError("bad state fetch range")
            parsed.append((item[0], item[1]))
        return FetchRequest(tuple(parsed))
    if t == "fetch_error":
        fid, error = meta.get("id"), meta.get("error")
        if type(fid) is not int:
            raise ProtocolError(f"bad state fetch error id {fid!r:.40}")
        return FetchRefused(fid, CollnetError.from_wire(error if isinstance(error, dict) else {}))
    raise ProtocolError(f"unknown control message {t!r:.40} on a data link")
