"""DiLoCo's top-k exchange: sparse pseudo-gradients through the variable-size all-gather.

Per fragment, every peer sends the ``density`` share of largest values of
its pseudo-gradient plus its error-feedback residual times ``decay``
(``collnet_client.sparse``; each parameter tensor cut into chunks of at most
``chunk`` values, every chunk keeping its share), as ``(index, value)``
pairs in one int32 array (``bits = 32``: int32 indices and float32 values;
2, 4 or 8 bits: uint16 in-chunk indices, values on ``bits`` bits with a
float32 scale per chunk), with ``Comm.all_gather_v_async``. Every peer that completes the
all-gather holds the same parts in rank order and sums them into the dense
exchange buffer in that order, then divides by the world size: the average
is bit-identical on every peer, and the outer optimizer applies it.

The residuals are per-peer state (in ``state_dict()``'s ``peer`` part). A
failed exchange puts the fragment's residual back as it was (nothing was
sent); a fetched state sync drops them all (the progress they held was
replaced).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from collnet_client.client import Comm
from collnet_client.sparse import TopK, chunked
from collnet_client.torch.exchange import Waitable, ring_all_gather_bytes
from collnet_client.torch.fragments import Fragment

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TopKConfig:
    """The top-k exchange: the share of values sent, the error feedback's decay, the
    bits of a value on the wire (32: float32) and the chunk size (at most 65536)."""

    density: float = 0.01
    decay: float = 1.0
    bits: int = 32
    chunk: int = 4096


class _Gather:
    """The all-gather in flight; ``wait()`` averages the parts into the buffer."""

    def __init__(
        self, handle: Any, selector: TopK, buffer: F32, residual: F32, before: F32
    ) -> None:
        self._handle = handle
        self._selector = selector
        self._buffer = buffer
        self._residual = residual
        self._before = before

    def wait(self) -> F32:
        try:
            parts = self._handle.wait()
        except BaseException:
            np.copyto(self._residual, self._before)
            raise
        return self._selector.average(parts, self._buffer)


class TopKExchange:
    """Top-k with error feedback per fragment; see the module docstring."""

    def __init__(
        self, comm: Comm, config: TopKConfig, sizes: Sequence[int], fragments: Sequence[Fragment]
    ) -> None:
        self.comm = comm
        self.config = config
        self.fragments = list(fragments)
        self.selectors = [
            TopK(
                chunked([sizes[i] for i in f.params], config.chunk),
                config.density,
                config.decay,
                config.bits,
            )
            for f in self.fragments
        ]
        self.residuals: dict[int, F32] = {}

    def start(
        self, buffer: F32, fragment: int, tag: str, world: int, timeout_s: float | None
    ) -> tuple[Waitable, int]:
        residual = self.residuals.get(fragment)
        if residual is None:
            residual = self.residuals[fragment] = np.zeros(buffer.size, np.float32)
        before = residual.copy()
        selector = self.selectors[fragment]
        part = selector.encode(buffer, residual)
        try:
            handle = self.comm.all_gather_v_async(part, tag=tag, timeout_s=timeout_s)
        except BaseException:
            np.copyto(residual, before)
            raise
        # Every peer keeps the same count (it depends on the sizes only).
        return _Gather(handle, selector, buffer, residual, before), ring_all_gather_bytes(
            part.nbytes * world, world
        )

    def forget(self) -> None:
        self.residuals.clear()

    def state_dict(self) -> dict[str, Any]:
        return {str(f): r.copy() for f, r in self.residuals.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {int(f): np.array(r, np.float32, copy=True) for f, r in state.items()}


__all__ = ["TopKConfig", "TopKExchange"]
