"""The codec contract shared by every quantizer.

A codec turns a 1-D float32 array into bytes and back. Encoding is a pure,
deterministic function of the input bytes (same bytes in, same bytes out, on
every machine), which is what lets the all-gather phase of a quantized
all-reduce hand every peer the owner's bytes and leave all peers
bit-identical.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


class Codec(abc.ABC):
    """Encode float32 vectors to bytes; decode them back (possibly lossy)."""

    name: ClassVar[str]
    lossy: ClassVar[bool]

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
