"""Error feedback for quantized all-reduces, kept per tensor inside the SDK.

A quantizing codec (fp16, bf16, uint8, uint4) loses the low bits of every
value it sends. Summed over many steps that loss is systematic: the same
rounding repeats and the training drifts. Error feedback adds the loss of the
previous call back into the next call's input, so over steps nothing is lost
for good: ``x' = x + residual``, send ``x'``, keep ``residual = x' -
Q(x')`` where ``Q`` is the codec's own round trip with the daemon's block
size.

What it compensates is this peer's quantization of its own contribution,
which is what the first hop of a ring or star sends. The re-quantization of
partial sums on later hops and of the final result is not attributable to one
peer and stays; it is unbiased from step to step because the inputs change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from collnet.codec.registry import get_codec
from collnet.errors import InvalidArgument

LOSSY_CODECS = frozenset({"fp16", "bf16", "uint8", "uint4"})


class ErrorFeedback:
    """Residuals by key; see the module docstring."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.residuals: dict[Any, npt.NDArray[np.float32]] = {}

    def apply(self, key: Any, codec_name: str, x: npt.NDArray[Any]) -> Callable[[], None] | None:
        """Add the residual kept under ``key`` to ``x`` in place and keep the new one.

        Returns what puts the residual back as it was, for a call whose
        collective then failed: nothing was sent, so nothing was lost.
        """
        base = codec_name.removesuffix("+lz4")
        if base not in LOSSY_CODECS:
            return None  # a lossless codec leaves nothing to feed back
        if x.dtype != np.float32:
            raise InvalidArgument(
                f"error feedback needs a float32 tensor, got {x.dtype}", codec=codec_name
            )
        flat = x.reshape(-1)
        residual = self.residuals.get(key)
        if residual is None or residual.shape != flat.shape:
            residual = self.residuals[key] = np.zeros(flat.shape, np.float32)
        before = residual.copy()
        np.add(flat, residual, out=flat)
        codec = get_codec(base, block_size=self.block_size)
        sent = codec.decode(codec.encode(np.ascontiguousarray(flat)), flat.size)
        np.subtract(flat, sent, out=residual)

        def undo() -> None:
            if self.residuals.get(key) is residual:
                np.copyto(residual, before)

        return undo

    def forget(self, key: Any = None) -> None:
        """Drop one tensor's residual (or all): after a state sync they no longer apply."""
        if key is None:
            self.residuals.clear()
        else:
            self.residuals.pop(key, None)
