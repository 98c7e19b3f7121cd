"""``sync_state`` from the SDK: the named tensors placed where the daemon can sync them.

Arrays in SDK memory are synced in place with no copy. The others are
staged through one shared segment (64-byte aligned slots: one mapping
however many tensors), and only the tensors the daemon fetched are copied
back. torch tensors go through host arrays: CPU ones through a view of their
bytes, CUDA or strided ones through a host copy copied back when fetched.

Failure model: on any error the caller's tensors hold what they held, except
tensors in SDK memory the daemon fetched into before failing (the error says
``buffer_modified``). A ``WaitTimeout`` leaves the sync running: the daemon may
still fetch into the staging segment, so that segment is never reused (it is
freed when the ``Comm`` closes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from collnet.errors import InvalidArgument, WaitTimeout
from collnet.wire.localapi import StateTensor, SyncState
from collnet.wire.localreplies import SyncStateReply
from collnet_client.memory import SharedMemory
from collnet_client.tensors import host_tensor, is_torch_tensor
from collnet_client.transport import Transport
from collnet_client.world import Agreement

_SLOT_ALIGN = 64


class StateSync:
    """Runs ``Comm.sync_state``; see the module docstring."""

    def __init__(
        self, transport: Transport, memory: SharedMemory, agreement: Agreement, local_size: int
    ) -> None:
        self._transport = transport
        self._memory = memory
        self._agreement = agreement
        self._local_size = local_size

    def sync(
        self, named_tensors: Mapping[str, Any], revision: int, timeout_s: float | None
    ) -> SyncStateReply:
        if any(is_torch_tensor(t) for t in named_tensors.values()):
            return self._sync_host_copies(named_tensors, revision, timeout_s)
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise InvalidArgument(f"revision must be a non-negative int, got {revision!r}")
        entries: list[StateTensor] = []
        staged: list[tuple[str, npt.NDArray[Any]]] = []
        for name, arr in named_tensors.items():
            if not isinstance(name, str) or not isinstance(arr, np.ndarray):
                raise InvalidArgument(f"sync_state takes str -> numpy array, got {name!r:.40}")
            where = self._memory.locate(arr)
            if where is None:
                staged.append((name, arr))
            else:
                entries.append(_entry(name, where[0].name, where[1], arr))
        offsets, end = [], 0
        for _, arr in staged:
            offsets.append(end)
            end += -(-arr.nbytes // _SLOT_ALIGN) * _SLOT_ALIGN
        staging = self._memory.stage(max(end, 1)) if staged else None
        if staging is not None:
            for (name, arr), off in zip(staged, offsets, strict=True):
                np.copyto(_slot(staging[1], off, arr), arr)
                entries.append(_entry(name, staging[0].name, off, arr))
        request = SyncState(
            tensors=tuple(entries),
            revision=revision,
            epoch=self._agreement.epoch,
            timeout_s=timeout_s,
            local_size=self._local_size,
        )
        try:
            result = SyncStateReply.from_wire(self._transport.call(request, timeout_s))
            if staging is not None:
                fetched = set(result.fetched)
                for (name, arr), off in zip(staged, offsets, strict=True):
                    if name in fetched:
                        np.copyto(arr, _slot(staging[1], off, arr))
        except WaitTimeout:
            staging = None  # still the daemon's: never reused (close() frees it)
            raise
        finally:
            if staging is not None:
                self._memory.unstage(staging)
        return result

    def _sync_host_copies(
        self, named_tensors: Mapping[str, Any], revision: int, timeout_s: float | None
    ) -> SyncStateReply:
        """``sync`` of tensors that are not all numpy arrays: through host arrays."""
        hosts = {name: host_tensor(t) for name, t in named_tensors.items()}
        arrays: dict[str, npt.NDArray[Any]] = {}
        for name, host in hosts.items():
            if host.array is not None:
                arrays[name] = host.array
            else:
                arrays[name] = np.empty(host.shape, host.dtype)
                host.copy_into(arrays[name])
        result = self.sync(arrays, revision, timeout_s)
        for name in result.fetched:
            if hosts[name].array is None:
                hosts[name].copy_from(arrays[name])
        return result


def _entry(name: str, shm: str, offset: int, arr: npt.NDArray[Any]) -> StateTensor:
    return StateTensor(name, shm, offset, arr.dtype.name, tuple(arr.shape))


def _slot(staging: npt.NDArray[Any], offset: int, like: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The bytes of ``like``'s slot in a staging segment, as an array shaped like it."""
    return staging[offset : offset + like.nbytes].view(like.dtype).reshape(like.shape)
