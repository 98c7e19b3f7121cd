"""The collnet frame format: a fixed binary header, msgpack metadata, raw payload.

One frame on the wire is::

    header   20 bytes, little-endian ``<4sBBHIQ``:
             magic b"CNET" | version u8 | kind u8 | flags u16 | meta_len u32 | payload_len u64
    meta     ``meta_len`` bytes: exactly one msgpack object (plain types only)
    payload  ``payload_len`` raw bytes (tensor data), never inside msgpack

Invariants:

- The header has a fixed size, so a reader always knows how many bytes to ask
  for next; both lengths are announced up front, so a receiver can refuse a
  frame (``FrameTooLarge``) before it allocates anything, and can place the
  payload straight into its final buffer.
- ``meta_len >= 1``: the meta is always one msgpack object (``None`` packs to
  one byte), so an empty meta is malformed.
- Meta holds only nil, bool, int, float, str, bin, array and map with str or
  bytes keys: no ext types (the built-in timestamp included), nothing that
  needs a hook to rebuild. Int keys are refused too, because int hashes are
  not randomised and would let a peer flood a dict with colliding keys.
- Encoding never copies the payload: ``encode_frame`` hands it back as given
  (or as a byte-format view over the same memory) next to the header bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from collnet.errors import FrameTooLarge, InvalidArgument

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "Frame",
    "FrameKind",
    "Header",
    "Limits",
    "encode_frame",
    "frame_bytes",
]

MAGIC = b"CNET"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQ")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 20

_MAX_FLAGS = 0xFFFF
_MAX_META_LEN = 0xFFFF_FFFF
_MAX_PAYLOAD_LEN = 0xFFFF_FFFF_FFFF_FFFF


class FrameKind(enum.IntEnum):
    """What a frame is for; the reader rejects any other value."""

    HELLO = 1
    DATA = 2
    ABORT = 3
    CONTROL = 4
    HEARTBEAT = 5
    # A bandwidth probe's piece on a data link (collnet.wire.topology.ProbePiece).
    PROBE = 6


@dataclass(frozen=True, slots=True)
class Limits:
    """The largest meta and payload a reader accepts; a frame over either is refused."""

    max_meta_bytes: int = 64 * 1024
    max_payload_bytes: int = 1 << 30


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed, validated frame header (what a payload sink gets to decide on)."""

    kind: FrameKind
    flags: int
    meta_len: int
    payload_len: int


@dataclass(slots=True)
class Frame:
    """One decoded frame. ``payload`` is the memory the payload was read into."""

    kind: FrameKind
    flags: int
    meta: Any
    payload: memoryview


def encode_frame(
    kind: FrameKind | int,
    meta: Any,
    payload: bytes | bytearray | memoryview = b"",
    flags: int = 0,
) -> tuple[bytes, memoryview | bytes]:
    """Encode a frame as (header + packed meta, payload).

    The payload is not copied: ``bytes`` come back as the same object, other
    buffers as a flat byte view over the same memory, so a transport can
    write both parts (``writelines``) without joining them. A payload must be
    C-contiguous; pass ``memoryview(array)`` for a numpy array.
    """
    if type(kind) is not FrameKind:
        try:
            kind = FrameKind(kind)
        except ValueError:
            raise InvalidArgument(f"unknown frame kind {kind!r}") from None
    if not isinstance(flags, int) or not 0 <= flags <= _MAX_FLAGS:
        raise InvalidArgument(f"flags {flags!r} are not a 16-bit unsigned int")
    try:
        packed = msgpack.packb(meta, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # ValueError covers UnicodeEncodeError (lone surrogates) and nesting too deep.
        raise InvalidArgument(f"frame meta cannot be packed as msgpack: {exc}") from exc
    meta_len = len(packed)
    if meta_len > _MAX_META_LEN:
        raise FrameTooLarge(
            f"meta {meta_len} bytes does not fit the u32 length field",
            part="meta",
            announced=meta_len,
            limit=_MAX_META_LEN,
        )

    body: memoryview | bytes
    if type(payload) is bytes:
        body = payload
        payload_len = len(payload)
    else:
        view = payload if isinstance(payload, memoryview) else memoryview(payload)
        if not view.c_contiguous:
            raise InvalidArgument("frame payload must be a C-contiguous buffer")
        # A transport slices and counts in bytes, so multi-byte or
        # multi-dimensional views are flattened (a view, not a copy).
        body = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        payload_len = body.nbytes
    if payload_len > _MAX_PAYLOAD_LEN:
        raise FrameTooLarge(
            f"payload {payload_len} bytes does not fit the u64 length field",
            part="payload",
            announced=payload_len,
            limit=_MAX_PAYLOAD_LEN,
        )
    head = HEADER.pack(MAGIC, VERSION, kind, flags, meta_len, payload_len) + packed
    return head, body


def frame_bytes(
    kind: FrameKind | int,
    meta: Any,
    payload: bytes | bytearray | memoryview = b"",
    flags: int = 0,
) -> bytes:
    """Encode a whole frame as one ``bytes`` (copies the payload: tests, small control frames)."""
    head, body = encode_frame(kind, meta, payload, flags)
    return head + body if len(body) else head
