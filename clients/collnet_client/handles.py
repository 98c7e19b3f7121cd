"""All-reduces in flight: from a caller's tensor to a request, and back.

``AllReduces.start`` finds or makes the shared memory the daemon reduces
(the caller's own bytes when they lie in SDK memory, else a staging copy),
applies error feedback, sends the request and returns a ``Handle``.
Finishing it writes a staged result back, retries on ``PeerLost`` as the
caller allowed, and reports every failure as one typed error. ``Handle``
drives any collective in flight through the small ``Operation`` interface
(the other kinds' live in ``collectives``).

Failure model, per request:

- Success: the caller's tensor holds the result (a staged one is copied
  back only then).
- A failed collective: the error says ``buffer_modified``. A staged tensor
  was never written back, so it still holds its input (False); one reduced
  in place in SDK memory may hold partial sums (the daemon says True). The
  error-feedback residual is put back as it was: nothing was sent.
- ``WaitTimeout``: only this wait gave up. The request stays pending, its
  staging still the daemon's; wait again or cancel.
- ``retry=N``: on ``PeerLost``, agree on the new world and run the same
  collective again from the original input (kept in a copy), up to N times.
  One with a default tag runs again under the next default tag of the world
  it now runs in, and says which tag it first ran under (``retry_of``, part
  of the digest peers check): it pairs only with the same collective retried
  by the other members. Where a member issues another collective there (a
  restarted trainer's first one, or the next step of a peer on which the
  failed one had completed), both fail with ``MismatchError`` instead of
  mixing two steps' inputs. Wait for such handles in the order they were
  started, on every peer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from collnet.errors import CollnetError, PeerLost, Timeout, WaitTimeout
from collnet.wire.localapi import AllReduce, Cancel
from collnet_client.feedback import ErrorFeedback
from collnet_client.memory import SharedMemory, Staging
from collnet_client.placement import check_dtype, place
from collnet_client.tensors import HostTensor, host_tensor, is_torch_tensor
from collnet_client.transport import Transport
from collnet_client.world import Agreement


@dataclass
class PendingAllReduce:
    """One all-reduce as the SDK tracks it across retries."""

    host: HostTensor
    request: AllReduce  # as last sent: its epoch is the one it runs in
    rid: int
    # The host array the daemon reduces: a view of the caller's bytes, or staging.
    view: npt.NDArray[Any]
    staging: Staging | None
    retries: int
    # The input as sent, kept only when retries are allowed (the daemon reduces in place).
    saved: npt.NDArray[Any] | None
    # Puts the error-feedback residual back as it was if nothing was sent after all.
    undo_feedback: Callable[[], None] | None = None
    # The tag is a default one: a retry takes the next default tag of its world.
    default_tag: bool = False

    @property
    def epoch(self) -> int:
        assert self.request.epoch is not None  # the SDK always names it
        return self.request.epoch


class AllReduces:
    """Starts all-reduces and sees each through; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        memory: SharedMemory,
        agreement: Agreement,
        feedback: ErrorFeedback,
        local_size: int,
    ) -> None:
        self._transport = transport
        self._memory = memory
        self._agreement = agreement
        self._feedback = feedback
        self._local_size = local_size

    def start(
        self,
        tensor: Any,
        op: str,
        codec: str,
        algo: str,
        tag: int | str | None,
        timeout_s: float | None,
        *,
        retry: int,
        error_feedback: bool,
        feedback_key: Any,
    ) -> Handle:
        """Send the all-reduce of ``tensor``; see ``Comm.all_reduce_async``."""
        host = host_tensor(tensor)
        check_dtype(host)
        view, where, staging = place(self._memory, host, copy_in=True)
        undo_feedback = None
        if error_feedback:
            key = _memory_key(tensor) if feedback_key is None else feedback_key
            try:
                undo_feedback = self._feedback.apply(key, codec, view)
            except BaseException:
                if staging is not None:
                    self._memory.unstage(staging)
                raise
        # Not checked here: a request the daemon refuses is also refused on the
        # other peers at once (see collnet.wire.localapi).
        request = AllReduce(
            tag=self._agreement.next_tag() if tag is None else tag,
            shm=where.shm,
            offset=where.offset,
            count=int(view.size),
            dtype=host.dtype.name,
            reduction=op,
            codec=codec,
            algo=algo,
            epoch=self._agreement.epoch,
            timeout_s=timeout_s,
            local_size=self._local_size,
        )
        pending = PendingAllReduce(
            host=host,
            request=request,
            rid=0,
            view=view,
            staging=staging,
            retries=retry,
            saved=view.copy() if retry > 0 else None,
            undo_feedback=undo_feedback,
            default_tag=tag is None,
        )
        self._issue(pending)
        return Handle(_AllReduceOp(self, pending))

    def _issue(self, pending: PendingAllReduce) -> None:
        pending.request = dataclasses.replace(pending.request, epoch=self._agreement.epoch)
        try:
            pending.rid = self._transport.send(pending.request)
        except BaseException:
            self._unstage(pending)
            raise

    def _unstage(self, pending: PendingAllReduce) -> None:
        staging, pending.staging = pending.staging, None
        if staging is not None:
            self._memory.unstage(staging)

    def poll(self, pending: PendingAllReduce) -> bool:
        return self._transport.poll(pending.rid)

    def finish(self, pending: PendingAllReduce, timeout_s: float | None) -> None:
        """Wait for ``pending``'s reply, retrying on PeerLost as it allows; write back.

        A ``WaitTimeout`` leaves the request pending (and its staging the daemon's).
        """
        staged = pending.staging is not None
        try:
            while True:
                try:
                    self._transport.wait(pending.rid, timeout_s)
                    break
                except WaitTimeout:
                    raise
                except CollnetError as exc:
                    failure = exc
                    if isinstance(exc, PeerLost) and pending.retries > 0:
                        try:
                            self._retry(pending, timeout_s)
                            continue
                        except CollnetError as retry_failed:
                            failure = retry_failed
                    if pending.undo_feedback is not None:
                        pending.undo_feedback()
                    if staged:
                        # Written back only on success: it still holds the caller's
                        # input, so a retry is correct as it stands.
                        failure = failure.with_buffer_modified(False)
                    raise failure from None
            if staged:
                pending.host.copy_from(pending.view)
        except WaitTimeout:
            raise
        except BaseException:
            self._unstage(pending)
            raise
        self._unstage(pending)

    def _retry(self, pending: PendingAllReduce, timeout_s: float | None) -> None:
        """Run ``pending`` again, from its input, in the world agreed after a PeerLost."""
        assert pending.saved is not None
        pending.retries -= 1
        np.copyto(pending.view, pending.saved)
        # Another handle's retry may have agreed on the new world already.
        if self._agreement.epoch == pending.epoch:
            try:
                self._agreement.update_topology(timeout_s)
            except WaitTimeout as exc:
                # The barrier goes on in the daemon, but this collective is over.
                raise Timeout(
                    f"{exc.message} (agreeing on the world to retry all_reduce "
                    f"{pending.request.tag!r})",
                    epoch=pending.epoch,
                    tag=pending.request.tag,
                ) from None
        if pending.default_tag:
            request = pending.request
            pending.request = dataclasses.replace(
                request,
                tag=self._agreement.next_tag(),
                retry_of=request.tag if request.retry_of is None else request.retry_of,
            )
        self._issue(pending)

    def cancel(self, pending: PendingAllReduce, timeout_s: float) -> None:
        """Ask the daemon to abort ``pending`` on every peer; no retry follows."""
        pending.retries = 0
        self._transport.call(Cancel(epoch=pending.epoch, tag=pending.request.tag), timeout_s)


class Operation(Protocol):
    """A collective in flight as a ``Handle`` drives it."""

    @property
    def tag(self) -> int | str: ...

    @property
    def epoch(self) -> int: ...

    def poll(self) -> bool:
        """Whether ``finish`` would return (or raise) without waiting."""

    def finish(self, timeout_s: float | None) -> Any:
        """The result, or the collective's typed error; ``WaitTimeout`` leaves it pending."""

    def cancel(self, timeout_s: float) -> None:
        """Ask the daemon to abort it on every peer."""


@dataclass
class _AllReduceOp:
    """An all-reduce as an ``Operation``."""

    all_reduces: AllReduces
    pending: PendingAllReduce

    @property
    def tag(self) -> int | str:
        return self.pending.request.tag

    @property
    def epoch(self) -> int:
        return self.pending.epoch

    def poll(self) -> bool:
        return self.all_reduces.poll(self.pending)

    def finish(self, timeout_s: float | None) -> Any:
        self.all_reduces.finish(self.pending, timeout_s)
        return self.pending.host.original

    def cancel(self, timeout_s: float) -> None:
        self.all_reduces.cancel(self.pending, timeout_s)


class Handle:
    """A collective in flight (any kind: all-reduce, broadcast, all-gather, ...).

    ``wait()`` returns the collective's result (an all-reduce's or a
    broadcast's: the caller's tensor, in place; an all-gather's: its output;
    a barrier's: None) or raises the typed error of a failed collective;
    ``done()`` says whether ``wait()`` would return at once; ``cancel()``
    aborts the collective on every peer. Several handles may be in flight at
    once.
    """

    def __init__(self, op: Operation) -> None:
        self._op = op
        self._finished = False
        self._result: Any = None
        self._error: CollnetError | None = None

    @property
    def tag(self) -> int | str:
        return self._op.tag

    @property
    def epoch(self) -> int:
        return self._op.epoch

    def done(self) -> bool:
        return self._finished or self._op.poll()

    def wait(self, timeout_s: float | None = None) -> Any:
        """The result, or the collective's error.

        ``WaitTimeout`` (a ``Timeout``) when ``timeout_s`` ran out here rather
        than the collective's own deadline: the collective goes on; wait
        again, or ``cancel()``.
        """
        if not self._finished:
            try:
                self._result = self._op.finish(timeout_s)
            except WaitTimeout:
                raise
            except CollnetError as exc:
                self._error = exc
            self._finished = True
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self, timeout_s: float = 30.0) -> bool:
        """Abort this collective on every peer (they get ``CollectiveAborted``).

        Returns True if it was aborted, False if it had finished first. When
        it returns, the daemon no longer touches the tensor. A cancel that
        races with completion may leave other peers finishing it: treat a
        cancelled step as failed everywhere (call ``update_topology``, sync).
        """
        if self.done():
            return False
        self._op.cancel(timeout_s)
        try:
            self.wait(timeout_s)
        except WaitTimeout:
            raise
        except CollnetError:
            return True
        return False


def _memory_key(tensor: Any) -> tuple[str, int, int]:
    """Where ``tensor``'s bytes live: the default key of its error-feedback residual."""
    if is_torch_tensor(tensor):
        return (str(tensor.device), int(tensor.data_ptr()), int(tensor.nbytes))
    return ("cpu", int(tensor.__array_interface__["data"][0]), int(tensor.nbytes))
