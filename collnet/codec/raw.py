"""The ``none`` codec: float32 values sent as their own bytes.

Layout: ``n`` little-endian IEEE float32 values, ``4 * n`` bytes, nothing else.
Lossless for every bit pattern (NaN payloads and signed zeros included), so it
is the reference the lossy codecs are measured against.
"""

from __future__ import annotations

import numpy as np

from collnet.codec.base import (
    F32,
    U8,
    Codec,
    as_bytes,
    check_acc,
    check_count,
    check_input,
    check_size,
    prepare_out,
)

_LE_F32 = np.dtype("<f4")


class RawCodec(Codec):
    """Lossless identity codec (``none``)."""

    name = "none"
    lossy = False

    def encode(self, x: F32) -> U8:
        check_input(x, self.name)
        # astype to an explicit little-endian dtype is a plain copy on
        # little-endian hosts and a byte swap elsewhere, so the wire bytes are
        # the same on every machine.
        return x.astype(_LE_F32).view(np.uint8)

    def decode(self, data: bytes | memoryview | U8, n: int, out: F32 | None = None) -> F32:
        n = check_count(n, self.name)
        raw = as_bytes(data, self.name)
        check_size(raw, 4 * n, n, self.name)
        result = prepare_out(out, n, self.name)
        np.copyto(result, raw.view(_LE_F32))
        return result

    def decode_add(self, data: bytes | memoryview | U8, acc: F32, scratch: F32) -> None:
        # No decode step needed: add the wire values straight into acc.
        n = check_acc(acc, self.name)
        raw = as_bytes(data, self.name)
        check_size(raw, 4 * n, n, self.name)
        np.add(acc, raw.view(_LE_F32), out=acc)

    def encoded_nbytes(self, n: int) -> int:
        return 4 * check_count(n, self.name)
