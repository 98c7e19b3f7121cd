"""The one thread that calls a process group's ``Comm``, and the ``Work`` it completes.

A ``Comm`` talks over one pyzmq socket, which is not thread-safe, while torch
calls a process group from several threads (the caller's; autograd's, for
DDP's buckets). So a ``CommThread`` owns the Comm: callers submit ``Op``s to
its queue and get a ``Pending`` back; nothing else calls the Comm while the
thread lives.

Invariants:

- ops start in the order they were submitted, so every rank that submits
  the same collectives in the same order (torch's contract) gives them the
  same default tags; several are in flight at once, and each finishes in the
  order it started (the SDK asks for that, see ``collnet_client.handles``);
- an ``exclusive`` op (agreeing on a new world) starts only when nothing is
  in flight, and nothing starts before it is over;
- every ``Pending`` completes exactly once, with its value or with its error:
  a ``CollnetError`` becomes the class of ``collnet_client.torch.errors`` of
  its kind (also a ``DistBackendError``). The thread outlives any op's error;
  ops still queued when it stops fail with ``CollectiveAborted``.
- ``Pending.future`` is safe to hand to torch's C++ side (DDP's reducer): a
  failed op completes it with an error raised in a callback (a ``RuntimeError``
  naming the typed error, as torch makes of it), never with an exception
  object as its value, which the reducer would take for tensors.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from collnet.errors import CollectiveAborted, CollnetError, WaitTimeout
from collnet_client.client import Comm
from collnet_client.torch.errors import as_torch_error

# How long the thread waits on the oldest op before looking for new ones: the
# most a newly submitted op waits to start while others are in flight.
POLL_S = 0.002


class Waitable(Protocol):
    """An SDK handle: ``wait`` returns the result, or raises ``WaitTimeout`` when not done."""

    def wait(self, timeout_s: float | None = None) -> Any: ...


@dataclass
class Op:
    """One request to the Comm.

    ``start`` issues the SDK's async calls and returns their handles;
    ``finish`` turns their results (in order) into the op's value, once every
    handle succeeded. ``exclusive``: see the module docstring.
    """

    name: str
    start: Callable[[Comm], Sequence[Waitable]]
    finish: Callable[[list[Any]], Any]
    exclusive: bool = False


class _Failed:
    """An op's error, carried as the value of the base future (see ``Pending``)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _unwrap(fut: torch.futures.Future[Any]) -> Any:
    value = fut.value()
    if isinstance(value, _Failed):
        raise value.error
    return value


class Pending:
    """The outcome of one op: its value or error, an event, and a torch future."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self._base: torch.futures.Future[Any] = torch.futures.Future()
        self.future: torch.futures.Future[Any] = self._base.then(_unwrap)

    def done(self) -> bool:
        return self._done.is_set()

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.value, self.error = value, error
        self._done.set()
        self._base.set_result(_Failed(error) if error is not None else value)

    def wait_done(self) -> None:
        """Until the op is over, however it ended."""
        self._done.wait()

    def wait(self, timeout_s: float | None = None) -> Any:
        """The value, or raise the op's error; a typed ``WaitTimeout`` if ``timeout_s`` ran out."""
        if not self._done.wait(timeout_s):
            raise as_torch_error(
                WaitTimeout(f"{self.name} did not finish within {timeout_s:.1f}s; it goes on")
            )
        if self.error is not None:
            raise self.error
        return self.value


class CollnetWork(dist.Work):
    """torch's ``Work`` for one op of ``ProcessGroupCollnet``.

    ``wait()`` blocks until the op is over and raises its typed error (a
    ``DistBackendError`` too); ``get_future()`` completes when the op does,
    with the op's value (the list of output tensors), or with an error.
    """

    def __init__(self, pending: Pending) -> None:
        super().__init__()
        self.pending = pending

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        # torch's convention: a zero timeout waits as long as it takes.
        seconds = timeout.total_seconds()
        self.pending.wait(seconds if seconds > 0 else None)
        return True

    def is_completed(self) -> bool:
        return self.pending.done()

    def is_success(self) -> bool:
        return self.pending.done() and self.pending.error is None

    def exception(self) -> BaseException | None:
        return self.pending.error

    def get_future(self) -> torch.futures.Future[Any]:
        return self.pending.future

    def result(self) -> Any:
        return self.pending.wait()

    def synchronize(self) -> None:
        """CPU results are complete once the op is; nothing to order on a stream."""


@dataclass
class _InFlight:
    pending: Pending
    op: Op
    handles: list[Waitable]
    results: list[Any] = field(default_factory=list)
    error: BaseException | None = None


_STOP = object()


class CommThread:
    """Owns one ``Comm`` on a thread of its own; see the module docstring."""

    def __init__(self, comm: Comm, name: str) -> None:
        self._comm = comm
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> Pending:
        pending = Pending(op.name)
        with self._lock:
            if self._closed:
                pending.set(error=as_torch_error(CollectiveAborted(f"{op.name}: group destroyed")))
                return pending
            self._queue.put((op, pending))
        return pending

    def stop(self, timeout_s: float) -> bool:
        """Finish what is in flight, fail what is queued, end the thread; whether it ended."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the thread ----------------------------------------------------------
    def _run(self) -> None:
        inflight: collections.deque[_InFlight] = collections.deque()
        held: tuple[Op, Pending] | None = None
        stopping = False
        while True:
            # Take new ops while nothing exclusive waits for the ones in flight.
            while held is None and not stopping:
                try:
                    job = self._queue.get(block=not inflight)
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                op, pending = job
                if op.exclusive and inflight:
                    held = (op, pending)
                    break
                self._start(op, pending, inflight)
            if inflight:
                self._advance(inflight)
            elif held is not None:
                op, pending = held
                held = None
                self._start(op, pending, inflight)
            elif stopping:
                break
        self._fail_queued()

    def _start(self, op: Op, pending: Pending, inflight: collections.deque[_InFlight]) -> None:
        try:
            handles = list(op.start(self._comm))
        except BaseException as exc:
            pending.set(error=_typed(exc))
            return
        inflight.append(_InFlight(pending, op, handles))

    def _advance(self, inflight: collections.deque[_InFlight]) -> None:
        """Wait a moment on the oldest op; complete it when all its handles are over."""
        head = inflight[0]
        if len(head.results) < len(head.handles):
            handle = head.handles[len(head.results)]
            try:
                result = handle.wait(timeout_s=POLL_S)
            except WaitTimeout:
                return
            except BaseException as exc:
                # Its other handles are still waited for: their staging is the daemon's.
                result = None
                head.error = head.error or _typed(exc)
            head.results.append(result)
            if len(head.results) < len(head.handles):
                return
        inflight.popleft()
        if head.error is not None:
            head.pending.set(error=head.error)
            return
        try:
            value = head.op.finish(head.results)
        except BaseException as exc:
            head.pending.set(error=_typed(exc))
            return
        head.pending.set(value)

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get(block=False)
            except queue.Empty:
                return
            if job is not _STOP:
                op, pending = job
                pending.set(error=as_torch_error(CollectiveAborted(f"{op.name}: group destroyed")))


def _typed(exc: BaseException) -> BaseException:
    return as_torch_error(exc) if isinstance(exc, CollnetError) else exc
