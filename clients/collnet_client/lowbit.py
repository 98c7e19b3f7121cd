"""Values on a few bits with one scale per group: the value codec of top-k parts.

Pure numpy (no torch, no I/O). ``quantize`` maps each group of float32
values to symmetric integer levels ``-L..L`` (``L = 2**(bits-1) - 1``, so 2
bits is the ternary ``{-1, 0, 1}``) with the scale ``max|v| / L`` of its group,
stored as codes ``level + L`` in ``0..2L``. ``dequantize`` is ``(code - L) *
scale`` in float32: one exact IEEE multiply per value, so every peer that
decodes the same codes and scales gets the same bits. The sender keeps the
dequantized values too (its error feedback holds ``value - dequantized``), so
nothing it rounds away is lost.

``pack_codes`` puts ``8 // bits`` codes in each byte, the first in the low
bits; ``unpack_codes`` is its inverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

BITS = (2, 4, 8)


def levels(bits: int) -> int:
    """``L``: the largest level of ``bits``-bit codes (levels run ``-L..L``)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return (1 << (bits - 1)) - 1


def _starts(groups: Sequence[int], total: int) -> npt.NDArray[np.int64]:
    counts = np.asarray(groups, np.int64)
    if counts.size and int(counts.min()) < 1:
        raise ValueError("every group holds at least one value")
    if int(counts.sum()) != total:
        raise ValueError(f"groups of {int(counts.sum())} values for {total}")
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def quantize(values: F32, groups: Sequence[int], bits: int) -> tuple[U8, F32]:
    """Codes (one uint8 each, ``0..2L``) and one float32 scale per group of ``values``."""
    top = levels(bits)
    values = np.asarray(values, np.float32)
    starts = _starts(groups, values.size)
    if not values.size:
        return np.zeros(0, np.uint8), np.zeros(0, np.float32)
    if not bool(np.all(np.isfinite(values))):
        raise ValueError("cannot quantize a non-finite value")
    peak = np.maximum.reduceat(np.abs(values), starts)
    scales = (peak / np.float32(top)).astype(np.float32)
    per_value = np.repeat(scales, np.asarray(groups, np.int64))
    # An all-zero group has scale 0: its values are level 0, not 0/0.
    safe = np.where(per_value > 0, per_value, np.float32(1))
    level = np.clip(np.rint(values / safe), -top, top)
    return (level + top).astype(np.uint8), scales


def dequantize(codes: U8, scales: F32, groups: Sequence[int], bits: int) -> F32:
    """The float32 values ``codes`` stand for; the same bits on every peer."""
    top = levels(bits)
    codes = np.asarray(codes, np.uint8)
    _starts(groups, codes.size)
    if codes.size and int(codes.max()) > 2 * top:
        raise ValueError(f"a {bits}-bit code above {2 * top}")
    per_value = np.repeat(np.asarray(scales, np.float32), np.asarray(groups, np.int64))
    out: F32 = (codes.astype(np.int16) - top).astype(np.float32) * per_value
    return out


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes ``pack_codes`` makes of ``count`` codes."""
    per_byte = 8 // bits
    return -(-count // per_byte)


def pack_codes(codes: U8, bits: int) -> U8:
    """``8 // bits`` codes per byte, the first in the lowest bits."""
    levels(bits)
    per_byte = 8 // bits
    codes = np.asarray(codes, np.uint8)
    padded = np.zeros(packed_nbytes(codes.size, bits) * per_byte, np.uint8)
    padded[: codes.size] = codes
    lanes = padded.reshape(-1, per_byte)
    out = np.zeros(lanes.shape[0], np.uint8)
    for j in range(per_byte):
        out |= lanes[:, j] << np.uint8(bits * j)
    return out


def unpack_codes(data: U8, count: int, bits: int) -> U8:
    """The first ``count`` codes of ``pack_codes``'s output."""
    levels(bits)
    per_byte = 8 // bits
    data = np.asarray(data, np.uint8)
    if data.size != packed_nbytes(count, bits):
        raise ValueError(f"{data.size} bytes for {count} codes of {bits} bits")
    mask = np.uint8((1 << bits) - 1)
    lanes = np.stack([(data >> np.uint8(bits * j)) & mask for j in range(per_byte)], axis=1)
    codes: U8 = lanes.reshape(-1)[:count]
    return codes


__all__ = [
    "BITS",
    "dequantize",
    "levels",
    "pack_codes",
    "packed_nbytes",
    "quantize",
    "unpack_codes",
]
