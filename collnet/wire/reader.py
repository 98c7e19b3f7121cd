"""Incremental, zero-copy frame decoding, shaped for ``asyncio.BufferedProtocol``.

A ``FrameReader`` is a three-stage machine, HEADER -> META -> PAYLOAD -> HEADER,
driven by ``get_buffer()`` (where the next bytes must go) and
``buffer_updated(n)`` (how many arrived there). It owns no socket: a transport
protocol forwards its own ``get_buffer``/``buffer_updated`` calls here, and a
test or a small control channel uses ``feed``.

Invariants:

- ``get_buffer()`` never returns an empty view and never spans two stages, so
  a single receive cannot run past the current header, meta or payload: the
  payload goes straight into the memory a ``payload_sink`` chose (a slice of
  a preallocated tensor, say) and is never copied afterwards.
- Lengths are checked against ``Limits`` as soon as the header is complete,
  before anything is allocated; a frame costs at most
  ``HEADER_SIZE + max_meta_bytes + max_payload_bytes`` bytes of memory.
- Everything the peer sends is validated; a violation raises ``ProtocolError``
  (``FrameTooLarge`` for lengths over the limits) and no other type. The
  reader is then failed for good: the stream position is lost, so every later
  call raises ``ProtocolError`` and the connection must be closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from collnet.errors import CollnetError, FrameTooLarge, ProtocolError
from collnet.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Frame,
    FrameKind,
    Header,
    Limits,
)

__all__ = ["FrameReader", "PayloadSink"]

PayloadSink = Callable[[Header, Any], memoryview | None]
"""Chooses where a payload lands: a writable view of exactly ``payload_len`` bytes,
or ``None`` to let the reader allocate. Called once header and meta are valid."""

_HEADER = 0
_META = 1
_PAYLOAD = 2
_FAILED = 3
_STAGE_NAMES = ("header", "meta", "payload")

_KINDS: dict[int, FrameKind] = {int(k): k for k in FrameKind}
_DEFAULT_LIMITS = Limits()
_EMPTY = memoryview(b"")
_unpack_header = HEADER.unpack_from
_unpackb = msgpack.unpackb
_Timestamp = msgpack.Timestamp


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"frame meta uses msgpack ext type {code}; meta must be plain msgpack")


def _holds_timestamp(obj: Any) -> bool:
    # Iterative: a peer controls the nesting depth (msgpack caps it, but far
    # above what Python recursion should be trusted with).
    stack = [obj]
    while stack:
        item = stack.pop()
        cls = type(item)
        if cls is list:
            stack.extend(item)
        elif cls is dict:
            # Keys need no look: strict_map_key already allows only str and bytes.
            stack.extend(item.values())
        elif cls is _Timestamp:
            return True
    return False


def _decode_meta(buf: bytearray) -> Any:
    n = len(buf)
    try:
        # Every max_*_len is bounded by the meta's own size, so a tiny meta
        # cannot announce a huge array or string and make msgpack allocate it.
        meta = _unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=n,
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData as exc:
        raise ProtocolError(
            f"frame meta has {len(exc.extra)} trailing bytes after its msgpack object"
        ) from exc
    except msgpack.StackError as exc:
        raise ProtocolError("frame meta is nested too deeply") from exc
    except msgpack.FormatError as exc:
        raise ProtocolError("frame meta holds a byte that is not valid msgpack") from exc
    except Exception as exc:
        # Untrusted bytes: whatever msgpack raises (ValueError, UnicodeDecodeError,
        # TypeError for unhashable keys, ...) is the peer's fault, reported as one type.
        raise ProtocolError(
            f"frame meta is not valid msgpack: {type(exc).__name__}: {exc}"
        ) from exc
    # The timestamp ext (type -1) bypasses ext_hook; its encodings all carry
    # a 0xff type byte, so the walk only runs for metas that contain one.
    if b"\xff" in buf and _holds_timestamp(meta):
        raise ProtocolError("frame meta uses msgpack ext type -1; meta must be plain msgpack")
    return meta


def _as_payload_target(view: Any, payload_len: int) -> memoryview:
    try:
        target = view if isinstance(view, memoryview) else memoryview(view)
    except TypeError as exc:
        raise ProtocolError(
            f"payload sink returned {type(view).__name__}, not a writable buffer"
        ) from exc
    if target.readonly:
        raise ProtocolError("payload sink returned a read-only view")
    if not target.c_contiguous:
        # recv_into needs one contiguous region.
        raise ProtocolError("payload sink returned a non-contiguous view")
    if target.nbytes != payload_len:
        raise ProtocolError(
            f"payload sink returned {target.nbytes} bytes for a {payload_len}-byte payload"
        )
    if target.ndim != 1 or target.format != "B":
        # Positions are counted in bytes, so slicing must be too.
        target = target.cast("B")
    return target


class FrameReader:
    """Decodes a byte stream into ``Frame``s, writing each payload where ``payload_sink`` says.

    ``payload_sink(header, meta)`` runs once per frame with a non-empty
    payload, after header and meta are validated. It returns a writable view
    of exactly ``header.payload_len`` bytes, which becomes ``Frame.payload``,
    or ``None`` for a fresh ``bytearray``. A sink may raise (a ``CollnetError``
    to refuse the frame); the exception propagates and the reader is failed.
    """

    __slots__ = (
        "_error",
        "_flags",
        "_header_view",
        "_kind",
        "_max_meta",
        "_max_payload",
        "_meta",
        "_meta_buf",
        "_meta_len",
        "_need",
        "_payload_len",
        "_pos",
        "_sink",
        "_stage",
        "_target",
        "limits",
    )

    def __init__(
        self,
        limits: Limits = _DEFAULT_LIMITS,
        payload_sink: PayloadSink | None = None,
    ) -> None:
        self.limits = limits
        self._max_meta = limits.max_meta_bytes
        self._max_payload = limits.max_payload_bytes
        self._sink = payload_sink
        # One header buffer for the reader's life: no allocation per header.
        self._header_view = memoryview(bytearray(HEADER_SIZE))
        self._stage = _HEADER
        self._target = self._header_view
        self._pos = 0
        self._need = HEADER_SIZE
        self._kind = FrameKind.HELLO
        self._flags = 0
        self._meta_len = 0
        self._payload_len = 0
        self._meta_buf = bytearray()
        self._meta: Any = None
        self._error = ""

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered (a clean place for the stream to end)."""
        return self._stage == _HEADER and self._pos == 0

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """The writable region the next received bytes must be written to.

        ``sizehint`` is accepted for ``BufferedProtocol`` compatibility and
        ignored: the stage decides the size.
        """
        if self._stage == _FAILED:
            raise self._failed_earlier()
        pos = self._pos
        return self._target[pos:] if pos else self._target

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Account for ``nbytes`` written into the last ``get_buffer()`` view.

        Returns the frames this completed: none or one.
        """
        if self._stage == _FAILED:
            raise self._failed_earlier()
        pos = self._pos + nbytes
        if nbytes >= 0 and pos < self._need:
            self._pos = pos
            return []
        try:
            if nbytes < 0 or pos > self._need:
                raise ProtocolError(
                    f"buffer_updated({nbytes}) does not fit the "
                    f"{self._need - self._pos}-byte buffer handed out"
                )
            frame = self._stage_complete()
        except BaseException as exc:
            self._fail(exc)
            raise
        return [] if frame is None else [frame]

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Copy ``data`` in through ``get_buffer``/``buffer_updated``; return the frames completed.

        If ``data`` holds a protocol violation the error is raised and frames
        completed earlier in the same call are dropped with the connection.
        """
        if self._stage == _FAILED:
            raise self._failed_earlier()
        src = data if isinstance(data, memoryview) else memoryview(data)
        if src.ndim != 1 or src.format != "B":
            src = src.cast("B")
        frames: list[Frame] = []
        off = 0
        total = len(src)
        while off < total:
            dst = self.get_buffer()
            n = min(len(dst), total - off)
            dst[:n] = src[off : off + n]
            off += n
            frames += self.buffer_updated(n)
        return frames

    def eof_received(self) -> None:
        """Tell the reader the stream ended; raises ``ProtocolError`` if it ended mid-frame."""
        if self._stage == _FAILED:
            raise self._failed_earlier()
        if self.at_frame_boundary:
            return
        exc = ProtocolError(
            f"stream ended inside a frame's {_STAGE_NAMES[self._stage]} "
            f"({self._pos} of {self._need} bytes received)"
        )
        self._fail(exc)
        raise exc

    # -- stages ---------------------------------------------------------------

    def _stage_complete(self) -> Frame | None:
        stage = self._stage
        if stage == _HEADER:
            self._parse_header()
            return None
        if stage == _META:
            meta = _decode_meta(self._meta_buf)
            payload_len = self._payload_len
            if payload_len == 0:
                frame = Frame(self._kind, self._flags, meta, _EMPTY)
                self._next_frame()
                return frame
            self._meta = meta
            self._target = self._payload_target(meta, payload_len)
            self._stage = _PAYLOAD
            self._pos = 0
            self._need = payload_len
            return None
        frame = Frame(self._kind, self._flags, self._meta, self._target)
        self._next_frame()
        return frame

    def _parse_header(self) -> None:
        magic, version, kind, flags, meta_len, payload_len = _unpack_header(self._header_view)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
        if version != VERSION:
            raise ProtocolError(f"unsupported frame version {version} (expected {VERSION})")
        frame_kind = _KINDS.get(kind)
        if frame_kind is None:
            raise ProtocolError(f"unknown frame kind {kind}")
        if meta_len > self._max_meta:
            raise FrameTooLarge(
                f"meta {meta_len} bytes exceeds limit {self._max_meta}",
                part="meta",
                announced=meta_len,
                limit=self._max_meta,
            )
        if payload_len > self._max_payload:
            raise FrameTooLarge(
                f"payload {payload_len} bytes exceeds limit {self._max_payload}",
                part="payload",
                announced=payload_len,
                limit=self._max_payload,
            )
        if meta_len == 0:
            raise ProtocolError("frame meta is empty (expected one msgpack object)")
        self._kind = frame_kind
        self._flags = flags
        self._meta_len = meta_len
        self._payload_len = payload_len
        self._meta_buf = bytearray(meta_len)
        self._target = memoryview(self._meta_buf)
        self._stage = _META
        self._pos = 0
        self._need = meta_len

    def _payload_target(self, meta: Any, payload_len: int) -> memoryview:
        sink = self._sink
        if sink is not None:
            header = Header(self._kind, self._flags, self._meta_len, payload_len)
            view = sink(header, meta)
            if view is not None:
                return _as_payload_target(view, payload_len)
        return memoryview(bytearray(payload_len))

    def _next_frame(self) -> None:
        self._stage = _HEADER
        self._target = self._header_view
        self._pos = 0
        self._need = HEADER_SIZE
        # Drop the reference so a delivered frame's meta is the caller's alone.
        self._meta = None

    # -- failure --------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self._stage = _FAILED
        self._error = str(exc) if isinstance(exc, CollnetError) else f"{type(exc).__name__}: {exc}"
        self._target = _EMPTY
        self._meta = None
        self._meta_buf = bytearray()

    def _failed_earlier(self) -> ProtocolError:
        return ProtocolError(f"reader failed earlier: {self._error}")
