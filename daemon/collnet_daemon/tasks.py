"""Tasks a part of the daemon starts and does not await itself.

The event loop keeps only weak references to tasks, so an owner keeps its
own until they end, and cancels them all when it closes. A future whose
outcome concerns nobody (a shared call whose waiters re-raise it, a setup
given up) gets ``quiet`` so its exception is not reported as unretrieved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def quiet(fut: asyncio.Future[Any]) -> None:
    """A done-callback that retrieves an outcome nobody else will."""
    if not fut.cancelled():
        fut.exception()


class TaskSet:
    """The background tasks of one owner; ``on_failure`` hears of each that raised."""

    def __init__(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_failure = on_failure

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._on_failure is not None and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._on_failure(exc)

    def cancel(self) -> None:
        """Cancel every task but the one calling (a stop may run as one of them)."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
