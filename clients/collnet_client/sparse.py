"""Top-k sparsification with error feedback, and the dense average of sparse parts.

Pure numpy (no torch, no I/O). ``TopK.compress`` adds this peer's residual
to the input, keeps the ``k`` largest magnitudes of every chunk (a chunk is
one parameter tensor, so every layer keeps its share) and leaves the rest in
the residual: ``acc = x + r; send acc[idx]; r = acc; r[idx] = 0``. Nothing is
lost for good, only delayed (the error feedback of SparseLoCo and DeMo,
without a decay).

A part travels as one int32 array, ``[indices..., values viewed as int32...]``,
so the variable-size all-gather moves it losslessly. ``average`` sums the
peers' parts into a dense buffer in rank order and divides by their number:
every peer holding the same parts computes the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


def keep_count(size: int, density: float) -> int:
    """Values kept of a chunk of ``size``: at least one, at most all."""
    return min(size, max(1, math.ceil(density * size))) if size else 0


class TopK:
    """Top-k selection over chunks of fixed sizes; see the module docstring."""

    def __init__(self, chunk_sizes: Sequence[int], density: float) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.density = density
        self.chunk_sizes = list(chunk_sizes)
        self.size = sum(self.chunk_sizes)
        self.kept = sum(keep_count(s, density) for s in self.chunk_sizes)

    def compress(self, x: F32, residual: F32) -> tuple[I32, F32]:
        """Indices (ascending) and values sent for ``x``; ``residual`` updated in place."""
        if x.shape != (self.size,) or residual.shape != (self.size,):
            raise ValueError(f"expected {self.size} elements, got {x.shape} / {residual.shape}")
        acc = x + residual
        picked: list[I32] = []
        start = 0
        for size in self.chunk_sizes:
            k = keep_count(size, self.density)
            if k:
                chunk = np.abs(acc[start : start + size])
                idx = np.argpartition(chunk, size - k)[size - k :] if k < size else np.arange(size)
                picked.append(np.sort(idx).astype(np.int32) + np.int32(start))
            start += size
        indices = np.concatenate(picked) if picked else np.zeros(0, np.int32)
        values = acc[indices]
        np.copyto(residual, acc)
        residual[indices] = 0
        return indices, values


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
    """``out`` = the mean of the dense vectors the parts describe, summed in list order."""
    out.fill(0)
    for part in parts:
        indices, values = unpack(part, out.size)
        # Indices within a part are distinct, so a fancy-index add is exact.
        out[indices] += values
    if parts:
        np.divide(out, np.float32(len(parts)), out=out)
    return out


__all__ = ["TopK", "average", "keep_count", "pack", "unpack"]
