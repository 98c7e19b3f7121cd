"""16-bit float codecs: ``fp16`` (IEEE binary16) and ``bf16`` (bfloat16).

Layout: ``n`` little-endian 16-bit values, ``2 * n`` bytes, nothing else.

Rounding: float32 -> 16 bit is IEEE round-to-nearest-even on every value,
subnormals included (numpy's binary16 cast for ``fp16``; ml_dtypes'
bfloat16 cast for ``bf16``, which is the same as adding
``0x7FFF + ((bits >> 16) & 1)`` to the float32 bits and keeping the top half).
Decoding widens exactly, so ``decode(encode(x))`` is ``x`` rounded once.

Specials:

- NaN and +-Inf have codes in both formats and pass through (NaN stays NaN
  with its sign, though its payload may be truncated; Inf stays Inf).
- A *finite* float32 that would round to +-Inf raises ``NonFiniteError``
  instead of silently turning into Inf. With round-to-nearest-even that is
  ``|x| >= 65520`` for fp16 (values in (65504, 65520) round to the max finite
  65504, an ordinary rounding error) and ``|x| >= 0x7F7F8000`` as float32
  bits (about 3.3961e38) for bf16. The check costs one min and one max pass
  over the input; only when those fail (or see a NaN) is the input scanned
  elementwise.

Error bound for finite inputs that do not raise: ``|x| * 2**-11 + 2**-25``
for fp16, ``|x| * 2**-8 + 2**-134`` for bf16 (half an ulp, where the
absolute term is half the smallest subnormal).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import numpy.typing as npt

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
from collnet.errors import NonFiniteError

_LE_F16 = np.dtype("<f2")
_LE_U16 = np.dtype("<u2")
_BF16 = np.dtype(ml_dtypes.bfloat16)


class _HalfCodec(Codec):
    """Shared encode/overflow logic for the two 16-bit formats."""

    lossy = True
    # Smallest float32 magnitude that rounds to Inf in the target format.
    _overflow_at: np.float32
    _max_finite: float
    _rel_error: float
    _abs_error: float

    def encode(self, x: F32) -> U8:
        check_input(x, self.name)
        n = x.shape[0]
        out = np.empty(2 * n, dtype=np.uint8)
        if n == 0:
            return out
        lo, hi = x.min(), x.max()
        # Written so that a NaN min/max (which numpy propagates) fails the
        # test and takes the exact elementwise path.
        if not (lo > -self._overflow_at and hi < self._overflow_at):
            self._check_overflow(x)
        self._cast(x, out)
        return out

    def _check_overflow(self, x: F32) -> None:
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(np.isfinite(x) & (np.abs(x) >= self._overflow_at))
        if bad.size:
            i = int(bad[0])
            raise NonFiniteError(
                f"{self.name}: finite value {float(x[i])!r} at index {i} exceeds the "
                f"format's range (max finite {self._max_finite}) and would become Inf",
                codec=self.name,
                index=i,
            )

    def _cast(self, x: F32, out: U8) -> None:
        raise NotImplementedError

    def encoded_nbytes(self, n: int) -> int:
        return 2 * check_count(n, self.name)

    def max_abs_error_bound(self, x: F32) -> float:
        finite = x[np.isfinite(x)]
        top = float(np.abs(finite).max()) if finite.size else 0.0
        return top * self._rel_error + self._abs_error


class Fp16Codec(_HalfCodec):
    """IEEE binary16 (``fp16``)."""

    name = "fp16"
    _overflow_at = np.float32(65520.0)
    _max_finite = 65504.0
    _rel_error = 2.0**-11
    _abs_error = 2.0**-25

    def _cast(self, x: F32, out: U8) -> None:
        np.copyto(out.view(_LE_F16), x, casting="same_kind")

    def decode(self, data: bytes | memoryview | U8, n: int, out: F32 | None = None) -> F32:
        n = check_count(n, self.name)
        raw = as_bytes(data, self.name)
        check_size(raw, 2 * n, n, self.name)
        result = prepare_out(out, n, self.name)
        np.copyto(result, raw.view(_LE_F16))
        return result

    def decode_add(self, data: bytes | memoryview | U8, acc: F32, scratch: F32) -> None:
        n = check_acc(acc, self.name)
        raw = as_bytes(data, self.name)
        check_size(raw, 2 * n, n, self.name)
        # float16 widens to float32 exactly inside the ufunc's buffered loop,
        # so this equals acc + decode(data) without a pass through scratch.
        np.add(acc, raw.view(_LE_F16), out=acc)


class Bf16Codec(_HalfCodec):
    """bfloat16 (``bf16``): float32's exponent range with an 8-bit significand."""

    name = "bf16"
    _overflow_at = np.float32(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32)[()])
    _max_finite = float(np.array(0x7F7F, dtype=np.uint16).view(_BF16)[()])
    _rel_error = 2.0**-8
    _abs_error = 2.0**-134

    def _cast(self, x: F32, out: U8) -> None:
        # ml_dtypes' cast is round-to-nearest-even (checked against the bit
        # formula over all 2**32 inputs) and several times faster than doing
        # the bit arithmetic in numpy passes. It writes native byte order,
        # so this path assumes a little-endian host.
        view: npt.NDArray[np.generic] = out.view(_BF16)
        # ml_dtypes flags casting NaN as an invalid operation; NaN is a valid
        # input here (it maps to a bfloat16 NaN), so silence the warning.
        with np.errstate(invalid="ignore"):
            np.copyto(view, x, casting="unsafe")

    def decode(self, data: bytes | memoryview | U8, n: int, out: F32 | None = None) -> F32:
        n = check_count(n, self.name)
        raw = as_bytes(data, self.name)
        check_size(raw, 2 * n, n, self.name)
        result = prepare_out(out, n, self.name)
        # bfloat16 is the top half of a float32: widening is a 16-bit shift,
        # exact for every pattern (NaN payloads included).
        np.left_shift(raw.view(_LE_U16), 16, out=result.view(np.uint32), dtype=np.uint32)
        return result
