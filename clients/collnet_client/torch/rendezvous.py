"""How ``init_process_group("collnet")`` finds its daemon, rank and world size, and re-forms.

torch wants a rank, a world size and a key-value store before it builds a
group; collnet has none of them up front: the world is whatever the peers
agree on at ``update_topology``. So the group is built after an agreement:

- ``dist.init_process_group("collnet", init_method="collnet://")``: the
  ``collnet://`` rendezvous connects to the local daemon (``?daemon=ADDRESS``,
  else ``$COLLNET_DAEMON``, else the daemon's default address), waits until
  ``world_size`` peers (if given) are members or pending, calls
  ``update_topology`` and hands torch the agreed rank and size (``Comm.rank``
  and ``Comm.size``: with one trainer per daemon, the peer's position in the
  world's peer list and the peer count). ``rank``, if given, must be that
  one. The group owns the Comm and closes it when destroyed.
- Several trainers per daemon (one per GPU): ``?local_size=L&local_rank=l``
  (else ``$COLLNET_LOCAL_SIZE`` and ``$COLLNET_LOCAL_RANK``); every node runs
  ``L`` trainers, and trainer ``l`` of the node at position ``d`` is rank
  ``d * L + l`` of ``peers * L`` (``world_size``, if given, counts trainers:
  the rendezvous waits for ``world_size / L`` peers).
- ``collnet_client.torch.init_process_group(comm)``: the same over a Comm
  the caller holds (and closes).
- ``reinit()``: after a failure, agree on the new world with the same Comm
  and replace the default group (``destroy_process_group`` +
  ``init_process_group`` in the same process); returns the new group.

collnet needs no store: torch gets a ``CollnetStore``, an in-process
``HashStore`` that carries the Comm to the backend's constructor.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch.distributed as dist
from torch._C._distributed_c10d import HashStore, PrefixStore, Store
from torch.distributed.rendezvous import register_rendezvous_handler

import collnet_client
from collnet.errors import CollnetError, InvalidArgument
from collnet_client.client import Comm
from collnet_client.torch.errors import as_torch_error
from collnet_client.torch.process_group import BACKEND, ProcessGroupCollnet

SCHEME = "collnet"
DEFAULT_TIMEOUT = timedelta(minutes=30)
_LOOK_S = 0.05


class CollnetStore(HashStore):
    """The store torch is given: it carries the Comm (and who closes it) to the backend.

    torch keeps only the C++ store (the Python object, and any attribute on it,
    is gone by the time the backend is built), so the store holds a key that
    names the Comm in ``_HANDOFF``, which ``create_backend`` claims.
    """

    KEY = "collnet/comm"

    def __init__(self, comm: Comm, *, owns_comm: bool = False) -> None:
        super().__init__()
        token = uuid.uuid4().hex
        _HANDOFF[token] = (comm, owns_comm)
        self.set(self.KEY, token)


# Comms on their way from a CollnetStore to the group built over them.
_HANDOFF: dict[str, tuple[Comm, bool]] = {}


def _claim(store: Store) -> tuple[Comm, bool] | None:
    base: Any = store
    while isinstance(base, PrefixStore):
        base = base.underlying_store
    if not base.check([CollnetStore.KEY]):
        return None
    return _HANDOFF.pop(base.get(CollnetStore.KEY).decode(), None)


def agree(comm: Comm, min_size: int = 1, timeout_s: float | None = None) -> tuple[int, int]:
    """Wait for ``min_size`` peers (members or pending), agree on the world; this
    trainer's rank and the trainer count."""
    if comm.local_rank is None:
        raise as_torch_error(
            InvalidArgument(
                f"the collnet backend with local_size {comm.local_size} needs each trainer's "
                "local_rank (connect(local_rank=...), ?local_rank= or $COLLNET_LOCAL_RANK)"
            )
        )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            # A look, not update_topology: an extra barrier would leave this peer
            # one agreement ahead of the others.
            world = comm.world
            if world.size + len(world.pending) >= min_size:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise collnet_client.Timeout(
                    f"the world did not reach {min_size} peers within {timeout_s}s"
                )
            time.sleep(_LOOK_S)
        comm.update_topology(timeout_s)
        return comm.rank, comm.size
    except CollnetError as exc:
        raise as_torch_error(exc) from None


def init_process_group(
    comm: Comm,
    *,
    min_size: int = 1,
    timeout: timedelta = DEFAULT_TIMEOUT,
    owns_comm: bool = False,
) -> ProcessGroupCollnet:
    """Agree on the world over ``comm`` and make the default group of it; the group."""
    rank, size = agree(comm, min_size, timeout.total_seconds())
    dist.init_process_group(
        BACKEND,
        store=CollnetStore(comm, owns_comm=owns_comm),
        rank=rank,
        world_size=size,
        timeout=timeout,
    )
    return default_group()


def reinit(timeout: timedelta | None = None) -> ProcessGroupCollnet:
    """Re-form the default collnet group on the world agreed now; the new group.

    Every survivor calls it (``update_topology`` is a barrier); a peer that
    joined meanwhile is admitted and calls ``init_process_group`` at the
    same time. Ops of the old group still in flight end first.
    """
    old = default_group()
    timeout = old.timeout if timeout is None else timeout
    owns = old.owns_comm
    comm = old.release_comm()
    dist.destroy_process_group()
    return init_process_group(comm, timeout=timeout, owns_comm=owns)


def default_group() -> ProcessGroupCollnet:
    group = dist.distributed_c10d._get_default_group()
    if not isinstance(group, ProcessGroupCollnet):
        raise as_torch_error(InvalidArgument(f"the default group is not collnet's: {group!r}"))
    return group


# -- what torch calls ---------------------------------------------------------------


def create_backend(store: Store, rank: int, size: int, timeout: timedelta) -> ProcessGroupCollnet:
    """torch's constructor hook: the group over the Comm the store carries."""
    claimed = _claim(store)
    if claimed is None:
        raise as_torch_error(
            InvalidArgument(
                'the collnet backend gets its world from the daemon: use init_method="collnet://" '
                "or collnet_client.torch.init_process_group(comm)"
            )
        )
    comm, owns_comm = claimed
    return ProcessGroupCollnet(comm, rank, size, timeout, owns_comm=owns_comm)


def collnet_rendezvous(
    url: str, timeout: timedelta = DEFAULT_TIMEOUT, **kwargs: Any
) -> Iterator[tuple[Store, int, int]]:
    """The ``collnet://`` rendezvous; see the module docstring."""
    query = parse_qs(urlparse(url).query)

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    rank = int(one("rank") or -1)
    min_size = max(1, int(one("world_size") or -1))
    local_size, local_rank = one("local_size"), one("local_rank")
    try:
        comm = collnet_client.connect(
            one("daemon"),
            timeout_s=timeout.total_seconds(),
            local_size=None if local_size is None else int(local_size),
            local_rank=None if local_rank is None else int(local_rank),
        )
    except CollnetError as exc:
        raise as_torch_error(exc) from None
    try:
        # torch's world_size counts trainers; the world counts daemons.
        peers = -(-min_size // comm.local_size)
        agreed, size = agree(comm, peers, timeout.total_seconds())
        if rank not in (-1, agreed):
            raise as_torch_error(
                InvalidArgument(
                    f"rank {rank} was asked for, but collnet's agreed world makes this peer "
                    f"rank {agreed}: leave rank out"
                )
            )
    except BaseException:
        comm.close()
        raise
    yield CollnetStore(comm, owns_comm=True), agreed, size


def register() -> None:
    """Make ``"collnet"`` a torch.distributed backend and ``collnet://`` a rendezvous."""
    dist.Backend.register_backend(BACKEND, create_backend, devices=["cpu", "cuda"])
    with contextlib.suppress(RuntimeError):  # registered already: the module was reloaded
        register_rendezvous_handler(SCHEME, collnet_rendezvous)  # type: ignore[no-untyped-call]
