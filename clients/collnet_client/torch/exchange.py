"""How a fragment's pseudo-gradient crosses the network: one exchange in flight.

An exchanger starts the averaging of one fragment's pseudo-gradient, held in
a slice of the SDK-memory exchange buffer, and returns an ``Exchange``;
``wait()`` leaves the average of every peer's pseudo-gradient in that slice,
bit-identical on every peer that completes it, or raises the collective's
typed error. ``AllReduceExchange`` is an ``avg`` all-reduce (any codec, with
the SDK's error feedback); ``collnet_client.torch.topk.TopKExchange`` sends
sparse top-k values through the variable-size all-gather.

``bytes_sent`` is what the exchange costs this peer on the wire, modelled
for ring schedules in a world of N peers: ``2 (N-1)/N`` times the encoded
fragment for an all-reduce (reduce-scatter then all-gather; a quantizing
codec's encoded size), ``(N-1)/N`` times the sum of every peer's
contribution for an all-gather. Star schedules for small tensors move about
as much per peer; the figure compares modes, it is not a packet count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from collnet.codec.registry import get_codec
from collnet.errors import CollectiveAborted, PeerLost, Timeout
from collnet_client.client import Comm

F32 = npt.NDArray[np.float32]

# Errors after which a sync's exchange is skipped rather than the training
# stopped: the world moved on (or the step was cancelled) and the sync repairs it.
ROUND_ERRORS = (PeerLost, Timeout, CollectiveAborted)


class Waitable(Protocol):
    def wait(self) -> Any: ...


@dataclass
class Exchange:
    """One fragment's exchange, started at ``started_at`` and applied at ``apply_at``."""

    fragment: int
    started_at: int
    apply_at: int
    handle: Waitable
    buffer: F32  # the fragment's slice of the exchange buffer
    bytes_sent: int


class Completed:
    """An exchange already finished (restored from a checkpoint): its outcome only."""

    def __init__(self, error: str | None) -> None:
        self.error = error

    def wait(self) -> None:
        if self.error is not None:
            raise CollectiveAborted(f"restored from a checkpoint: {self.error}")


def ring_all_reduce_bytes(encoded: int, world: int) -> int:
    return 2 * (world - 1) * encoded // max(world, 1)


def ring_all_gather_bytes(total: int, world: int) -> int:
    return (world - 1) * total // max(world, 1)


class AllReduceExchange:
    """Average by all-reduce with ``codec`` (error feedback per fragment if asked)."""

    def __init__(self, comm: Comm, codec: str, error_feedback: bool, key_prefix: str) -> None:
        self.comm = comm
        self.codec = codec
        self.error_feedback = error_feedback
        self.key_prefix = key_prefix
        self._codec = get_codec(codec.removesuffix("+lz4"), block_size=comm.feedback.block_size)

    def key(self, fragment: int) -> str:
        return f"{self.key_prefix}.pseudo_gradient.{fragment}"

    def start(
        self, buffer: F32, fragment: int, tag: str, world: int, timeout_s: float | None
    ) -> tuple[Waitable, int]:
        handle = self.comm.all_reduce_async(
            buffer,
            op="avg",
            codec=self.codec,
            tag=tag,
            timeout_s=timeout_s,
            error_feedback=self.error_feedback,
            feedback_key=self.key(fragment),
        )
        encoded = self._codec.encoded_nbytes(buffer.size) or self._codec.max_encoded_nbytes(
            buffer.size
        )
        return handle, ring_all_reduce_bytes(encoded, world)

    def forget(self) -> None:
        for key in [k for k in self.comm.feedback.residuals if str(k).startswith(self.key_prefix)]:
            self.comm.feedback.forget(key)

    def state_dict(self) -> dict[str, Any]:
        """This peer's error-feedback residuals (per-peer state)."""
        prefix = f"{self.key_prefix}.pseudo_gradient."
        return {
            str(k).removeprefix(prefix): v.copy()
            for k, v in self.comm.feedback.residuals.items()
            if str(k).startswith(prefix)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forget()
        for fragment, residual in state.items():
            self.comm.feedback.residuals[self.key(int(fragment))] = np.array(
                residual, np.float32, copy=True
            )


__all__ = [
    "ROUND_ERRORS",
    "AllReduceExchange",
    "Completed",
    "Exchange",
    "Waitable",
    "ring_all_gather_bytes",
    "ring_all_reduce_bytes",
]
