"""DiLoCo on collnet: blocking and streaming DiLoCo with any outer optimizer.

``DiLoCo`` trains one model on many peers that talk rarely. Every peer runs
its inner optimizer locally; every ``inner_steps`` steps the peers average
their pseudo-gradients (how far the local weights moved from the shared
"global" ones, the anchor) and apply an outer optimizer step to the global
weights: any ``torch.optim`` optimizer (``outer_optimizer``, a factory of
one from a list of tensors; Nesterov SGD by default, as in the paper).

Streaming DiLoCo (``streaming=True``, Douillard et al. 2025): the model is cut
into ``fragments`` contiguous parameter groups (``fragments.py``) synced on a
staggered schedule, one every ``inner_steps / fragments`` steps, so each
parameter is still sent once per ``inner_steps`` steps, in smaller bursts.
A fragment's exchange runs while training goes on and is applied
``overlap`` inner steps later: the outer step updates the global fragment,
and the local fragment becomes ``alpha * local + (1 - alpha) * global``
(``alpha`` keeps part of the progress made while the exchange was in flight;
0 drops it, the paper found 0.5 a good middle). Blocking DiLoCo is the
schedule with one fragment, ``overlap = 0`` and ``alpha = 0``.

Exchanges (``exchange.py``): an ``avg`` all-reduce with any codec (uint8 and
uint4 quantize the outer gradients, optionally with error feedback), or
``compression="topk"``: the ``density`` largest values with error feedback,
through the variable-size all-gather (``topk.py``; ``topk=TopKConfig(...)``
also sets the feedback's decay, the bits per value and the chunk size).

Failure model, in the order a sync runs:

1. the fragment's exchange runs in the epoch agreed at the previous sync.
   If a peer died it fails (``PeerLost``, ``Timeout``, ``CollectiveAborted``)
   and no outer step is applied for that fragment: the local progress stays
   and counts in the fragment's next pseudo-gradient;
2. ``update_topology`` agrees on the new world and admits pending joiners
   (a trainer restarted on a live daemon is one);
3. ``sync_state`` (a barrier of the new world) brings the global weights,
   the outer optimizer's state and the sync counter of every peer to what
   the majority holds at the newest revision. An exchange that completed on
   some peers and failed on others leaves them at different revisions, and
   the stale ones fetch. A joiner gets the model here, in ``start()``. A
   peer whose state was fetched restarts its local weights from the global
   ones; an exchange still in flight is applied as planned (it was started
   from the state it now holds again), and a joiner that took no part in it
   is repaired at the next sync.

After every sync every peer holds bit-identical global weights and outer
state (``state_hash``). ``state_dict()``/``load_state_dict()`` checkpoint a run
(see ``checkpoint.py`` for what is shared and what is per peer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import xxhash

import collnet_client.torch.checkpoint as ckpt
from collnet.errors import PeerLost
from collnet_client.client import Comm, SyncResult
from collnet_client.torch.exchange import ROUND_ERRORS, AllReduceExchange, Exchange
from collnet_client.torch.fragments import Fragment, Schedule, split
from collnet_client.torch.outer import OuterFactory, OuterOptimizer, nesterov
from collnet_client.torch.topk import TopKConfig, TopKExchange

F32 = npt.NDArray[np.float32]

COMPRESSIONS = ("none", "fp16", "bf16", "uint8", "uint4", "topk")


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
    host copy, and the fetched ones are copied back.
    """
    return comm.sync_state(named_tensors, revision, timeout_s)


@dataclass(frozen=True)
class OuterStep:
    """What one sync did on this peer."""

    round: int  # syncs completed by the world (synced: a joiner adopts it)
    revision: int  # outer steps applied to the global weights (all fragments)
    epoch: int
    world: int  # peers in the world after the sync's update_topology
    reduced: bool  # an averaged pseudo-gradient was applied since the last sync
    fetched: bool  # the state sync overwrote this peer's global state
    hash: str  # xxh64 of the global weights: equal on every peer
    in_parity: bool  # the sync saw every member report the same revision and state
    error: str | None = None  # why no pseudo-gradient was applied, if one was due
    fragment: int = 0  # the fragment whose exchange this sync started


class DiLoCo:
    """DiLoCo over a ``Comm``; see the module docstring for the sync and its failures.

    Usage: ``diloco.start()`` once (founders and joiners alike), then after
    every ``loss.backward()`` call ``diloco.step()`` instead of
    ``inner_optimizer.step()``; it returns an ``OuterStep`` when a sync ran
    (every ``inner_steps``, streaming: every ``inner_steps / fragments``).
    ``finish()`` at the end applies what is still in flight.

    ``outer_lr`` and ``outer_momentum`` configure the default Nesterov SGD and
    may not be combined with ``outer_optimizer``. ``compression`` names the
    exchange (a codec of the all-reduce, or ``"topk"`` with ``density``, or with
    ``topk``, a ``TopKConfig``);
    ``codec`` is its older spelling for codecs.
    """

    def __init__(
        self,
        comm: Comm,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        *,
        inner_steps: int,
        outer_optimizer: OuterFactory | None = None,
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
        codec: str = "none",
        compression: str | None = None,
        density: float = 0.01,
        topk: TopKConfig | None = None,
        error_feedback: bool = False,
        streaming: bool = False,
        fragments: int = 1,
        overlap: int | None = None,
        alpha: float = 0.5,
        timeout_s: float | None = None,
        sync_attempts: int = 20,
        tag_prefix: str = "diloco",
    ) -> None:
        if outer_optimizer is not None and (outer_lr is not None or outer_momentum is not None):
            raise ValueError("outer_lr/outer_momentum configure the default outer optimizer only")
        if compression is not None and codec != "none":
            raise ValueError("pass either codec or compression")
        compression = compression or codec
        if compression.removesuffix("+lz4") not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if topk is not None and density != TopKConfig.density:
            raise ValueError("pass density in topk")
        topk = topk or TopKConfig(density=density)
        if not streaming and fragments != 1:
            raise ValueError("fragments need streaming=True")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        interval = inner_steps // max(fragments, 1)
        self.schedule = Schedule(
            inner_steps, fragments, (interval if overlap is None else overlap) if streaming else 0
        )
        self.comm = comm
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.compression = compression
        self.density = topk.density
        self.topk = topk
        self.streaming = streaming
        self.alpha = np.float32(alpha if streaming else 0.0)
        self.timeout_s = timeout_s
        self.sync_attempts = sync_attempts
        self.tag_prefix = tag_prefix
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.sizes = [p.numel() for _, p in self.params]
        self.fragments: list[Fragment] = split(self.sizes, fragments)
        total = sum(self.sizes)
        # Shared state in SDK memory, so the sync moves it without copies.
        self.global_weights: F32 = comm.empty(total, np.float32)
        self._round = comm.zeros(1, np.int64)
        # Exchanged in place: at most one fragment's slice is in flight at a time.
        self._buffer: F32 = comm.empty(total, np.float32)
        self.revision = 0
        self.inner_step = 0
        self.bytes_sent = 0  # this peer's modelled wire bytes (see exchange.py)
        self._in_parity = False
        self._world_size = max(comm.world.size, 1)
        self._pending: Exchange | None = None
        self._applied = False
        self._error: str | None = None
        self._loaded = False
        local = self._read_local(0, len(self.params))
        np.copyto(self.global_weights, local)
        # Where the local weights stood at each fragment's last sync.
        self.anchor: F32 = local.copy()
        factory = outer_optimizer or nesterov(
            0.7 if outer_lr is None else outer_lr, 0.9 if outer_momentum is None else outer_momentum
        )
        self.outer = OuterOptimizer(
            factory,
            self.global_weights,
            [n for n, _ in self.params],
            [p.shape for _, p in self.params],
            self.fragments,
        )
        self.exchanger: AllReduceExchange | TopKExchange
        if compression == "topk":
            self.exchanger = TopKExchange(comm, topk, self.sizes, self.fragments)
        else:
            self.exchanger = AllReduceExchange(comm, compression, error_feedback, tag_prefix)

    # -- state -------------------------------------------------------------
    @property
    def round(self) -> int:
        return int(self._round[0])

    @property
    def syncs_per_round(self) -> int:
        """Syncs per ``inner_steps`` steps: one per fragment."""
        return self.schedule.fragments

    def state_hash(self) -> str:
        return xxhash.xxh64_hexdigest(self.global_weights.tobytes())

    def named_state(self) -> dict[str, Any]:
        """The shared state: global weights per parameter, outer optimizer state, round."""
        out: dict[str, Any] = {"diloco.round": self._round}
        offsets = self._offsets()
        for i, (name, _) in enumerate(self.params):
            out[f"weights.{name}"] = self.global_weights[offsets[i] : offsets[i + 1]]
        out.update(self.outer.named_state())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this peer, in ``shared``, ``peer`` and ``config``
        parts (see ``checkpoint.py``). An exchange in flight is waited for."""
        return {
            "version": ckpt.VERSION,
            "config": self._config(),
            "shared": {
                "weights": ckpt.tensor(self.global_weights),
                "outer": self.outer.state_dict(),
                "round": self.round,
                "revision": self.revision,
            },
            "peer": {
                "inner_step": self.inner_step,
                "anchor": ckpt.tensor(self.anchor),
                "residuals": self.exchanger.state_dict(),
                "pending": ckpt.freeze_pending(self._pending),
                "bytes_sent": self.bytes_sent,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s output, before ``start()``; the trainer restores its
        model and inner optimizer itself (``model.load_state_dict`` and so on)."""
        ckpt.check(state, self._config())
        shared, peer = state["shared"], state["peer"]
        np.copyto(self.global_weights, ckpt.array(shared["weights"]))
        self.outer.load_state_dict(shared["outer"])
        self._round[0] = int(shared["round"])
        self.revision = int(shared["revision"])
        self.inner_step = int(peer["inner_step"])
        np.copyto(self.anchor, ckpt.array(peer["anchor"]))
        self.exchanger.load_state_dict(peer["residuals"])
        self.bytes_sent = int(peer["bytes_sent"])
        self._pending = ckpt.thaw_pending(
            peer["pending"],
            lambda f: self._buffer[self.fragments[f].start : self.fragments[f].stop],
        )
        self._loaded = True

    def _config(self) -> dict[str, Any]:
        return {
            "names": [n for n, _ in self.params],
            "sizes": list(self.sizes),
            "fragments": [(f.params.start, f.params.stop) for f in self.fragments],
            "inner_steps": self.schedule.inner_steps,
            "overlap": self.schedule.overlap,
            "compression": self.compression,
        }

    def _offsets(self) -> list[int]:
        return [int(x) for x in np.cumsum([0, *self.sizes])]

    def _read_local(self, first: int, stop: int) -> F32:
        with torch.no_grad():
            parts = [
                p.detach().reshape(-1).to("cpu", torch.float32) for _, p in self.params[first:stop]
            ]
            flat: F32 = torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)
        return flat

    def _write_local(self, first: int, stop: int, flat: F32) -> None:
        offset = 0
        with torch.no_grad():
            for _, p in self.params[first:stop]:
                src = torch.from_numpy(flat[offset : offset + p.numel()]).view_as(p)
                p.copy_(src)
                offset += p.numel()

    def _reset_local(self) -> None:
        """Every fragment restarts from the global weights."""
        np.copyto(self.anchor, self.global_weights)
        self._write_local(0, len(self.params), self.global_weights)

    # -- syncs -------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> OuterStep:
        """Join the world and adopt its state (a founder's state if it is the first).

        After ``load_state_dict`` the local weights and anchors are kept
        unless the sync fetched (this peer's checkpoint was not the world's).
        """
        world, result = self._agree(timeout_s)
        fetched = bool(result.fetched)
        if fetched or not self._loaded:
            self._reset_local()
            self.inner_step = self.schedule.step_of(self.round)
            if fetched:
                self.exchanger.forget()
        return self._report(world.epoch, world.size, fetched, -1)

    def step(self) -> OuterStep | None:
        """One inner optimizer step; at a sync point also that sync."""
        self.inner_optimizer.step()
        self.inner_step += 1
        if self._pending is not None and self._pending.apply_at <= self.inner_step:
            self._apply(self._pending)
        fragment = self.schedule.fragment_at(self.inner_step)
        if fragment is None:
            return None
        return self._sync(fragment)

    def outer_step(self) -> OuterStep:
        """The sync due now, whatever the inner step (blocking: one DiLoCo round)."""
        if self._pending is not None:
            self._apply(self._pending)
        return self._sync(self.schedule.fragment_of(self.round))

    def finish(self, timeout_s: float | None = None) -> OuterStep:
        """End training with the global weights in the model.

        Blocking mode: the last sync made them equal already, so no peer waits
        for another here. Streaming mode: the exchange in flight is applied and
        one more sync (counted) follows; every member calls it, and a joiner
        admitted at the members' last sync too.
        """
        fetched = False
        epoch, size = self.comm.epoch, self._world_size
        if self._pending is not None:
            self._apply(self._pending)
        if self.streaming:
            self._round[0] += 1
            world, result = self._agree(timeout_s)
            epoch, size, fetched = world.epoch, world.size, bool(result.fetched)
        self._reset_local()
        return self._report(epoch, size, fetched, -1)

    def _sync(self, fragment: int) -> OuterStep:
        f = self.fragments[fragment]
        p0, p1 = f.params.start, f.params.stop
        buffer = self._buffer[f.start : f.stop]
        np.subtract(self.anchor[f.start : f.stop], self._read_local(p0, p1), out=buffer)
        handle, nbytes = self.exchanger.start(
            buffer, fragment, f"{self.tag_prefix}-{self.round}", self._world_size, self.timeout_s
        )
        self.bytes_sent += nbytes
        self._pending = Exchange(
            fragment,
            self.inner_step,
            self.inner_step + self.schedule.overlap,
            handle,
            buffer,
            nbytes,
        )
        if self.schedule.overlap == 0:
            self._apply(self._pending)
        self._round[0] += 1
        world, result = self._agree(self.timeout_s)
        fetched = bool(result.fetched)
        if fetched:
            # The residuals belonged to progress that the fetched state replaced.
            self.exchanger.forget()
            self._reset_local()
        return self._report(world.epoch, world.size, fetched, fragment)

    def _apply(self, pending: Exchange) -> None:
        """Wait for a fragment's averaged pseudo-gradient, take the outer step, merge."""
        self._pending = None
        try:
            pending.handle.wait()
        except ROUND_ERRORS as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            return
        f = self.fragments[pending.fragment]
        self.outer.step(f, pending.buffer)
        self.revision += 1
        self._applied = True
        fresh = self.global_weights[f.start : f.stop]
        np.copyto(self.anchor[f.start : f.stop], fresh)
        if self.alpha == 0:
            self._write_local(f.params.start, f.params.stop, fresh)
            return
        local = self._read_local(f.params.start, f.params.stop)
        np.multiply(local, self.alpha, out=local)
        local += fresh * (np.float32(1) - self.alpha)
        self._write_local(f.params.start, f.params.stop, local)

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

    def _report(self, epoch: int, world: int, fetched: bool, fragment: int) -> OuterStep:
        applied, error = self._applied, self._error
        self._applied, self._error = False, None
        return OuterStep(
            self.round,
            self.revision,
            epoch,
            world,
            applied,
            fetched,
            self.state_hash(),
            self._in_parity,
            error,
            fragment,
        )


__all__ = ["DiLoCo", "OuterStep", "empty", "sync_state"]
