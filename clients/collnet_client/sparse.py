"""Top-k sparsification with error feedback, and the dense average of sparse parts.

Pure numpy (no torch, no I/O). ``TopK.compress`` adds this peer's residual,
times ``decay``, to the input, keeps the ``k`` largest magnitudes of every
chunk (the caller cuts each parameter tensor into chunks, ``chunked``, so
every layer keeps its share) and leaves the rest in the residual:
``acc = x + decay * r; send q(acc[idx]); r = acc; r[idx] -= q(acc[idx])``.
With ``decay = 1`` nothing is lost for good, only delayed; a decay below 1
(SparseLoCo's error feedback, about 0.9) lets stale progress fade, and the
residual acts as a momentum of what was not sent.

``q`` is the identity for ``bits = 32``; otherwise the values go on a few
bits with one scale per chunk (``lowbit.py``) and the residual keeps what
the rounding dropped.

A part travels as one int32 array, so the variable-size all-gather moves it
losslessly. With ``bits = 32``: ``[indices..., values viewed as int32...]``
(``pack``). Otherwise (``TopK.encode``): the chunks' float32 scales, each
chunk's in-chunk indices as uint16 (chunks hold at most 65536 values), the
packed codes, zero-padded to a multiple of 4 bytes; every peer knows the
layout from the chunk sizes. ``average`` sums the peers' parts into a dense
buffer in rank order and divides by their number: every peer holding the
same parts computes the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from collnet_client.lowbit import (
    dequantize,
    levels,
    pack_codes,
    packed_nbytes,
    quantize,
    unpack_codes,
)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


def keep_count(size: int, density: float) -> int:
    """Values kept of a chunk of ``size``: at least one, at most all."""
    return min(size, max(1, math.ceil(density * size))) if size else 0


MAX_CHUNK = 1 << 16  # in-chunk indices travel as uint16


def chunked(sizes: Sequence[int], chunk: int) -> list[int]:
    """Each of ``sizes`` (a tensor's element count) cut into chunks of at most ``chunk``."""
    if not 0 < chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be in 1..{MAX_CHUNK}, got {chunk}")
    return [min(chunk, size - at) for size in sizes for at in range(0, size, chunk)]


class TopK:
    """Top-k selection over chunks of fixed sizes; see the module docstring."""

    def __init__(
        self, chunk_sizes: Sequence[int], density: float, decay: float = 1.0, bits: int = 32
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if bits != 32 and max(chunk_sizes, default=0) > MAX_CHUNK:
            raise ValueError(f"{bits}-bit parts need chunks of at most {MAX_CHUNK} values")
        if bits != 32:
            levels(bits)
        self.density = density
        self.decay = np.float32(decay)
        self.bits = bits
        self.chunk_sizes = [s for s in chunk_sizes if s]
        self.size = sum(self.chunk_sizes)
        self.keeps = [keep_count(s, density) for s in self.chunk_sizes]
        self.kept = sum(self.keeps)
        self.starts = [int(x) for x in np.cumsum([0, *self.chunk_sizes])[:-1]]
        # Every chunk's first value's position among the kept ones.
        self._firsts = np.repeat(np.asarray(self.starts, np.int64), self.keeps)
        self.part_nbytes = (
            self.kept * 8
            if bits == 32
            else _padded(4 * len(self.chunk_sizes) + 2 * self.kept + packed_nbytes(self.kept, bits))
        )

    def _select(self, x: F32, residual: F32) -> tuple[F32, I32]:
        if x.shape != (self.size,) or residual.shape != (self.size,):
            raise ValueError(f"expected {self.size} elements, got {x.shape} / {residual.shape}")
        # decay 1 keeps the exact sum of the plain error feedback (1 * r == r).
        acc = x + residual if self.decay == 1 else x + self.decay * residual
        picked: list[I32] = []
        for start, size, k in zip(self.starts, self.chunk_sizes, self.keeps, strict=True):
            chunk = np.abs(acc[start : start + size])
            idx = np.argpartition(chunk, size - k)[size - k :] if k < size else np.arange(size)
            picked.append(np.sort(idx).astype(np.int32) + np.int32(start))
        indices = np.concatenate(picked) if picked else np.zeros(0, np.int32)
        return acc.astype(np.float32, copy=False), indices

    def _compress(self, x: F32, residual: F32) -> tuple[I32, F32, npt.NDArray[np.uint8], F32]:
        acc, indices = self._select(x, residual)
        codes, scales = np.zeros(0, np.uint8), np.zeros(0, np.float32)
        values = acc[indices]
        if self.bits != 32:
            codes, scales = quantize(values, self.keeps, self.bits)
            values = dequantize(codes, scales, self.keeps, self.bits)
        np.copyto(residual, acc)
        # What rounding dropped stays behind (0 when nothing was rounded).
        residual[indices] -= values
        return indices, values, codes, scales

    def compress(self, x: F32, residual: F32) -> tuple[I32, F32]:
        """Indices (ascending) and values sent for ``x``; ``residual`` updated in place."""
        indices, values, _, _ = self._compress(x, residual)
        return indices, values

    def encode(self, x: F32, residual: F32) -> I32:
        """``compress`` as the part that travels (``part_nbytes`` bytes)."""
        indices, values, codes, scales = self._compress(x, residual)
        if self.bits == 32:
            return pack(indices, values)
        local = (indices.astype(np.int64) - self._firsts).astype(np.uint16)
        raw = b"".join([scales.tobytes(), local.tobytes(), pack_codes(codes, self.bits).tobytes()])
        out = np.zeros(self.part_nbytes, np.uint8)
        out[: len(raw)] = np.frombuffer(raw, np.uint8)
        return out.view(np.int32)

    def decode(self, part: npt.NDArray[np.int32]) -> tuple[I32, F32]:
        """Indices and values of a peer's ``encode`` output; refuses a malformed one."""
        if self.bits == 32:
            return unpack(part, self.size)
        data = np.asarray(part).view(np.uint8).reshape(-1)
        if data.size != self.part_nbytes:
            raise ValueError(f"a sparse part of {data.size} bytes, expected {self.part_nbytes}")
        n_chunks = len(self.chunk_sizes)
        scales = data[: 4 * n_chunks].view(np.float32)
        at = 4 * n_chunks
        local = data[at : at + 2 * self.kept].view(np.uint16).astype(np.int64)
        at += 2 * self.kept
        codes = unpack_codes(
            data[at : at + packed_nbytes(self.kept, self.bits)], self.kept, self.bits
        )
        if not bool(np.all(np.isfinite(scales))) or bool(np.any(scales < 0)):
            raise ValueError("a sparse part's scale is negative or not finite")
        bounds = np.repeat(np.asarray(self.chunk_sizes, np.int64), self.keeps)
        if self.kept and bool(np.any(local >= bounds)):
            raise ValueError("sparse index out of its chunk")
        indices = (local + self._firsts).astype(np.int32)
        if self.kept > 1 and not bool(np.all(indices[1:] > indices[:-1])):
            raise ValueError("sparse indices must be strictly ascending")
        return indices, dequantize(codes, scales, self.keeps, self.bits)

    def average(self, parts: Sequence[npt.NDArray[np.int32]], out: F32) -> F32:
        """``out`` = the mean of the dense vectors the parts describe, summed in list order."""
        return _average([self.decode(p) for p in parts], out)


def _padded(nbytes: int) -> int:
    return -(-nbytes // 4) * 4


def pack(indices: I32, values: F32) -> I32:
    """One int32 array: the indices, then the values' bits."""
    return np.concatenate([indices.astype(np.int32), values.astype(np.float32).view(np.int32)])


def unpack(part: npt.NDArray[np.int32], size: int) -> tuple[I32, F32]:
    """Inverse of ``pack``; rejects a part that does not describe ``size`` elements."""
    part = np.asarray(part).view(np.int32).reshape(-1)
    if part.size % 2:
        raise ValueError(f"a sparse part has an even length, got {part.size}")
    k = part.size // 2
    indices, values = part[:k], part[k:].view(np.float32)
    if k and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"sparse index out of range 0..{size}")
    if k > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise ValueError("sparse indices must be strictly ascending")
    return indices, values


def average(parts: Sequence[npt.NDArray[np.int32]], out: F32) -> F32:
    """``out`` = the mean of the dense vectors the ``pack``ed parts describe, in list order."""
    return _average([unpack(part, out.size) for part in parts], out)


def _average(decoded: Sequence[tuple[I32, F32]], out: F32) -> F32:
    out.fill(0)
    for indices, values in decoded:
        # Indices within a part are distinct, so a fancy-index add is exact.
        out[indices] += values
    if decoded:
        np.divide(out, np.float32(len(decoded)), out=out)
    return out


__all__ = ["MAX_CHUNK", "TopK", "average", "chunked", "keep_count", "pack", "unpack"]
