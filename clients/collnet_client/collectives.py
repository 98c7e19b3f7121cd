"""Broadcast, all-gather, all-gather-v, reduce-scatter and barrier from the SDK side.

Each ``Collectives`` method places the caller's tensors where the daemon can
map them (``placement``), sends one typed request
(``collnet.wire.collectives``) and returns a ``Handle``; ``wait()`` writes
staged outputs back and returns the result. Default tags come from the same
per-epoch counter as the all-reduce's, so any mix of collectives issued in
the same order on every peer agrees on its tags.

Failure model, per request:

- Success: outputs hold the result (staged ones are copied back only then).
- A failed collective raises its typed error (``PeerLost`` naming the step,
  ``Timeout``, ``MismatchError``, ``InvalidArgument``); ``buffer_modified``
  says whether the caller's buffers may hold partial data (never for
  staged outputs, never for a reduce-scatter's).
- ``WaitTimeout``: only this wait gave up; wait again or cancel.

``all_gather_v`` is two requests under one tag: the daemons first gather
every rank's element count, then, once this SDK has sized the output from
them, the data. The second is sent as soon as a ``done()`` or ``wait()``
sees the counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from collnet.algo.reducescatter import output_range
from collnet.errors import CollnetError, InvalidArgument, WaitTimeout
from collnet.wire.collectives import (
    AllGather,
    AllGatherV,
    Barrier,
    Broadcast,
    CollectiveRequest,
    ReduceScatter,
    counts_tag,
)
from collnet.wire.localapi import Cancel
from collnet_client.handles import Handle
from collnet_client.memory import SharedMemory, Staging
from collnet_client.placement import Location, check_dtype, place
from collnet_client.tensors import HostTensor, empty_like, host_tensor, new_like
from collnet_client.transport import Transport
from collnet_client.world import Agreement

Reply = dict[str, Any]


class _Request:
    """One request in flight, as a ``Handle``'s operation."""

    def __init__(
        self,
        owner: Collectives,
        request: CollectiveRequest,
        on_reply: Callable[[Reply], Any],
        lent: list[Staging],
        staged_output: bool,
    ) -> None:
        self._owner = owner
        self.request = request
        self._on_reply = on_reply
        self._lent = lent
        self._staged_output = staged_output
        try:
            self._rid = owner.transport.send(request)
        except BaseException:
            self._give_back()
            raise

    @property
    def tag(self) -> int | str:
        return self.request.tag

    @property
    def epoch(self) -> int:
        assert self.request.epoch is not None  # the SDK always names it
        return self.request.epoch

    def poll(self) -> bool:
        return self._owner.transport.poll(self._rid)

    def finish(self, timeout_s: float | None) -> Any:
        try:
            reply = self._owner.transport.wait(self._rid, timeout_s)
        except WaitTimeout:
            raise  # still the daemon's: its staging too
        except CollnetError as exc:
            self._give_back()
            raise (exc.with_buffer_modified(False) if self._staged_output else exc) from None
        try:
            return self._on_reply(reply)
        finally:
            self._give_back()

    def cancel(self, timeout_s: float) -> None:
        self._owner.transport.call(Cancel(epoch=self.epoch, tag=self.tag), timeout_s)

    def _give_back(self) -> None:
        lent, self._lent = self._lent, []
        for staging in lent:
            self._owner.memory.unstage(staging)


class _GatherV:
    """An ``all_gather_v`` in flight: its counts request, then its data request."""

    def __init__(self, owner: Collectives, tensor: Any, request: AllGatherV) -> None:
        self._owner = owner
        self._tensor = tensor
        self._request = request
        self._counts = _Request(owner, request, lambda r: r.get("counts"), [], False)
        self._data: _Request | None = None

    @property
    def tag(self) -> int | str:
        return self._counts.request.tag

    @property
    def epoch(self) -> int:
        return self._counts.epoch

    def poll(self) -> bool:
        if self._data is None:
            if not self._counts.poll():
                return False
            self._send_data(0.0)
            assert self._data is not None
        return self._data.poll()

    def finish(self, timeout_s: float | None) -> Any:
        if self._data is None:
            self._send_data(timeout_s)
            assert self._data is not None
        return self._data.finish(timeout_s)

    def cancel(self, timeout_s: float) -> None:
        if self._data is not None:
            self._data.cancel(timeout_s)
        else:
            cancel = Cancel(epoch=self.epoch, tag=counts_tag(self.tag))
            self._owner.transport.call(cancel, timeout_s)

    def _send_data(self, timeout_s: float | None) -> None:
        counts = self._counts.finish(timeout_s)
        if not isinstance(counts, list) or not all(isinstance(c, int) for c in counts):
            raise InvalidArgument(f"the daemon answered all_gather_v with counts {counts!r:.60}")
        self._data = self._owner.gather_v_data(self._tensor, self._request, counts)


class Collectives:
    """Starts the collectives beside all-reduce; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        memory: SharedMemory,
        agreement: Agreement,
        local_size: int,
        local_rank: int | None = 0,
    ) -> None:
        self.transport = transport
        self.memory = memory
        self._agreement = agreement
        self._local_size = local_size
        self._local_rank = local_rank

    def _named(self, tag: int | str | None, timeout_s: float | None) -> dict[str, Any]:
        """The fields every request names: its collective (a default tag is drawn
        here, once the tensors are placed), deadline and local group."""
        return {
            "tag": self._agreement.next_tag() if tag is None else tag,
            "epoch": self._agreement.epoch,
            "timeout_s": timeout_s,
            "local_size": self._local_size,
            "local_rank": self.local_rank(),
        }

    def local_rank(self) -> int:
        if self._local_rank is None:
            raise InvalidArgument(
                f"broadcast, all-gather, reduce-scatter and barrier with local_size "
                f"{self._local_size} need this trainer's local_rank: pass it to connect "
                "(or set COLLNET_LOCAL_RANK)"
            )
        return self._local_rank

    def size(self) -> int:
        """Trainers in the agreed world: its peers times ``local_size``."""
        return self._agreement.world.size * self._local_size

    def _input(self, tensor: Any) -> tuple[HostTensor, npt.NDArray[Any], Any, list[Staging]]:
        host = host_tensor(tensor)
        check_dtype(host)
        view, where, staging = place(self.memory, host, copy_in=True)
        return host, view, where, [] if staging is None else [staging]

    def _output(
        self, like: Any, out: Any, host: HostTensor, shape: tuple[int, ...], lent: list[Staging]
    ) -> _Output:
        """The caller's ``out`` (a new array of ``shape`` if None) placed for the daemon;
        staging it needs joins ``lent`` (which is given back if this fails)."""
        try:
            if out is None:
                out = empty_like(like, shape)
            dst = _checked(out, host, math.prod(shape))
            view, where, staging = place(self.memory, dst, copy_in=False)
        except BaseException:
            for item in lent:
                self.memory.unstage(item)
            raise
        if staging is not None:
            lent.append(staging)
        return _Output(out, dst, view, where, staging is not None)

    def broadcast(
        self,
        tensor: Any,
        root: int,
        codec: str,
        algo: str,
        tag: int | str | None,
        timeout_s: float | None,
    ) -> Handle:
        self.local_rank()  # before anything is staged
        host, view, where, lent = self._input(tensor)
        request = Broadcast(
            **_tensor(host, view, where),
            **self._named(tag, timeout_s),
            root=root,
            codec=codec,
            algo=algo,
        )
        output = _Output(host.original, host, view, where, bool(lent))  # in place
        return Handle(_Request(self, request, output.result, lent, staged_output=output.staged))

    def all_gather(
        self, tensor: Any, out: Any, codec: str, tag: int | str | None, timeout_s: float | None
    ) -> Handle:
        size, _ = self.size(), self.local_rank()  # before anything is staged
        host, view, where, lent = self._input(tensor)
        output = self._output(tensor, out, host, (size, *host.shape), lent)
        request = AllGather(
            **_tensor(host, view, where),
            **self._named(tag, timeout_s),
            out_shm=output.where.shm,
            out_offset=output.where.offset,
            codec=codec,
        )
        return Handle(_Request(self, request, output.result, lent, staged_output=output.staged))

    def all_gather_v(
        self, tensor: Any, codec: str, tag: int | str | None, timeout_s: float | None
    ) -> Handle:
        host = host_tensor(tensor)
        check_dtype(host)
        request = AllGatherV(
            **self._named(tag, timeout_s),
            shm="",  # the counts phase maps nothing
            count=math.prod(host.shape),
            dtype=host.dtype.name,
            codec=codec,
        )
        return Handle(_GatherV(self, tensor, request))

    def gather_v_data(self, tensor: Any, counts_request: AllGatherV, counts: list[int]) -> _Request:
        """The data request of an ``all_gather_v`` whose counts are known."""
        host, view, where, lent = self._input(tensor)
        total = sum(counts)
        out = self.memory.stage(total * host.dtype.itemsize)
        lent.append(out)
        gathered = out[1][: total * host.dtype.itemsize].view(host.dtype)
        request = AllGatherV(
            **_tensor(host, view, where),
            tag=counts_request.tag,
            out_shm=out[0].name,
            counts=tuple(counts),
            codec=counts_request.codec,
            epoch=counts_request.epoch,
            timeout_s=counts_request.timeout_s,
            local_size=self._local_size,
            local_rank=counts_request.local_rank,
        )

        def result(_: Reply) -> list[Any]:
            starts = [sum(counts[:k]) for k in range(len(counts))]
            return [
                new_like(gathered[s : s + c], tensor) for s, c in zip(starts, counts, strict=True)
            ]

        return _Request(self, request, result, lent, staged_output=True)

    def reduce_scatter(
        self,
        tensor: Any,
        out: Any,
        op: str,
        codec: str,
        tag: int | str | None,
        timeout_s: float | None,
    ) -> Handle:
        size, rank = self.size(), self.rank()
        host, view, where, lent = self._input(tensor)
        start, stop = output_range(int(view.size), size, rank)
        output = self._output(tensor, out, host, (stop - start,), lent)
        request = ReduceScatter(
            **_tensor(host, view, where),
            **self._named(tag, timeout_s),
            out_shm=output.where.shm,
            out_offset=output.where.offset,
            reduction=op,
            codec=codec,
        )
        return Handle(_Request(self, request, output.result, lent, staged_output=True))

    def barrier(self, tag: int | str | None, timeout_s: float | None) -> Handle:
        request = Barrier(**self._named(tag, timeout_s))
        return Handle(_Request(self, request, lambda _: None, [], staged_output=False))

    def rank(self) -> int:
        """This trainer's rank: ``node_rank * local_size + local_rank``."""
        node = self.node_rank()
        return node * self._local_size + (self.local_rank() if self._local_size > 1 else 0)

    def node_rank(self) -> int:
        """This peer's position in the agreed world's peer list."""
        world = self._agreement.world
        try:
            return world.peers.index(self.transport.hello.peer)
        except ValueError:
            raise InvalidArgument(
                f"this daemon is not a member of the agreed world (epoch {world.epoch}): "
                "call update_topology to be admitted"
            ) from None


@dataclass(frozen=True)
class _Output:
    """Where a collective's output goes, and how it reaches the caller."""

    original: Any
    host: HostTensor
    view: npt.NDArray[Any]
    where: Location
    staged: bool

    def result(self, _: Reply) -> Any:
        if self.staged:  # written back only on success
            self.host.copy_from(self.view)
        return self.original


def _tensor(host: HostTensor, view: npt.NDArray[Any], where: Location) -> dict[str, Any]:
    """The fields of a request naming ``host``, placed at ``where`` as ``view``."""
    return {
        "shm": where.shm,
        "offset": where.offset,
        "count": int(view.size),
        "dtype": host.dtype.name,
    }


def _checked(out: Any, like: HostTensor, count: int) -> HostTensor:
    """``out`` as a host tensor, checked to hold ``count`` elements of ``like``'s dtype."""
    dst = host_tensor(out)
    if dst.dtype != like.dtype or math.prod(dst.shape) != count:
        raise InvalidArgument(
            f"output must hold {count} elements of {like.dtype}, got {math.prod(dst.shape)} "
            f"of {dst.dtype}"
        )
    return dst
