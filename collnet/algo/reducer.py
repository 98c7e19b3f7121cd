"""The data side of a chunked collective: where chunk bytes come from and go to.

``ChunkReducer`` owns the caller's tensor, the float32 accumulator of the
quantized path, and the scratch buffers; the schedules (``ring``, ``star``)
own only message bookkeeping and ask it to produce or absorb the bytes of one
chunk ``[a, b)`` (element offsets into the flat tensor).

Two paths:

- raw (``codec`` is None or named ``"none"``): payloads sent are memoryviews
  of the tensor's own bytes, never copies. Contributions to combine land in a
  pooled scratch array of the tensor's dtype and are combined in place;
  results land directly in the tensor (zero copy) and are forwarded as views
  of it. A schedule using this path must guarantee that the tensor bytes it
  sends are not written again until the receiver has consumed them.
- quantized (any other codec): partial results live in a float32 accumulator
  (the tensor itself when it is float32, else a float32 copy whose chunks are
  cast back into the tensor as each one becomes final). Every hop carries
  ``codec.encode`` of the accumulator chunk; the single owner of a result
  chunk encodes it once, replaces its own copy with the decode of those
  bytes, and those same bytes are forwarded unchanged to every other rank,
  which decodes them. Decoding is deterministic, so every rank ends with
  bit-identical results.

With ``op=None`` nothing is combined (broadcast, all-gather): any numeric
dtype is accepted on the raw path, ``finalize`` only quantizes once, and
``contribution_buffer``/``accumulate`` are never called.

Local encoding failures (``outgoing``/``finalize``: data the codec cannot
represent) escape as ``CodecError`` for the schedule to turn into an
``Abort``; undecodable received bytes become ``ProtocolError`` (the sender
is at fault).

Scratch is reused through free-lists, so a long collective allocates a
handful of chunk-sized buffers, not one per message. Methods must be called
one at a time (the schedules are not thread-safe).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from collnet.algo.ops import check_op, combine, finalize, is_float_dtype
from collnet.algo.partition import chunk_elems_for
from collnet.codec.base import Codec
from collnet.errors import CodecError, InvalidArgument, ProtocolError

# Upper bound on an encoded chunk of ``k`` float32 values: no sane codec
# needs more than 8 bytes a value plus a small header.
QUANTIZED_BYTES_PER_ELEM = 8
QUANTIZED_HEADER_BYTES = 1024

Token = tuple[npt.NDArray[Any], int]
"""A pending receive: the pooled array it lands in and its length (elements or bytes)."""


def check_tensor(buf: Any) -> None:
    """Raise ``InvalidArgument`` unless ``buf`` is a writable 1-D C-contiguous ndarray."""
    if not isinstance(buf, np.ndarray):
        raise InvalidArgument(f"collective buffer must be a numpy array, got {type(buf).__name__}")
    if buf.ndim != 1:
        raise InvalidArgument(f"collective buffer must be 1-D, got shape {buf.shape}")
    if not buf.flags.c_contiguous:
        raise InvalidArgument("collective buffer must be contiguous")
    if not buf.flags.writeable:
        raise InvalidArgument("collective buffer must be writable (the result is written in place)")


def is_quantized(codec: Codec | None) -> bool:
    """True when ``codec`` changes the bytes on the wire (anything but none)."""
    return codec is not None and codec.name != "none"


class ChunkReducer:
    """Produces and absorbs chunk payloads for one collective over ``buf``.

    ``op``: the reduce op, or None for a collective that only moves bytes.
    """

    def __init__(
        self,
        buf: npt.NDArray[Any],
        op: str | None,
        codec: Codec | None,
        world: int,
        chunk_bytes: int,
    ) -> None:
        check_tensor(buf)
        if op is not None:
            check_op(op, buf.dtype)
        elif buf.dtype.kind not in "biuf" and not is_float_dtype(buf.dtype):
            raise InvalidArgument(f"unsupported dtype {buf.dtype}", dtype=str(buf.dtype))
        self.buf = buf
        self.op = op
        self.world = world
        self.n = int(buf.shape[0])
        self.chunk_elems = chunk_elems_for(chunk_bytes, buf.dtype.itemsize)
        self.quantized = is_quantized(codec)
        self.codec = codec
        self._itemsize = buf.dtype.itemsize
        self._bytes = buf.view(np.uint8)
        # Scratch never needs more than one chunk, nor more than the tensor.
        self._scratch_elems = max(1, min(self.chunk_elems, self.n))
        self._free: list[npt.NDArray[Any]] = []
        self._sink = np.empty(0, dtype=np.uint8)
        if self.quantized:
            if not is_float_dtype(buf.dtype):
                raise InvalidArgument(
                    f"codec {codec.name if codec else None!r} needs a floating tensor, "
                    f"got {buf.dtype}",
                    dtype=str(buf.dtype),
                )
            if buf.dtype == np.float32:
                self.acc: npt.NDArray[np.float32] = buf
            else:
                self.acc = buf.astype(np.float32)
            self._cast_back = self.acc is not buf
            self._f32 = np.empty(self._scratch_elems, dtype=np.float32)

    # -- payloads this rank sends -------------------------------------------------

    def raw(self, a: int, b: int) -> memoryview:
        """A memoryview of the tensor's own bytes for elements ``[a, b)``."""
        return self._bytes[a * self._itemsize : b * self._itemsize].data

    def outgoing(self, a: int, b: int) -> memoryview:
        """The payload carrying this rank's (partial) chunk ``[a, b)``."""
        if not self.quantized:
            return self.raw(a, b)
        assert self.codec is not None
        return self.codec.encode(self.acc[a:b]).data

    def finalize(self, a: int, b: int) -> memoryview:
        """Make ``[a, b)`` final on its owner (avg divide, quantize once); return its payload."""
        if not self.quantized:
            self.settle(a, b)
            return self.raw(a, b)
        assert self.codec is not None
        acc = self.acc[a:b]
        if self.op is not None:
            finalize(self.op, acc, self.world)
        encoded = self.codec.encode(acc)
        self.codec.decode(encoded, b - a, out=acc)
        if self._cast_back:
            self.buf[a:b] = acc
        return encoded.data

    def settle(self, a: int, b: int) -> None:
        """Make ``[a, b)`` final on its owner without sending it: the avg divide
        (and the cast back into the tensor on the quantized path), no encoding."""
        if not self.quantized:
            if self.op is not None:
                finalize(self.op, self.buf[a:b], self.world)
            return
        acc = self.acc[a:b]
        if self.op is not None:
            finalize(self.op, acc, self.world)
        if self._cast_back:
            self.buf[a:b] = acc

    def finalize_local(self) -> None:
        """Finalize the whole tensor when this rank is alone (world 1)."""
        if self.op is not None:
            finalize(self.op, self.buf, self.world)

    # -- receives -----------------------------------------------------------------

    def check_nbytes(self, a: int, b: int, nbytes: int) -> None:
        """Raise ``ProtocolError`` unless ``nbytes`` is plausible for chunk ``[a, b)``."""
        if self.quantized:
            limit = QUANTIZED_BYTES_PER_ELEM * (b - a) + QUANTIZED_HEADER_BYTES
            if not 0 <= nbytes <= limit:
                raise ProtocolError(
                    f"encoded chunk of {b - a} values announced {nbytes} bytes (limit {limit})",
                    nbytes=nbytes,
                )
        elif nbytes != (b - a) * self._itemsize:
            raise ProtocolError(
                f"chunk of {b - a} {self.buf.dtype} values must be {(b - a) * self._itemsize} "
                f"bytes, peer announced {nbytes}",
                nbytes=nbytes,
            )

    def contribution_buffer(self, a: int, b: int, nbytes: int) -> tuple[memoryview, Token]:
        """Where a contribution to combine into ``[a, b)`` lands (pooled scratch)."""
        if not self.quantized:
            scratch = self._take_scratch()
            return scratch[: b - a].view(np.uint8).data, (scratch, b - a)
        return self._encoded_buffer(nbytes)

    def result_buffer(self, a: int, b: int, nbytes: int) -> tuple[memoryview, Token | None]:
        """Where the final bytes of ``[a, b)`` land: the tensor itself on the raw path."""
        if not self.quantized:
            return self.raw(a, b), None
        return self._encoded_buffer(nbytes)

    def accumulate(self, token: Token, a: int, b: int) -> None:
        """Combine a received contribution into ``[a, b)`` and recycle its buffer."""
        arr, length = token
        assert self.op is not None, "a copy collective combines nothing"
        if not self.quantized:
            combine(self.op, self.buf[a:b], arr[:length])
            self._free.append(arr)
            return
        assert self.codec is not None
        acc = self.acc[a:b]
        scratch = self._f32[: b - a]
        data = arr[:length]
        try:
            if self.op in ("sum", "avg"):
                self.codec.decode_add(data, acc, scratch)
            else:
                self.codec.decode(data, b - a, out=scratch)
                combine(self.op, acc, scratch)
        except CodecError as exc:
            raise ProtocolError(f"undecodable chunk: {exc.message}", nbytes=length) from exc
        finally:
            self._free.append(arr)

    def place(self, token: Token | None, a: int, b: int, forward: bool) -> memoryview | None:
        """Install received final bytes of ``[a, b)``; return them for forwarding if asked.

        On the quantized path the forwarded payload is the received bytes
        themselves, never a re-encoding.
        """
        if not self.quantized:
            return self.raw(a, b) if forward else None
        assert self.codec is not None and token is not None
        arr, length = token
        data = arr[:length]
        try:
            self.codec.decode(data, b - a, out=self.acc[a:b])
        except CodecError as exc:
            self._free.append(arr)
            raise ProtocolError(f"undecodable chunk: {exc.message}", nbytes=length) from exc
        if self._cast_back:
            self.buf[a:b] = self.acc[a:b]
        if forward:
            return data.data
        self._free.append(arr)
        return None

    def discard(self, token: Token | None) -> None:
        """Give back the buffer of a receive that will never be used."""
        if token is not None:
            self._free.append(token[0])

    def sink(self, nbytes: int) -> memoryview:
        """A throwaway buffer for a message that arrives after an abort."""
        limit = QUANTIZED_BYTES_PER_ELEM * self.chunk_elems + QUANTIZED_HEADER_BYTES
        if not 0 <= nbytes <= limit:
            raise ProtocolError(f"message of {nbytes} bytes exceeds any chunk ({limit})")
        if self._sink.shape[0] < nbytes:
            self._sink = np.empty(nbytes, dtype=np.uint8)
        return self._sink[:nbytes].data

    # -- pools --------------------------------------------------------------------

    def _take_scratch(self) -> npt.NDArray[Any]:
        if self._free:
            return self._free.pop()
        return np.empty(self._scratch_elems, dtype=self.buf.dtype)

    def _encoded_buffer(self, nbytes: int) -> tuple[memoryview, Token]:
        arr: npt.NDArray[Any] | None = self._free.pop() if self._free else None
        if arr is None or arr.shape[0] < nbytes:
            arr = np.empty(nbytes, dtype=np.uint8)
        return arr[:nbytes].data, (arr, nbytes)
