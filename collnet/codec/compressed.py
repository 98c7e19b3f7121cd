"""``<inner>+lz4``: any fixed-size codec's bytes, compressed with an lz4 block.

Layout::

    byte 0     mode: 0 = stored (the inner encoding follows as is)
                     1 = lz4    (one lz4 block, no size prefix, follows)
    byte 1..   payload

The encoder stores the inner bytes when lz4 would not make them smaller
(gradients quantized to fp16 are often incompressible), so the encoding is
never more than one byte longer than the inner one.

Invariants:

- The inner codec must be fixed-size, so ``n`` alone fixes the decompressed
  size: no length prefix to trust, and decompression never allocates more
  than ``inner.encoded_nbytes(n)`` bytes, whatever the input claims.
- Decoding yields exactly the inner codec's result, so peers stay
  bit-identical even if their lz4 libraries compress the same input to
  different bytes (only the decompressed bytes are part of the contract;
  lz4 block compression is deterministic for a given library version).
- Any malformed input (unknown mode, truncated or corrupt lz4 block, wrong
  decompressed size) raises ``CodecError``. lz4 blocks carry no checksum:
  corruption that still decompresses to the right size is caught only by the
  inner codec's own validation.
"""

from __future__ import annotations

import lz4.block
import numpy as np

from collnet.codec.base import F32, U8, Codec, as_bytes, check_acc, check_count
from collnet.errors import CodecError, InvalidArgument

MODE_STORED = 0
MODE_LZ4 = 1


class Lz4Codec(Codec):
    """Wrap a fixed-size codec and lz4-compress its output."""

    def __init__(self, inner: Codec, *, acceleration: int = 1) -> None:
        if isinstance(inner, Lz4Codec) or inner.encoded_nbytes(0) is None:
            raise InvalidArgument(
                f"lz4 needs a fixed-size inner codec, got {inner.name}", codec=inner.name
            )
        if acceleration < 1:
            raise InvalidArgument(f"lz4 acceleration must be >= 1, got {acceleration}")
        self.inner = inner
        self.acceleration = acceleration
        self.name = inner.name + "+lz4"
        self.lossy = inner.lossy

    def __repr__(self) -> str:
        return f"<Lz4Codec {self.inner!r}>"

    def _inner_nbytes(self, n: int) -> int:
        size = self.inner.encoded_nbytes(n)
        if size is None:  # unreachable: __init__ only accepts fixed-size codecs
            raise CodecError(f"{self.name}: inner codec has no fixed size", codec=self.name)
        return size

    def encode(self, x: F32) -> U8:
        encoded = self.inner.encode(x)
        packed = lz4.block.compress(
            encoded, mode="fast", acceleration=self.acceleration, store_size=False
        )
        if len(packed) < encoded.shape[0]:
            mode, payload = MODE_LZ4, np.frombuffer(packed, dtype=np.uint8)
        else:
            mode, payload = MODE_STORED, encoded
        out = np.empty(1 + payload.shape[0], dtype=np.uint8)
        out[0] = mode
        out[1:] = payload
        return out

    def decode(self, data: bytes | memoryview | U8, n: int, out: F32 | None = None) -> F32:
        return self.inner.decode(self._inner_bytes(data, n), n, out)

    def decode_add(self, data: bytes | memoryview | U8, acc: F32, scratch: F32) -> None:
        n = check_acc(acc, self.name)
        self.inner.decode_add(self._inner_bytes(data, n), acc, scratch)

    def _inner_bytes(self, data: bytes | memoryview | U8, n: int) -> U8:
        """The inner codec's encoding of ``n`` values, decompressed if needed."""
        n = check_count(n, self.name)
        raw = as_bytes(data, self.name)
        if raw.shape[0] == 0:
            raise CodecError(f"{self.name}: empty encoding (no mode byte)", codec=self.name)
        mode = int(raw[0])
        payload = raw[1:]
        if mode == MODE_STORED:
            return payload
        if mode != MODE_LZ4:
            raise CodecError(f"{self.name}: unknown mode byte {mode}", codec=self.name)
        expected = self._inner_nbytes(n)
        try:
            plain = lz4.block.decompress(payload, uncompressed_size=expected)
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise CodecError(f"{self.name}: corrupt lz4 block ({exc})", codec=self.name) from None
        # lz4 accepts blocks that decompress to fewer bytes than the capacity
        # it was given, so the exact size is checked here.
        if len(plain) != expected:
            raise CodecError(
                f"{self.name}: lz4 block holds {len(plain)} bytes, {n} values need {expected}",
                codec=self.name,
                nbytes=len(plain),
                expected=expected,
            )
        return np.frombuffer(plain, dtype=np.uint8)

    def encoded_nbytes(self, n: int) -> None:
        return None

    def max_encoded_nbytes(self, n: int) -> int:
        return 1 + self._inner_nbytes(n)

    def max_abs_error_bound(self, x: F32) -> float:
        return self.inner.max_abs_error_bound(x)
