"""DiLoCo on collnet: tensors over SDK memory, state sync of tensors, and the DiLoCo loop.

``DiLoCo`` trains one model on many peers that talk rarely. Every peer runs
its inner optimizer locally; every ``inner_steps`` steps the peers average
their pseudo-gradients (how far the local weights moved from the shared
ones) with one all-reduce and apply an outer Nesterov SGD step to the shared
("global") weights. ``streaming=True`` overlaps that all-reduce with the next
``inner_steps`` of computation and applies it one round late.

Failure model, in the order a round runs:

1. the pseudo-gradient all-reduce runs in the epoch agreed at the previous
   round. If a peer died, it fails (``PeerLost``) and this round applies no
   outer step: the local progress is kept and counted in the next round
   (streaming: the failed round's progress is dropped);
2. ``update_topology`` agrees on the new world and admits pending joiners
   (a trainer restarted on a live daemon is one: its daemon left the world
   when the old trainer died, failing step 1 elsewhere with ``PeerLost``);
3. ``sync_state`` (a barrier of the new world) brings the global weights, the
   outer momentum and the round counter of every peer to what the majority
   holds at the newest revision. This is what makes every outcome of step 1
   safe: a collective can complete on some survivors and fail on others (a
   peer dying at the very end of the all-gather), and then the peers that
   applied the step are at a newer revision and the others fetch it. It is
   also how a joiner gets the model: it calls ``start()``, which runs steps 2
   and 3 alongside the members' round.

After step 3 every peer holds bit-identical global weights (``state_hash``).
The outer step is elementwise float32 numpy on bit-identical inputs, so peers
that apply it stay identical without moving the weights again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import xxhash

from collnet.errors import CollectiveAborted, PeerLost, Timeout
from collnet_client.client import Comm, Handle, SyncResult

F32 = npt.NDArray[np.float32]

# Errors after which a round is skipped rather than the training stopped: the
# world moved on (or the step was cancelled) and the next sync repairs it.
ROUND_ERRORS = (PeerLost, Timeout, CollectiveAborted)


def empty(comm: Comm, shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32) -> Any:
    """A CPU tensor over SDK shared memory: all-reduced and synced with no copy."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(comm.empty(shape, np.int16)).view(torch.bfloat16)
    return torch.from_numpy(comm.empty(shape, torch.empty((), dtype=dtype).numpy().dtype))


def sync_state(
    comm: Comm,
    named_tensors: Mapping[str, Any],
    revision: int,
    timeout_s: float | None = None,
) -> SyncResult:
    """``Comm.sync_state`` for torch tensors (and numpy arrays), updated in place.

    CPU tensors are synced through a numpy view of their storage (no copy when
    they live in SDK memory, see ``empty``); CUDA or strided tensors through a
    host copy, and the fetched ones are copied back. (``Comm.sync_state``
    accepts torch tensors itself; this is the same call, named for symmetry.)
    """
    return comm.sync_state(named_tensors, revision, timeout_s)


@dataclass(frozen=True)
class OuterStep:
    """What one DiLoCo round did on this peer."""

    round: int  # rounds completed by the world (synced: a joiner adopts it)
    revision: int  # outer steps applied to the global weights
    epoch: int
    world: int  # peers in the world after the round's update_topology
    reduced: bool  # an all-reduced pseudo-gradient was applied in this round
    fetched: bool  # the state sync overwrote this peer's global state
    hash: str  # xxh64 of the global weights: equal on every peer
    in_parity: bool  # the sync saw every member report the same revision and state
    error: str | None = None  # why no pseudo-gradient was applied, if one was due


class DiLoCo:
    """DiLoCo over a ``Comm``; see the module docstring for the round and its failures.

    Usage: ``diloco.start()`` once (founders and joiners alike), then after
    every ``loss.backward()`` call ``diloco.step()`` instead of
    ``inner_optimizer.step()``; it returns an ``OuterStep`` when a round ran.
    ``finish()`` at the end applies what is still in flight.
    """

    def __init__(
        self,
        comm: Comm,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        inner_steps: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        codec: str = "none",
        error_feedback: bool = False,
        streaming: bool = False,
        timeout_s: float | None = None,
        sync_attempts: int = 20,
        tag_prefix: str = "diloco",
    ) -> None:
        if inner_steps < 1:
            raise ValueError("inner_steps must be >= 1")
        self.comm = comm
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.outer_lr = np.float32(outer_lr)
        self.outer_momentum = np.float32(outer_momentum)
        self.codec = codec
        self.error_feedback = error_feedback
        self.streaming = streaming
        self.timeout_s = timeout_s
        self.sync_attempts = sync_attempts
        self.tag_prefix = tag_prefix
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.sizes = [p.numel() for _, p in self.params]
        total = sum(self.sizes)
        # Shared state, in SDK memory so all-reduce and sync move it without copies.
        self.global_weights: F32 = comm.empty(total, np.float32)
        self.momentum: F32 = comm.zeros(total, np.float32)
        self._round = comm.zeros(1, np.int64)
        # Two send buffers: in streaming mode one is in flight while the next fills.
        self._deltas: list[F32] = [comm.empty(total, np.float32) for _ in range(2)]
        self.revision = 0
        self.inner_step = 0
        self._in_parity = False
        self._world_size = 0
        self._pending: tuple[Handle, F32] | None = None
        local = self._read_local()
        np.copyto(self.global_weights, local)
        # Where the local weights stood at the last round: progress is measured from it.
        self.anchor: F32 = local.copy()

    # -- state -------------------------------------------------------------
    @property
    def round(self) -> int:
        return int(self._round[0])

    def state_hash(self) -> str:
        return xxhash.xxh64_hexdigest(self.global_weights.tobytes())

    def named_state(self) -> dict[str, npt.NDArray[Any]]:
        """The shared state as named views: global weights and outer momentum per
        parameter, and the round counter."""
        out: dict[str, npt.NDArray[Any]] = {"diloco.round": self._round}
        offset = 0
        for (name, _), size in zip(self.params, self.sizes, strict=True):
            out[f"weights.{name}"] = self.global_weights[offset : offset + size]
            out[f"momentum.{name}"] = self.momentum[offset : offset + size]
            offset += size
        return out

    def _read_local(self) -> F32:
        with torch.no_grad():
            parts = [p.detach().reshape(-1).to("cpu", torch.float32) for _, p in self.params]
            flat: F32 = torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)
        return flat

    def _write_local(self, flat: F32) -> None:
        offset = 0
        with torch.no_grad():
            for (_, p), size in zip(self.params, self.sizes, strict=True):
                src = torch.from_numpy(flat[offset : offset + size]).view_as(p)
                p.copy_(src)
                offset += size

    # -- rounds ------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> OuterStep:
        """Join the world and adopt its state (a founder's state if it is the first)."""
        world, result = self._agree(timeout_s)
        np.copyto(self.anchor, self.global_weights)
        self._write_local(self.global_weights)
        return self._report(world.epoch, world.size, False, bool(result.fetched), None)

    def step(self) -> OuterStep | None:
        """One inner optimizer step; every ``inner_steps`` steps also one outer round."""
        self.inner_optimizer.step()
        self.inner_step += 1
        if self.inner_step % self.inner_steps:
            return None
        return self.outer_step()

    def outer_step(self) -> OuterStep:
        local = self._read_local()
        # Never the buffer of the all-reduce still in flight (streaming).
        busy = self._pending[1] if self._pending is not None else None
        delta = self._deltas[1] if busy is self._deltas[0] else self._deltas[0]
        np.subtract(self.anchor, local, out=delta)
        error: str | None = None
        reduced = False
        if self.streaming:
            # Start this round's all-reduce, then apply the previous round's one.
            handle = self._all_reduce(delta)
            pending, self._pending = self._pending, (handle, delta)
            if pending is not None:
                reduced, error = self._apply(*pending)
        else:
            reduced, error = self._apply(self._all_reduce(delta), delta)
        self._round[0] += 1
        world, result = self._agree(self.timeout_s)
        fetched = bool(result.fetched)
        if fetched:
            # The residual belonged to progress that the fetched state replaced.
            self.comm.feedback.forget(f"{self.tag_prefix}.pseudo_gradient")
        if fetched or (reduced and not self.streaming):
            # The global weights moved under this peer: restart from them.
            np.copyto(self.anchor, self.global_weights)
        elif self.streaming:
            # Keep this round's own progress (still in flight) on top of the new
            # global weights; it is replaced by the average when that lands.
            np.subtract(self.global_weights, delta, out=self.anchor)
        # Blocking mode with no outer step applied: keep the local weights, so this
        # round's progress counts in the next pseudo-gradient.
        if fetched or reduced or self.streaming:
            self._write_local(self.anchor)
        return self._report(world.epoch, world.size, reduced, fetched, error)

    def finish(self, timeout_s: float | None = None) -> OuterStep:
        """End training with the global weights in the model.

        Blocking mode: the last round synced them already, so no peer waits
        for another here. Streaming mode: one more round (counted) applies the
        all-reduce still in flight and syncs; every member calls it, and a
        joiner admitted at the last ``outer_step`` round too.
        """
        reduced, error, fetched = False, None, False
        epoch, size = self.comm.epoch, self._world_size
        if self.streaming:
            pending, self._pending = self._pending, None
            if pending is not None:
                reduced, error = self._apply(*pending)
            self._round[0] += 1
            world, result = self._agree(timeout_s)
            epoch, size, fetched = world.epoch, world.size, bool(result.fetched)
        np.copyto(self.anchor, self.global_weights)
        self._write_local(self.global_weights)
        return self._report(epoch, size, reduced, fetched, error)

    def _all_reduce(self, delta: F32) -> Handle:
        return self.comm.all_reduce_async(
            delta,
            op="avg",
            codec=self.codec,
            tag=f"{self.tag_prefix}-{self.round}",
            timeout_s=self.timeout_s,
            error_feedback=self.error_feedback,
            # One residual for both send buffers: they carry the same quantity.
            feedback_key=f"{self.tag_prefix}.pseudo_gradient",
        )

    def _apply(self, handle: Handle, delta: F32) -> tuple[bool, str | None]:
        """Wait for an all-reduced pseudo-gradient and take the outer Nesterov step."""
        try:
            handle.wait()
        except ROUND_ERRORS as exc:
            return False, f"{type(exc).__name__}: {exc}"
        mu, lr = self.outer_momentum, self.outer_lr
        np.multiply(self.momentum, mu, out=self.momentum)
        np.add(self.momentum, delta, out=self.momentum)
        update = np.multiply(self.momentum, mu)
        np.add(update, delta, out=update)
        np.multiply(update, lr, out=update)
        np.subtract(self.global_weights, update, out=self.global_weights)
        self.revision += 1
        return True, None

    def _agree(self, timeout_s: float | None) -> tuple[Any, SyncResult]:
        """update_topology, then sync the shared state; again if the world moves between."""
        for attempt in range(self.sync_attempts):
            world = self.comm.update_topology(timeout_s)
            try:
                result = self.comm.sync_state(self.named_state(), self.revision, timeout_s)
            except PeerLost:
                if attempt + 1 == self.sync_attempts:
                    raise
                continue
            self.revision = result.revision
            self._in_parity = result.in_parity
            self._world_size = world.size
            return world, result
        raise AssertionError("unreachable")

    def _report(
        self, epoch: int, world: int, reduced: bool, fetched: bool, error: str | None
    ) -> OuterStep:
        return OuterStep(
            self.round,
            self.revision,
            epoch,
            world,
            reduced,
            fetched,
            self.state_hash(),
            self._in_parity,
            error,
        )


__all__ = ["DiLoCo", "OuterStep", "empty", "sync_state"]
