"""Several trainers on one node: their requests meet here and cross the WAN once.

Each trainer's request names ``local_size``, the number of trainers on this
node (one per GPU, say). Requests for the same operation (``update_topology``;
the all-reduce ``(epoch, tag)``; the ``sync_state`` of an epoch) wait for one
another; when all ``local_size`` have arrived, one action runs on all of them
(a local reduction then one network all-reduce, one coordinator barrier, one
state sync) and every trainer gets its outcome, the same error included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from collnet.algo.ops import combine, finalize
from collnet.errors import CollnetError, MismatchError, Timeout
from collnet_daemon.tasks import TaskSet

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Group(Generic[T]):
    size: int
    items: list[T] = field(default_factory=list)
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def fail(self, exc: CollnetError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: members that gave up need not see it


class LocalGroups:
    """Open rendezvous of this node's trainers, by operation key."""

    def __init__(self) -> None:
        self.open: dict[Hashable, _Group[Any]] = {}
        self._tasks = TaskSet()

    async def run(
        self,
        key: Hashable,
        size: int,
        item: T,
        action: Callable[[list[T]], Awaitable[R]],
        timeout_s: float,
    ) -> R:
        """Join the group ``key`` of ``size`` trainers; the last arrival runs ``action``."""
        group = self.open.get(key)
        if group is None:
            group = self.open[key] = _Group(size)
        elif group.size != size:
            del self.open[key]
            exc = MismatchError(
                f"local trainers disagree on how many they are for {key}: {group.size} and {size}"
            )
            group.fail(exc)
            raise exc
        group.items.append(item)
        if len(group.items) == size:
            del self.open[key]
            self._tasks.spawn(self._perform(group, action))
        try:
            result: R = await asyncio.wait_for(asyncio.shield(group.done), timeout_s)
        except TimeoutError:
            if self.open.get(key) is group:
                del self.open[key]
            late = Timeout(
                f"{len(group.items)} of {size} local trainers joined {key} within {timeout_s:.1f}s"
            )
            group.fail(late)
            raise late from None
        return result

    @staticmethod
    async def _perform(group: _Group[T], action: Callable[[list[T]], Awaitable[R]]) -> None:
        try:
            result = await action(group.items)
        except CollnetError as exc:
            group.fail(exc)
        except Exception as exc:  # every member must get an answer, never a hang
            group.fail(CollnetError(f"local group action failed: {exc!r}"))
        else:
            if not group.done.done():
                group.done.set_result(result)

    def fail_all(self, exc: CollnetError, spare: Hashable | None = None) -> None:
        """Fail every open group (but the one of key ``spare``) with ``exc``."""
        for key, group in list(self.open.items()):
            if key != spare:
                group.fail(exc)
                del self.open[key]


def reduce_locally(op: str, arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """The node's contribution: ``op`` over its trainers' tensors (avg: their mean).

    Then one network all-reduce of this array stands for all of them; with
    ``avg`` the world's result is the mean of the nodes' means, which is the
    mean over all trainers when every node runs as many.
    """
    acc = np.array(arrays[0], copy=True)
    for arr in arrays[1:]:
        combine(op, acc, arr)
    finalize(op, acc, len(arrays))
    return acc
