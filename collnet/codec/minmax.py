"""Blockwise min-max quantization: ``uint8`` and ``uint4`` with a zero point.

The input is cut into blocks of ``block_size`` consecutive values (the last
block holds the remaining ``n % block_size`` values when that is not zero).
Each block ``b`` gets its own affine map from codes to floats, computed in
float32 with IEEE-exact operations only::

    lo[b]    = min(block) + 0                              # -0 becomes +0
    scale[b] = (max(block) - lo[b]) / L                    # L = 2**bits - 1
    code     = min(rint((x - lo[b]) / d[b]), L)            # rint: half to even
    decoded  = float32(code) * scale[b] + lo[b]            # two roundings, no FMA

where ``d[b]`` is ``scale[b]``, or 1 when ``scale[b] == 0`` (a constant block,
which therefore decodes exactly, up to the sign of zero). The ``+ 0`` (also
applied to ``max(block)``) makes a zero extreme ``+0.0``: for a block holding
both ``0.0`` and ``-0.0``, numpy's ``min`` returns whichever zero its SIMD
reduction order happens to keep, and that order differs between CPUs. The
clip to ``L`` only matters for blocks whose scale is subnormal; for normal
scales the quotient provably stays below ``L + 0.5``. Codes are never
negative because ``x - lo >= 0`` holds exactly in IEEE arithmetic.

Encoded layout, for ``n`` values and ``nb = ceil(n / block_size)`` blocks
(all multi-byte fields little-endian)::

    offset 0        scale[0..nb)  float32 x nb
    offset 4*nb     lo[0..nb)     float32 x nb
    offset 8*nb     codes         uint8: n bytes, code i in byte i
                                  uint4: ceil(n/2) bytes, code 2k in the low
                                  nibble of byte k, code 2k+1 in the high
                                  nibble; for odd n the last high nibble is 0

The block size is not stored: encoder and decoder must agree on it (it is
part of the codec's configuration, like its name).

Invariants:

- NaN or +-Inf anywhere in a block poisons that block's min or max, so one
  finiteness test on the per-block header rejects them (``NonFiniteError``)
  without a pass over the data. The same test rejects finite blocks whose
  range ``max - min`` or top decoded value overflows float32.
- ``decode`` validates the header (finite, scale >= 0, top decoded value
  finite) and, for uint4, the padding nibble, so a decoded array is always
  finite; anything else raises ``CodecError``.
- Error bound per element: ``|decoded - x| <= scale[b] / 2`` plus float32
  rounding slack (a few ulps of the block's largest magnitude, and at most
  ``2**-117`` absolute for blocks whose range is subnormal); see
  ``max_abs_error_bound``.

Performance: when the optional C extension ``collnet.codec._minmax`` is
built (``setup.py``; skipped without a compiler), encode and decode run in
it, a few times faster than numpy and bit-identical to it: same bytes, same
floats, same errors. On non-finite input or a corrupt encoding it hands
back to the numpy path, which raises the precise error; so it does for
buffers it does not take (misaligned, overlapping, strided).
``MinMaxCodec(accelerated=False)`` forces the numpy path.

The numpy path vectorises all work over ``(blocks, block_size)`` views of
the input, processed in chunks of about 64 Ki values so the float32
temporary stays in cache and memory use does not grow with ``n``; the ragged
last block is handled as its own one-row chunk rather than by padding.
"""

from __future__ import annotations

import operator
from typing import Any, ClassVar

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
from collnet.errors import CodecError, InvalidArgument, NonFiniteError

try:
    from collnet.codec import _minmax
except ImportError:  # built without a C compiler: numpy only
    ACCELERATOR_AVAILABLE = False
else:
    ACCELERATOR_AVAILABLE = True

DEFAULT_BLOCK_SIZE = 256

_LE_F32 = np.dtype("<f4")
_LE_U16 = np.dtype("<u2")
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
# Below the smallest normal float32, scale = range / L carries a large
# relative rounding error, so the quotient can exceed L and must be clipped.
_TINY = np.float32(np.finfo(np.float32).tiny)
# Values processed per chunk: the float32 temporary (256 KiB) stays in L2.
_CHUNK_VALUES = 1 << 16
_REL_SLACK = 2.0**-20
_ABS_SLACK = 2.0**-117

_Rows = npt.NDArray[Any]


class MinMaxCodec(Codec):
    """Blockwise affine quantizer to ``bits``-bit codes (see module docstring)."""

    lossy = True
    bits: ClassVar[int]
    _levels: ClassVar[np.float32]

    def __init__(
        self, block_size: int = DEFAULT_BLOCK_SIZE, *, accelerated: bool | None = None
    ) -> None:
        """``accelerated``: use the C kernels (None: when built; True: require them)."""
        if isinstance(block_size, bool):
            raise InvalidArgument(f"block_size must be an integer, got {block_size!r}")
        try:
            size = operator.index(block_size)
        except TypeError:
            raise InvalidArgument(f"block_size must be an integer, got {block_size!r}") from None
        if size < 1:
            raise InvalidArgument(f"block_size must be >= 1, got {size}", block_size=size)
        if accelerated is None:
            accelerated = ACCELERATOR_AVAILABLE
        elif not isinstance(accelerated, bool):
            raise InvalidArgument(f"accelerated must be a bool or None, got {accelerated!r}")
        elif accelerated and not ACCELERATOR_AVAILABLE:
            raise InvalidArgument(
                "accelerated=True but the C extension collnet.codec._minmax is not built"
            )
        self.block_size = size
        self.accelerated = accelerated
        self._chunk_blocks = max(1, _CHUNK_VALUES // size)

    def __repr__(self) -> str:
        kind = "C" if self.accelerated else "numpy"
        return f"<{type(self).__name__} {self.name} block_size={self.block_size} {kind}>"

    # -- sizes ---------------------------------------------------------------

    def _nblocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def _codes_nbytes(self, n: int) -> int:
        raise NotImplementedError

    def _kernel_block(self, n: int) -> int:
        """The block size passed to the C kernels (which take a C ssize_t)."""
        # A block size >= n gives the same layout as block size n: one block.
        return max(1, min(self.block_size, n))

    def encoded_nbytes(self, n: int) -> int:
        n = check_count(n, self.name)
        return 8 * self._nblocks(n) + self._codes_nbytes(n)

    # -- encode --------------------------------------------------------------

    def encode(self, x: F32) -> U8:
        check_input(x, self.name)
        n = x.shape[0]
        nb = self._nblocks(n)
        out = np.empty(8 * nb + self._codes_nbytes(n), dtype=np.uint8)
        # Anything but 0 (non-finite input, misaligned x): the numpy path
        # below raises the precise error or does the work.
        if self.accelerated and _minmax.encode(x, out, n, self._kernel_block(n), self.bits) == 0:
            return out
        scales = out[: 4 * nb].view(_LE_F32)
        lows = out[4 * nb : 8 * nb].view(_LE_F32)
        codes = self._code_buffer(out[8 * nb :], n)
        self._quantize(x, scales, lows, codes)
        self._pack(codes, out[8 * nb :])
        return out

    def _code_buffer(self, region: U8, n: int) -> U8:
        """Where ``_quantize`` writes one code per byte."""
        raise NotImplementedError

    def _pack(self, codes: U8, region: U8) -> None:
        """Move the one-code-per-byte buffer into the encoded code region."""

    def _quantize(self, x: F32, scales: F32, lows: F32, codes: U8) -> None:
        bs = self.block_size
        n = x.shape[0]
        nfull, tail = divmod(n, bs)
        if nfull:
            k = self._chunk_blocks
            tmp = np.empty(min(nfull, k) * bs, dtype=np.float32)
            xs = x[: nfull * bs].reshape(nfull, bs)
            cs = codes[: nfull * bs].reshape(nfull, bs)
            for b0 in range(0, nfull, k):
                b1 = min(nfull, b0 + k)
                self._quantize_rows(
                    xs[b0:b1],
                    lows[b0:b1],
                    scales[b0:b1],
                    cs[b0:b1],
                    tmp[: (b1 - b0) * bs].reshape(b1 - b0, bs),
                    b0,
                )
        if tail:
            start = nfull * bs
            self._quantize_rows(
                x[start:].reshape(1, tail),
                lows[nfull:],
                scales[nfull:],
                codes[start:].reshape(1, tail),
                np.empty((1, tail), dtype=np.float32),
                nfull,
            )

    def _quantize_rows(
        self, xs: _Rows, lo: _Rows, scale: _Rows, codes: _Rows, tmp: _Rows, first_block: int
    ) -> None:
        """Quantize whole blocks ``xs`` (rows) into ``codes``; fill their header."""
        levels = self._levels
        np.minimum.reduce(xs, axis=1, out=lo)
        np.maximum.reduce(xs, axis=1, out=scale)
        # -0 + 0 is +0: the sign of a zero extreme must not depend on the
        # reduction order (see the module docstring).
        np.add(lo, _ZERO, out=lo)
        np.add(scale, _ZERO, out=scale)
        # Non-finite values are detected right below, from these few values.
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(scale, lo, out=scale)
            np.divide(scale, levels, out=scale)
            top = scale * levels + lo
        if not np.isfinite(top).all():
            self._raise_non_finite(xs, top, first_block)
        np.subtract(xs, lo[:, None], out=tmp)
        if scale.min() >= _TINY:
            np.divide(tmp, scale[:, None], out=tmp)
        else:
            # Constant blocks have scale 0: divide by 1 instead (x - lo is 0
            # or, for a subnormal range, rounds to code 0). Subnormal scales
            # are exact divisors but may push the quotient past L.
            np.divide(tmp, np.where(scale > 0, scale, _ONE)[:, None], out=tmp)
            sub = np.flatnonzero(scale < _TINY)
            tmp[sub] = np.minimum(tmp[sub], levels)
        # Quotients lie in [0, L], so the unsafe cast to uint8 is exact.
        np.rint(tmp, out=codes, casting="unsafe")

    def _raise_non_finite(self, xs: _Rows, top: _Rows, first_block: int) -> None:
        row = int(np.flatnonzero(~np.isfinite(top))[0])
        block = first_block + row
        bad = np.flatnonzero(~np.isfinite(xs[row]))
        if bad.size:
            index = block * self.block_size + int(bad[0])
            raise NonFiniteError(
                f"{self.name}: cannot quantize {float(xs[row, bad[0]])} at index {index}",
                codec=self.name,
                index=index,
            )
        raise NonFiniteError(
            f"{self.name}: block {block} spans a range too wide for float32 "
            f"(min {float(xs[row].min())}, max {float(xs[row].max())})",
            codec=self.name,
            block=block,
        )

    # -- decode --------------------------------------------------------------

    def decode(self, data: bytes | memoryview | U8, n: int, out: F32 | None = None) -> F32:
        n = check_count(n, self.name)
        if self.accelerated:
            raw = as_bytes(data, self.name)
            check_size(raw, self.encoded_nbytes(n), n, self.name)
            try:
                result = prepare_out(out, n, self.name)
            except InvalidArgument:
                result = None  # the numpy path checks the header first, then raises
            if (
                result is not None
                and raw.flags.c_contiguous
                and _minmax.decode(raw, n, self._kernel_block(n), self.bits, result, None) == 0
            ):
                return result
        scales, lows, codes = self._parse(data, n)
        result = prepare_out(out, n, self.name)
        self._dequantize(scales, lows, codes, result, None)
        return result

    def decode_add(self, data: bytes | memoryview | U8, acc: F32, scratch: F32) -> None:
        n = check_acc(acc, self.name)
        prepare_out(scratch, n, self.name)
        if self.accelerated:
            raw = as_bytes(data, self.name)
            check_size(raw, self.encoded_nbytes(n), n, self.name)
            # One pass, acc += value, scratch unused; nothing is written
            # unless the whole encoding is valid.
            if (
                raw.flags.c_contiguous
                and _minmax.decode(raw, n, self._kernel_block(n), self.bits, scratch, acc) == 0
            ):
                return
        scales, lows, codes = self._parse(data, n)
        self._dequantize(scales, lows, codes, scratch, acc)

    def _parse(self, data: bytes | memoryview | U8, n: int) -> tuple[F32, F32, U8]:
        """Split and validate an encoding of ``n`` values: (scales, lows, codes)."""
        raw = as_bytes(data, self.name)
        check_size(raw, self.encoded_nbytes(n), n, self.name)
        nb = self._nblocks(n)
        scales = raw[: 4 * nb].view(_LE_F32)
        lows = raw[4 * nb : 8 * nb].view(_LE_F32)
        with np.errstate(over="ignore", invalid="ignore"):
            top = scales * self._levels + lows
            valid = bool(np.isfinite(top).all() and (scales >= 0).all())
        if not valid:
            raise CodecError(
                f"{self.name}: corrupt block header (non-finite or negative scale/min)",
                codec=self.name,
            )
        return scales, lows, self._unpack(raw[8 * nb :], n)

    def _unpack(self, region: U8, n: int) -> U8:
        """One code per byte, as a view or a new array."""
        raise NotImplementedError

    def _dequantize(self, scales: F32, lows: F32, codes: U8, dst: F32, acc: F32 | None) -> None:
        """``dst = codes * scale + lo`` blockwise; then ``acc += dst`` when given."""
        bs = self.block_size
        n = dst.shape[0]
        nfull, tail = divmod(n, bs)
        k = self._chunk_blocks
        spans = [
            (b0, min(nfull, b0 + k), b0 * bs, min(nfull, b0 + k) * bs) for b0 in range(0, nfull, k)
        ]
        if tail:
            spans.append((nfull, nfull + 1, nfull * bs, n))
        # acc + dst may overflow to +-Inf: that is the caller's data, not a
        # warning (dst itself cannot: the header check bounds it).
        with np.errstate(over="ignore"):
            for b0, b1, start, stop in spans:
                rows = b1 - b0
                d = dst[start:stop].reshape(rows, -1)
                # uint8 * float32 picks the float32 loop, so codes widen exactly.
                np.multiply(codes[start:stop].reshape(rows, -1), scales[b0:b1, None], out=d)
                np.add(d, lows[b0:b1, None], out=d)
                if acc is not None:
                    # Chunk by chunk, while d is still in cache.
                    np.add(acc[start:stop], dst[start:stop], out=acc[start:stop])

    # -- error bound ---------------------------------------------------------

    def max_abs_error_bound(self, x: F32) -> float:
        """Largest per-block bound ``scale/2 + slack`` (finite ``x`` only)."""
        check_input(x, self.name)
        n = x.shape[0]
        if n == 0:
            return 0.0
        bs = self.block_size
        nfull, tail = divmod(n, bs)
        blocks = [x[: nfull * bs].reshape(nfull, bs)] if nfull else []
        if tail:
            blocks.append(x[nfull * bs :].reshape(1, tail))
        bound = 0.0
        for rows in blocks:
            lo = rows.min(axis=1)
            hi = rows.max(axis=1)
            scale = (hi - lo) / self._levels
            mag = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
            per_block = scale.astype(np.float64) / 2 + mag * _REL_SLACK + _ABS_SLACK
            bound = max(bound, float(per_block.max()))
        return bound


class Uint8Codec(MinMaxCodec):
    """Min-max quantization to one byte per value (``uint8``)."""

    name = "uint8"
    bits = 8
    _levels = np.float32(255.0)

    def _codes_nbytes(self, n: int) -> int:
        return n

    def _code_buffer(self, region: U8, n: int) -> U8:
        return region

    def _unpack(self, region: U8, n: int) -> U8:
        return region


class Uint4Codec(MinMaxCodec):
    """Min-max quantization to 4-bit codes, two per byte (``uint4``)."""

    name = "uint4"
    bits = 4
    _levels = np.float32(15.0)

    def _codes_nbytes(self, n: int) -> int:
        return (n + 1) // 2

    def _code_buffer(self, region: U8, n: int) -> U8:
        return np.empty(n, dtype=np.uint8)

    def _pack(self, codes: U8, region: U8) -> None:
        n = codes.shape[0]
        even = n - n % 2
        if even:
            # Little-endian pairs (c0 | c1 << 8): OR-ing in the value shifted
            # right by 4 puts c1 in the high nibble of the low byte; the cast
            # keeps that low byte (unsigned narrowing is modular).
            pairs = codes[:even].view(_LE_U16)
            merged = np.right_shift(pairs, 4)
            np.bitwise_or(merged, pairs, out=merged)
            np.copyto(region[: even // 2], merged, casting="unsafe")
        if n % 2:
            region[-1] = codes[-1]

    def _unpack(self, region: U8, n: int) -> U8:
        if n % 2 and region[-1] >> 4:
            raise CodecError(
                f"{self.name}: padding nibble of an odd-length encoding is not zero",
                codec=self.name,
            )
        codes = np.empty(2 * region.shape[0], dtype=np.uint8)
        np.bitwise_and(region, 0x0F, out=codes[0::2])
        np.right_shift(region, 4, out=codes[1::2])
        return codes[:n]


def _accelerator_agrees() -> bool:
    """Whether the C kernels reproduce the numpy path bit for bit on a probe.

    Guards against a build that rounds differently (FMA contraction, fast
    math from the environment's CFLAGS): peers must agree on every byte, so
    such a build is not used. The probe has rounding ties, signed zeros,
    subnormal ranges and values where a fused multiply-add would differ.
    """
    i = np.arange(1, 301, dtype=np.float32)
    # Blocks of 4 [0, 255 * s, (k + 0.5) * s, (k + 1.5) * s]: exact ties for
    # scale s; s = 7 also catches division by a rounded reciprocal.
    k = np.arange(0.5, 254, 2, dtype=np.float32)[:, None]
    ties = [np.float32(s) * np.hstack([0 * k, 0 * k + 255, k, k + 1]) for s in (1, 7)]
    x = np.concatenate(
        [
            np.array([-0.0, 0.0, -0.0, 0.0], np.float32),
            *(t.reshape(-1) for t in ties),
            _ONE / i - i * np.float32(0.37),
            i * np.float32(3e-41),
        ]
    )
    acc0 = np.concatenate([np.array([-0.0, 1e30], np.float32), x[:-2] * np.float32(-0.5)])
    try:
        for cls in (Uint8Codec, Uint4Codec):
            for block_size in (4, 7):
                fast, ref = cls(block_size, accelerated=True), cls(block_size, accelerated=False)
                data = ref.encode(x)
                if not np.array_equal(fast.encode(x), data):
                    return False
                got, want = fast.decode(data, x.shape[0]), ref.decode(data, x.shape[0])
                if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                    return False
                got, want = acc0.copy(), acc0.copy()
                fast.decode_add(data, got, np.empty_like(got))
                ref.decode_add(data, want, np.empty_like(want))
                if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                    return False
    except Exception:
        return False
    return True


if ACCELERATOR_AVAILABLE and not _accelerator_agrees():
    ACCELERATOR_AVAILABLE = False
