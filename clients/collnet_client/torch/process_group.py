"""``ProcessGroupCollnet``: a ``torch.distributed`` process group over a connected ``Comm``.

Importing ``collnet_client.torch`` registers it as backend ``"collnet"`` (CPU
and CUDA tensors; CUDA ones go through host staging), so
``dist.init_process_group("collnet", init_method="collnet://")`` works; see
``collnet_client.torch.rendezvous`` for where rank and world size come from.

What maps to what (ranks are ``Comm.rank``: positions in the agreed world's
peer list, times ``local_size``, plus ``local_rank``):

==============================================  =====================================
torch                                           collnet
==============================================  =====================================
``all_reduce`` (SUM, AVG, MIN, MAX, PRODUCT)    ``Comm.all_reduce_async`` (sum ... prod)
``broadcast``                                   ``Comm.broadcast_async(root=src)``
``all_gather``                                  ``Comm.all_gather_async``, split in rank order
``all_gather_into_tensor`` (``_allgather_base``)  ``Comm.all_gather_async(out=output)``
``reduce_scatter``                              ``Comm.reduce_scatter_async`` of the inputs
                                                concatenated in rank order
``reduce_scatter_tensor``                       ``Comm.reduce_scatter_async(out=output)``
``barrier``                                     ``Comm.barrier_async``
==============================================  =====================================

Every op goes through the group's ``CommThread`` (the only caller of the
Comm) under the world's default tags, so ranks must issue the same ops in the
same order, as torch requires anyway. ``async_op=True`` returns a
``CollnetWork``.

Failure model: the group lives in one epoch of the collnet world. When a
peer dies, every collective in flight fails on every survivor with
``collnet_client.torch.errors.PeerLost`` (a ``collnet.errors.PeerLost`` and a
``torch.distributed.DistBackendError``) within the failure bound, and so does
every later one: the group's world is gone. ``collnet_client.torch.reinit()``
agrees on the new world and replaces the default group in the same process,
keeping the same Comm (a new connection would be a new trainer). A collective
that failed may have completed on some survivors and not on others, so
re-broadcast the state you need identical after re-forming (a new DDP does
it for the model).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from collnet.errors import InvalidArgument
from collnet_client.client import Comm
from collnet_client.torch.commthread import CollnetWork, CommThread, Op
from collnet_client.torch.errors import as_torch_error

BACKEND = "collnet"

_OPS: tuple[tuple[Any, str], ...] = (
    (dist.ReduceOp.SUM, "sum"),
    (dist.ReduceOp.AVG, "avg"),
    (dist.ReduceOp.MIN, "min"),
    (dist.ReduceOp.MAX, "max"),
    (dist.ReduceOp.PRODUCT, "prod"),
)

# How long destroying a group waits for its collectives in flight to end.
STOP_TIMEOUT_S = 30.0

_group_ids = itertools.count(1)


def reduce_op_name(op: Any) -> str:
    """collnet's name for a ``torch.distributed.ReduceOp``; a typed error for the others."""
    for torch_op, name in _OPS:
        if op == torch_op:
            return name
    raise as_torch_error(
        InvalidArgument(f"collnet has no reduction for {op}: use SUM, AVG, MIN, MAX or PRODUCT")
    )


class ProcessGroupCollnet(dist.ProcessGroup):
    """A process group over ``comm``, in the world of ``comm.epoch``; see the module docstring.

    ``owns_comm``: destroying the group closes the Comm (unless ``reinit``
    hands it to the next group). ``comm`` must be left alone while the group
    lives: only the group's thread calls it.
    """

    def __init__(
        self,
        comm: Comm,
        rank: int,
        size: int,
        timeout: timedelta,
        *,
        owns_comm: bool = False,
    ) -> None:
        # No store: collnet needs none (torch's stub knows only the overload with one).
        super().__init__(rank, size)  # type: ignore[call-arg]
        self.comm = comm
        self.owns_comm = owns_comm
        self.epoch = comm.epoch
        self.timeout = timeout
        self._thread = CommThread(comm, f"collnet-pg-{next(_group_ids)}")

    # -- torch's view of the group -------------------------------------------
    def getBackendName(self) -> str:
        return BACKEND

    @property
    def timeout_s(self) -> float:
        """The deadline the daemons apply to each collective."""
        return self.timeout.total_seconds()

    def __repr__(self) -> str:
        return f"ProcessGroupCollnet(rank={self.rank()}, size={self.size()}, epoch={self.epoch})"

    # -- collectives -----------------------------------------------------------
    # torch.distributed calls each with an options object; the C++ class's
    # convenience overloads (a bare tensor, ``op=``) are not offered, hence the
    # override ignores.
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> CollnetWork:  # type: ignore[override]
        op = reduce_op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        return self._submit(
            "all_reduce",
            lambda c: [c.all_reduce_async(t, op=op, timeout_s=self.timeout_s) for t in tensors],
            lambda _: tensors,
        )

    def all_reduce_async(
        self,
        tensor: torch.Tensor,
        op: str = "sum",
        codec: str = "none",
        *,
        error_feedback: bool = False,
        feedback_key: Any = None,
    ) -> CollnetWork:
        """collnet's own all-reduce through the group: a codec, error feedback (for hooks).

        The work's future holds ``tensor``, reduced in place.
        """
        return self._submit(
            f"all_reduce ({codec})",
            lambda c: [
                c.all_reduce_async(
                    tensor,
                    op=op,
                    codec=codec,
                    timeout_s=self.timeout_s,
                    error_feedback=error_feedback,
                    feedback_key=feedback_key,
                )
            ],
            lambda _: tensor,
        )

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> CollnetWork:  # type: ignore[override]
        root = int(opts.rootRank) if opts is not None else 0
        return self._submit(
            "broadcast",
            lambda c: [c.broadcast_async(t, root=root, timeout_s=self.timeout_s) for t in tensors],
            lambda _: tensors,
        )

    def allgather(  # type: ignore[override]
        self,
        output_tensors: list[list[torch.Tensor]],
        input_tensors: list[torch.Tensor],
        opts: Any = None,
    ) -> CollnetWork:
        self._one_input("all_gather", input_tensors)
        outputs = output_tensors[0]
        self._check_count("all_gather", len(outputs))

        def finish(results: list[Any]) -> list[list[torch.Tensor]]:
            gathered = torch.as_tensor(results[0])
            for rank, out in enumerate(outputs):
                out.copy_(gathered[rank].reshape(out.shape))
            return output_tensors

        return self._submit(
            "all_gather",
            lambda c: [c.all_gather_async(input_tensors[0], timeout_s=self.timeout_s)],
            finish,
        )

    def all_gather_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> CollnetWork:
        self._check_multiple("all_gather_into_tensor", output, input)
        return self._submit(
            "all_gather_into_tensor",
            lambda c: [c.all_gather_async(input, out=output, timeout_s=self.timeout_s)],
            lambda _: [output],
        )

    # Older torch (and its C++ side) call the single-tensor all-gather by this name.
    _allgather_base = all_gather_single

    def reduce_scatter(  # type: ignore[override]
        self,
        output_tensors: list[torch.Tensor],
        input_tensors: list[list[torch.Tensor]],
        opts: Any = None,
    ) -> CollnetWork:
        op = reduce_op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        self._one_input("reduce_scatter", output_tensors)
        inputs = input_tensors[0]
        self._check_count("reduce_scatter", len(inputs))
        output = output_tensors[0]
        if any(t.numel() != output.numel() for t in inputs):
            raise self._invalid("reduce_scatter: every input must have the output's size")
        # Rank r's share of the flattened input is the r-th input, as torch defines it.
        flat = torch.cat([t.reshape(-1) for t in inputs])
        return self._submit(
            "reduce_scatter",
            lambda c: [c.reduce_scatter_async(flat, out=output, op=op, timeout_s=self.timeout_s)],
            lambda _: output_tensors,
        )

    def reduce_scatter_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> CollnetWork:
        op = reduce_op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        self._check_multiple("reduce_scatter_tensor", input, output)
        return self._submit(
            "reduce_scatter_tensor",
            lambda c: [c.reduce_scatter_async(input, out=output, op=op, timeout_s=self.timeout_s)],
            lambda _: [output],
        )

    _reduce_scatter_base = reduce_scatter_single  # type: ignore[assignment]

    def barrier(self, opts: Any = None) -> CollnetWork:
        return self._submit(
            "barrier", lambda c: [c.barrier_async(timeout_s=self.timeout_s)], lambda _: []
        )

    # -- lifecycle -------------------------------------------------------------
    def agree(self, timeout_s: float | None = None) -> Any:
        """``comm.update_topology()`` on the group's thread, after the ops in flight.

        The world it returns is for the next group: this one stays in its epoch.
        """
        pending = self._thread.submit(
            Op(
                "update_topology",
                lambda c: [_Done(c.update_topology(timeout_s))],
                lambda results: results[0],
                exclusive=True,
            )
        )
        return pending.wait()

    def shutdown(self) -> None:
        """Called by ``destroy_process_group``: end the thread; close the Comm if owned."""
        self._thread.stop(STOP_TIMEOUT_S)
        if self.owns_comm:
            self.comm.close()

    def release_comm(self) -> Comm:
        """Stop the thread and hand the Comm over (to the next group); no longer closed here."""
        self._thread.stop(STOP_TIMEOUT_S)
        self.owns_comm = False
        return self.comm

    # -- helpers ---------------------------------------------------------------
    def _submit(
        self,
        name: str,
        start: Any,
        finish: Any,
    ) -> CollnetWork:
        return CollnetWork(self._thread.submit(Op(name, start, finish)))

    def _invalid(self, message: str) -> BaseException:
        return as_torch_error(InvalidArgument(message, epoch=self.epoch))

    def _one_input(self, what: str, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != 1:
            raise self._invalid(f"{what}: one tensor per rank, got {len(tensors)}")

    def _check_count(self, what: str, count: int) -> None:
        if count != self.size():
            raise self._invalid(f"{what}: {count} tensors for a world of {self.size()}")

    def _check_multiple(self, what: str, big: torch.Tensor, small: torch.Tensor) -> None:
        if big.numel() != small.numel() * self.size():
            raise self._invalid(
                f"{what}: {big.numel()} elements are not {self.size()} x {small.numel()}"
            )


class _Done:
    """A handle for a call that already returned."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def wait(self, timeout_s: float | None = None) -> Any:
        return self.value
