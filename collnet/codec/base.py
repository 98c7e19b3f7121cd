"""The codec contract shared by every quantizer.

A codec turns a 1-D float32 array into bytes and back. Encoding is a pure,
deterministic function of the input bytes (same bytes in, same bytes out, on
every machine), which is what lets the all-gather phase of a quantized
all-reduce hand every peer the owner's bytes and leave all peers
bit-identical.

Invariants every codec in this package keeps:

- ``encode`` accepts only a C-contiguous 1-D native float32 array (any length,
  including 0) and returns a new 1-D uint8 array; multi-byte fields on the wire
  are little-endian.
- ``decode(data, n)`` either returns exactly ``n`` float32 values or raises
  ``CodecError``; it never reads past ``data``, never allocates more than ``n``
  implies, and never lets a numpy/lz4 exception escape for bad bytes.
- Fixed-size codecs report ``encoded_nbytes(n)``; ``decode`` rejects any other
  length. Variable-size codecs (lz4) return ``None`` there but still bound
  their size through ``max_encoded_nbytes(n)``.
- Only IEEE-exact elementwise float32 operations (+ - * / rint, min, max)
  feed the encoded bytes, so results do not depend on SIMD width, FMA or
  reduction order.
"""

from __future__ import annotations

import abc
import operator

import numpy as np
import numpy.typing as npt

from collnet.errors import CodecError, InvalidArgument

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


class Codec(abc.ABC):
    """Encode float32 vectors to bytes; decode them back (possibly lossy)."""

    # Plain (not ClassVar) annotations: most codecs set these as class
    # attributes, but a wrapper such as Lz4Codec derives them from the codec it
    # wraps and must set them per instance.
    name: str
    lossy: bool

    @abc.abstractmethod
    def encode(self, x: F32) -> U8:
        """Encode a contiguous 1-D float32 array into a new 1-D uint8 array."""

    @abc.abstractmethod
    def decode(self, data: bytes | memoryview | U8, n: int, out: F32 | None = None) -> F32:
        """Decode ``n`` float32 values from ``data`` into ``out`` (allocated if None).

        Raises ``CodecError`` when ``data`` is not a valid encoding of ``n`` values.
        """

    def decode_add(self, data: bytes | memoryview | U8, acc: F32, scratch: F32) -> None:
        """``acc += decode(data)`` using ``scratch`` (same length as ``acc``) as temporary."""
        self.decode(data, acc.shape[0], out=scratch)
        np.add(acc, scratch, out=acc)

    def encoded_nbytes(self, n: int) -> int | None:
        """Exact encoded size of ``n`` values, or ``None`` when it depends on the data."""
        return None

    def max_encoded_nbytes(self, n: int) -> int:
        """Upper bound on the encoded size of ``n`` values (for receive buffers, frame limits)."""
        size = self.encoded_nbytes(n)
        if size is None:
            raise NotImplementedError(f"{type(self).__name__} must bound its encoded size")
        return size

    def max_abs_error_bound(self, x: F32) -> float:
        """Bound on ``max |decode(encode(x)) - x|`` over the finite elements of ``x``.

        Lossless codecs return 0.0; lossy codecs override this.
        """
        return 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def check_input(x: F32, codec: str) -> None:
    """Reject anything but a C-contiguous 1-D native float32 array.

    Silently converting (float64 input, strided views) would hide caller bugs
    and cost a copy on the hot path, so it is an error instead.
    """
    if not isinstance(x, np.ndarray):
        raise InvalidArgument(f"{codec}: expected a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32 or x.ndim != 1 or not x.flags.c_contiguous:
        raise InvalidArgument(
            f"{codec}: expected a C-contiguous 1-D float32 array, "
            f"got dtype={x.dtype} shape={x.shape}",
            codec=codec,
        )


def check_count(n: int, codec: str) -> int:
    """Validate the element count passed to ``decode``."""
    try:
        count = operator.index(n)
    except TypeError:
        raise InvalidArgument(f"{codec}: n must be an integer, got {n!r}", codec=codec) from None
    if count < 0:
        raise InvalidArgument(f"{codec}: n must be >= 0, got {count}", codec=codec)
    return count


def as_bytes(data: bytes | memoryview | U8, codec: str) -> U8:
    """View ``data`` as a 1-D uint8 array without copying."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise InvalidArgument(
                f"{codec}: encoded data must be a 1-D uint8 array, "
                f"got dtype={data.dtype} shape={data.shape}",
                codec=codec,
            )
        return data
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        # e.g. a non-contiguous memoryview: a caller bug, not corrupt data.
        raise InvalidArgument(f"{codec}: encoded data is not a flat buffer: {exc}") from None


def prepare_out(out: F32 | None, n: int, codec: str) -> F32:
    """Return ``out`` after checking it can hold ``n`` values, or a new array."""
    if out is None:
        return np.empty(n, dtype=np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != (n,)
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise InvalidArgument(
            f"{codec}: out must be a writeable C-contiguous float32 array of shape ({n},)",
            codec=codec,
        )
    return out


def check_acc(acc: F32, codec: str) -> int:
    """Validate a ``decode_add`` accumulator (same rules as ``out``); return its length."""
    if not isinstance(acc, np.ndarray) or acc.ndim != 1:
        raise InvalidArgument(f"{codec}: acc must be a 1-D float32 array", codec=codec)
    prepare_out(acc, acc.shape[0], codec)
    return int(acc.shape[0])


def check_size(data: U8, expected: int, n: int, codec: str) -> None:
    """Raise ``CodecError`` unless ``data`` has exactly the size ``n`` values imply."""
    if data.shape[0] != expected:
        raise CodecError(
            f"{codec}: {data.shape[0]} bytes cannot encode {n} values "
            f"(expected exactly {expected})",
            codec=codec,
            nbytes=int(data.shape[0]),
            expected=expected,
            n=n,
        )
