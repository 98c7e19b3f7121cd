"""Shared-state sync on one daemon: serving byte ranges, and fetching them.

A sync is two coordinator barriers around a transfer (the plan itself is
``collnet.state``, sans I/O):

1. every member hashes its state and sends the manifest to the ``state``
   barrier, which answers everyone with every member's manifest; each peer
   computes the same reference (``majority``) and its own ``transfer_plan``;
2. each peer fetches the byte ranges it lacks straight into its tensors over
   the data links, striped over the holders, and verifies every fetched
   tensor against the reference digest. Where transfers share a node's link
   (a fetch from several holders, a holder serving several fetchers:
   ``shared_transfers``, the same on every peer), the links' bandwidth meters
   do not time them and the holder sends them untimed;
3. every member reports what it reached (or its error) to the ``synced``
   barrier. Sources keep serving until then, so no fetcher is ever left
   without its holders; everyone learns whether all peers are in bit parity,
   or fails with the same typed error.

On the data links a fetch is a ``FetchRequest``; the source answers each
range with DATA frames (``StatePiece``, striped like any message) or with a
``FetchRefused`` (``collnet.wire.datalink``).

Serving is bounded by who asks: a request from a peer that is not a member of
the world this daemon holds is refused before any work, with one answer, and
its link is closed; a member's requests are served one
range at a time, at most ``MAX_QUEUED_RANGES`` of them queued per peer, and
refusals are logged within the peer's budget of lines
(``collnet.transport.loglimit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy.typing as npt

from collnet.errors import (
    CollnetError,
    InvalidArgument,
    MismatchError,
    PeerLost,
    ProtocolError,
)
from collnet.state import (
    Fetch,
    StateManifest,
    byte_view,
    check_fetch,
    majority,
    shared_transfers,
    transfer_plan,
    verify,
)
from collnet.transport.link import PeerLink
from collnet.transport.loglimit import REMOTE
from collnet.wire import FrameKind
from collnet.wire.datalink import (
    RANGES_PER_FETCH,
    FetchRefused,
    FetchRequest,
    StatePiece,
    state_head,
)
from collnet.wire.localreplies import SyncStateReply
from collnet_daemon.tasks import TaskSet

log = logging.getLogger(__name__)

# Ranges one peer may have waiting to be served (an honest fetcher asks for a
# state's size / 8 MiB ranges per sync: 2**17 is a 1 TiB state from one holder).
MAX_QUEUED_RANGES = 1 << 17


@dataclass
class Serving:
    """The state this daemon declared for the sync in progress (the source side)."""

    manifest: StateManifest
    arrays: Mapping[str, npt.NDArray[Any]]
    # Fetchers whose link from here shares a node's link with another transfer
    # of this sync: their meters do not time it (``shared_transfers``).
    untimed: frozenset[str] = frozenset()


# (barrier name, this peer's payload) -> every member's payload, by peer id.
Barrier = Callable[[str, Any], Awaitable[Mapping[str, Any]]]


@dataclass
class _Pending:
    fetch: Fetch
    dest: memoryview
    remaining: int
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def check_declarations(manifests: Mapping[str, StateManifest], reference: StateManifest) -> None:
    """Every member must declare the same tensors (names, dtypes, shapes).

    A pure function of what the barrier returned, so every peer reaches the
    same verdict and they all fail together instead of some waiting for a
    transfer that never comes.
    """
    want = {n: (i.dtype, i.shape) for n, i in reference.entries.items()}
    for peer in sorted(manifests):
        have = {n: (i.dtype, i.shape) for n, i in manifests[peer].entries.items()}
        if have == want:
            continue
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        differ = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        detail = (
            f"missing {missing[:5]}"
            if missing
            else f"extra {extra[:5]}"
            if extra
            else ", ".join(
                f"{n!r} is {have[n][0]}{list(have[n][1])}, expected {want[n][0]}{list(want[n][1])}"
                for n in differ[:3]
            )
        )
        raise MismatchError(
            f"peers declare different shared state: peer {peer}: {detail}", peer=peer
        )


class StateSync:
    """Both sides of the transfer on one daemon; see the module docstring."""

    def __init__(self, me: str, chunk_bytes: int) -> None:
        self.me = me
        self.chunk_bytes = chunk_bytes
        self.serving: Serving | None = None
        self.pending: dict[int, _Pending] = {}
        self._fids = itertools.count(1)
        self._touched = False
        self._tasks = TaskSet()
        # Ranges each peer has waiting to be served.
        self._queued: dict[str, int] = {}

    # -- one sync ----------------------------------------------------------
    async def sync(
        self,
        mine: StateManifest,
        arrays: Mapping[str, npt.NDArray[Any]],
        links: Callable[[], Awaitable[Mapping[str, PeerLink]]],
        barrier: Barrier,
    ) -> SyncStateReply:
        """Bring ``arrays`` (described by ``mine``) to the world's reference state;
        the result for the client."""
        if self.serving is not None:
            raise InvalidArgument(
                "a state sync is already in progress on this daemon (several trainers of "
                "one node sync together: connect them with local_size)"
            )
        started = time.perf_counter()
        self.serving = Serving(mine, arrays)
        self._touched = False
        fetched: list[str] = []
        sources: list[str] = []
        nbytes = 0
        try:
            raw = await barrier("state", msgpack.packb(mine.to_wire(), use_bin_type=True))
            manifests = self._manifests(raw)
            reference = majority(manifests)
            assert reference is not None  # this peer's own manifest is among them
            report: dict[str, Any]
            try:
                check_declarations(manifests, reference)
                shared = shared_transfers(manifests, reference, self.chunk_bytes)
                self.serving.untimed = frozenset(f for s, f in shared if s == self.me)
                fetched, sources, nbytes = await self.fetch(
                    manifests, reference, arrays, await links(), shared
                )
                # What this peer now holds: its own entries, and for what it fetched
                # the digests just verified on arrival (the peers compare these).
                held = dict(mine.entries)
                held.update({name: reference.entries[name] for name in fetched})
                report = {
                    "revision": reference.revision,
                    "digest": StateManifest(reference.revision, held).state_digest(),
                }
            except CollnetError as exc:
                # Tell the others: they would otherwise wait for this peer at the
                # next barrier until their deadline.
                report = {"error": exc.to_wire()}
            reports = await barrier("synced", report)
        finally:
            self.serving = None
        self._raise_failures(reports)
        reached = {(r.get("revision"), r.get("digest")) for r in reports.values()}
        elapsed = time.perf_counter() - started
        if nbytes:
            log.info(
                "state sync: %.1f MiB from %s in %.2fs (%.2f GB/s), revision %d",
                nbytes / 2**20,
                sources,
                elapsed,
                nbytes / elapsed / 1e9,
                reference.revision,
            )
        return SyncStateReply(
            revision=reference.revision,
            fetched=tuple(fetched),
            sources=tuple(sources),
            bytes_fetched=nbytes,
            in_parity=len(reached) == 1,
            state_digest=report["digest"],
            peers=len(reports),
        )

    async def refuse(self, barrier: Barrier, exc: CollnetError) -> None:
        """This peer cannot take part (a bad request, say): it still arrives at the
        first barrier, with its error, so every member fails at once with it."""
        with contextlib.suppress(CollnetError, TimeoutError):
            await barrier("state", msgpack.packb({"error": exc.to_wire()}, use_bin_type=True))

    def _manifests(self, raw: Mapping[str, Any]) -> dict[str, StateManifest]:
        decoded: dict[str, Any] = {}
        for peer, blob in raw.items():
            try:
                decoded[peer] = msgpack.unpackb(blob, raw=False)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise ProtocolError(f"bad state manifest from {peer}: {exc}") from None
        self._raise_failures(decoded)
        return {peer: StateManifest.from_wire(obj) for peer, obj in decoded.items()}

    def _raise_failures(self, reports: Mapping[str, Any]) -> None:
        """Raise the error of the first member (by id) that reported one, if any."""
        failures = sorted(
            (p, r["error"]) for p, r in reports.items() if isinstance(r, dict) and "error" in r
        )
        if not failures:
            return
        peer, wire = failures[0]
        err = CollnetError.from_wire(wire if isinstance(wire, dict) else {})
        message = err.message
        if peer != self.me:
            message = f"state sync failed on peer {peer}: {message}"
        # Fetched ranges overwrote the tensors they were for; nothing else did.
        raise type(err)(message, buffer_modified=self._touched, **{"peer": peer, **err.fields})

    # -- fetching ----------------------------------------------------------
    async def fetch(
        self,
        manifests: Mapping[str, StateManifest],
        reference: StateManifest,
        arrays: Mapping[str, npt.NDArray[Any]],
        links: Mapping[str, PeerLink],
        shared: frozenset[tuple[str, str]] = frozenset(),
    ) -> tuple[list[str], list[str], int]:
        """Fetch and verify what this peer lacks; (names fetched, sources, bytes).

        The links of ``shared`` (source, fetcher) pairs carry only a share of
        this node's link or of the source's while the fetch runs: their meters
        do not time it, or the next epoch's plan would read a share for a link.
        """
        plan = transfer_plan(manifests, reference, self.me, self.chunk_bytes)
        names = sorted({f.name for f in plan})
        sources = sorted({f.source_peer for f in plan})
        total = sum(f.nbytes for f in plan)
        if not plan:
            return [], [], 0
        self._touched = True
        log.info(
            "state sync: fetching %d tensors (%.1f MiB) from %d holders %s",
            len(names),
            total / 2**20,
            len(sources),
            sources,
        )
        mine: list[_Pending] = []
        by_source: dict[str, list[tuple[int, Any]]] = {}
        for f in plan:
            dest = byte_view(arrays[f.name])[f.offset : f.offset + f.nbytes]
            fid = next(self._fids)
            p = self.pending[fid] = _Pending(f, dest.data, f.nbytes)
            mine.append(p)
            by_source.setdefault(f.source_peer, []).append((fid, f.to_wire()))
        meters = [links[s].rx_meter for s in by_source if (s, self.me) in shared and s in links]
        for meter in meters:
            meter.share()
        try:
            for source, ranges in by_source.items():
                link = links[source]
                for i in range(0, len(ranges), RANGES_PER_FETCH):
                    request = FetchRequest(tuple(ranges[i : i + RANGES_PER_FETCH]))
                    link.send_control(FrameKind.CONTROL, request.to_wire())
            await asyncio.gather(*(p.future for p in mine))
        finally:
            for meter in meters:
                meter.unshare()
            for fid in [fid for fid, p in self.pending.items() if p in mine]:
                del self.pending[fid]
        for name in names:
            # Hashing hundreds of MiB must not stall heartbeats on this loop.
            await asyncio.to_thread(verify, name, arrays[name], reference)
        return names, sources, total

    def _pending_from(self, peer: str, fid: int) -> _Pending | None:
        p = self.pending.get(fid)
        if p is not None and p.fetch.source_peer != peer:
            raise ProtocolError(f"{peer} answered state fetch {fid} addressed to another peer")
        return p

    def data_sink(self, peer: str, piece: StatePiece, nbytes: int) -> memoryview | None:
        p = self._pending_from(peer, piece.fid)
        if p is None:
            return None  # a fetch that already failed here: read and drop
        offset, total = piece.offset, piece.total
        if total != p.fetch.nbytes or offset < 0 or offset + nbytes > total:
            raise ProtocolError(
                f"{peer} sent bytes [{offset}, {offset + nbytes}) of {total} for state fetch "
                f"{piece.fid} of {p.fetch.nbytes} bytes"
            )
        return p.dest[offset : offset + nbytes]

    def on_data(self, peer: str, piece: StatePiece, payload: memoryview) -> None:
        p = self._pending_from(peer, piece.fid)
        if p is None or p.future.done():
            return
        p.remaining -= len(payload)
        if p.remaining <= 0:
            p.future.set_result(None)

    def on_link_lost(self, peer: str, exc: CollnetError) -> None:
        for p in self.pending.values():
            if p.fetch.source_peer == peer and not p.future.done():
                p.future.set_exception(
                    PeerLost(f"state holder {peer} lost during sync: {exc.message}", peer=peer)
                )

    # -- serving -----------------------------------------------------------
    def on_control(
        self,
        peer: str,
        message: FetchRequest | FetchRefused,
        link: PeerLink | None,
        member: bool = True,
    ) -> None:
        """A fetch request to serve over ``link`` (None: not, or no longer, usable:
        the fetcher learns it from the loss), or a source's refusal. ``member``:
        ``peer`` is a member of the world this daemon holds (else its request is
        refused and its link closed, once its ranges are known to be well formed)."""
        if isinstance(message, FetchRefused):
            p = self._pending_from(peer, message.fid)
            if p is not None and not p.future.done():
                p.future.set_exception(message.error)
            return
        queued = self._queued.get(peer, 0) + len(message.ranges)
        if queued > MAX_QUEUED_RANGES:
            raise ProtocolError(
                f"{peer} has more than {MAX_QUEUED_RANGES} state fetch ranges waiting"
            )
        parsed = [(fid, Fetch.from_wire(fetch)) for fid, fetch in message.ranges]
        if not member:
            self._refuse_stranger(peer, message, link)
            return
        if link is None:
            return
        self._queued[peer] = queued
        self._tasks.spawn(self._serve(peer, link, parsed))

    def _refuse_stranger(self, peer: str, message: FetchRequest, link: PeerLink | None) -> None:
        """A fetch from ``peer``, which is not a member of the world this daemon
        holds: one refusal, the link closed, no range served."""
        error = MismatchError(
            f"{self.me} serves no state to {peer}: not a member of the world it holds"
        )
        REMOTE.warning(log, peer, "state fetch refused, link closed: %s", error.message)
        if link is None:
            return
        with contextlib.suppress(CollnetError):
            link.send_control(
                FrameKind.CONTROL, FetchRefused(message.ranges[0][0], error).to_wire()
            )
        link.fail(PeerLost(f"link to {peer} closed: {error.message}", peer=peer), flush=True)

    async def _serve(self, peer: str, link: PeerLink, ranges: list[tuple[int, Fetch]]) -> None:
        try:
            await self._serve_ranges(peer, link, ranges)
        finally:
            left = self._queued.get(peer, 0) - len(ranges)
            if left > 0:
                self._queued[peer] = left
            else:
                self._queued.pop(peer, None)

    async def _serve_ranges(
        self, peer: str, link: PeerLink, ranges: list[tuple[int, Fetch]]
    ) -> None:
        for fid, fetch in ranges:
            try:
                serving = self.serving
                if serving is None:
                    raise MismatchError(f"{self.me} has no state sync in progress")
                check_fetch(fetch, serving.manifest, self.me)
                data = byte_view(serving.arrays[fetch.name])
                link.send_data(
                    state_head(fid),
                    data[fetch.offset :][: fetch.nbytes].data,
                    timed=peer not in serving.untimed,
                )
                # One range at a time: the views stay in the owner's tensor and
                # are never buffered wholesale in user space.
                await link.drain()
            except CollnetError as exc:
                if link.failed:
                    return
                REMOTE.warning(
                    log, peer, "state fetch of %r by %s refused: %s", fetch.name, peer, exc
                )
                with contextlib.suppress(CollnetError):
                    link.send_control(FrameKind.CONTROL, FetchRefused(fid, exc).to_wire())

    def close(self) -> None:
        self._tasks.cancel()
