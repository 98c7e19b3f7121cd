"""Which state is right, who must fetch what, and from whom.

Inputs are the manifests every peer reported (``{peer_id: StateManifest}``);
outputs are a reference manifest, per-peer fetch lists and byte-range
transfer plans. Everything here is a deterministic function of its inputs,
so every peer (and the coordinator) that computes a plan from the same
manifests gets the same answer without another round of messages.

Invariants:

- The reference (``majority``) is built from the peers at the newest
  revision only: per tensor name, the entry (digest, dtype, shape) reported
  by the most of those peers, ties broken by the smallest digest (then dtype
  and shape). The reference's names are the union of those peers' names;
  a peer of that revision lacking one simply fetches it.
- ``transfer_plan`` covers every byte of every tensor the peer needs exactly
  once, takes each range from a peer whose manifest holds the exact
  reference entry for that tensor (at any revision: the digest, not the
  revision, says the bytes are right), never from the peer itself, and
  stripes a tensor of k chunks over min(k, holders) distinct holders.
- ``shared_transfers`` names the (source, fetcher) pairs whose bytes share a
  node's link with another transfer of the same sync, the same on every peer.
- Zero-byte tensors get no ``Fetch``: the receiver allocates every needed
  tensor from its reference entry (``allocate``) before fetching, and a
  zero-byte tensor is complete once allocated. ``verify`` still checks it.
- A received tensor is accepted only if ``verify`` recomputes exactly the
  reference digest; a mismatch is a ``ProtocolError`` (a corrupt or lying
  transfer), never a silently different state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy.typing as npt
import xxhash

from collnet.errors import InvalidArgument, MismatchError, ProtocolError
from collnet.state.digest import (
    _DIGEST_RE,
    MAX_NAME_CHARS,
    MAX_TENSOR_BYTES,
    StateManifest,
    TensorInfo,
    _check_name,
    _is_int,
    tensor_digest,
)

__all__ = [
    "Fetch",
    "check_fetch",
    "diverged",
    "holders",
    "in_parity",
    "majority",
    "shared_transfers",
    "stale_names",
    "transfer_plan",
    "verify",
]

MAX_PEER_ID_CHARS: Final = MAX_NAME_CHARS


@dataclass(frozen=True, slots=True)
class Fetch:
    """Bytes ``[offset, offset + nbytes)`` of tensor ``name``, to be read from ``source_peer``.

    ``digest`` is the reference digest of the whole tensor: the source serves
    the range only while it still holds exactly that tensor (``check_fetch``),
    so a source whose state moved on refuses instead of sending other bytes.
    """

    name: str
    offset: int
    nbytes: int
    source_peer: str
    digest: str

    def to_wire(self) -> list[Any]:
        return [self.name, self.offset, self.nbytes, self.source_peer, self.digest]

    @staticmethod
    def from_wire(obj: Any) -> Fetch:
        """Decode and validate a fetch request; ``ProtocolError`` on anything malformed."""
        if not isinstance(obj, list | tuple) or len(obj) != 5:
            raise ProtocolError("bad state fetch: expected a 5-list")
        name, offset, nbytes, source, digest = obj
        _check_name(name)
        for label, value in (("offset", offset), ("nbytes", nbytes)):
            if not _is_int(value) or not 0 <= value <= MAX_TENSOR_BYTES:
                raise ProtocolError(f"bad state fetch of {name!r}: bad {label} {str(value)[:64]}")
        if not isinstance(source, str) or not 0 < len(source) <= MAX_PEER_ID_CHARS:
            raise ProtocolError(f"bad state fetch of {name!r}: bad source peer")
        if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
            raise ProtocolError(f"bad state fetch of {name!r}: bad digest")
        return Fetch(name, offset, nbytes, source, digest)


def in_parity(manifests: Mapping[str, StateManifest]) -> bool:
    """True iff every peer reports the same revision and the same tensors (bit parity)."""
    distinct = {(m.revision, m.state_digest()) for m in manifests.values()}
    return len(distinct) <= 1


def majority(manifests: Mapping[str, StateManifest]) -> StateManifest | None:
    """The reference state: per tensor, the most-held entry among newest-revision peers.

    ``None`` when no peer reported a manifest. Peers at older revisions do not
    vote: after an outer step the newest revision is the state training goes
    on from, however few peers already hold it.
    """
    if not manifests:
        return None
    newest = max(m.revision for m in manifests.values())
    votes: dict[str, Counter[TensorInfo]] = {}
    for m in manifests.values():
        if m.revision != newest:
            continue
        for name, info in m.entries.items():
            votes.setdefault(name, Counter())[info] += 1
    entries: dict[str, TensorInfo] = {}
    for name, counter in votes.items():
        # The whole entry is the candidate, not just the digest: two peers
        # claiming one digest with different shapes are different candidates.
        # The tie-break is a total order on plain fields, so every peer that
        # runs this picks the same winner whatever the dict orders were.
        entries[name] = min(
            counter.items(),
            key=lambda item: (
                -item[1],
                item[0].digest,
                item[0].dtype,
                item[0].shape,
                item[0].nbytes,
            ),
        )[0]
    return StateManifest(newest, entries)


def _needed(own: StateManifest | None, reference: StateManifest) -> list[str]:
    if own is None:
        return sorted(reference.entries)
    return sorted(n for n, info in reference.entries.items() if own.entries.get(n) != info)


def stale_names(manifest: StateManifest, reference: StateManifest) -> list[str]:
    """Tensors a peer holds that the reference lacks: it drops them when it syncs."""
    return sorted(n for n in manifest.entries if n not in reference.entries)


def diverged(
    manifests: Mapping[str, StateManifest], reference: StateManifest
) -> dict[str, list[str]]:
    """For each peer not in parity with ``reference``: the tensors it must fetch (sorted).

    A tensor is needed when the peer lacks it or holds a different entry
    (digest, dtype or shape). A peer whose bytes all match but whose revision
    differs, or which holds tensors the reference lacks (``stale_names``),
    maps to ``[]``: it moves no bytes but must still adopt the reference.
    Peers already in parity are absent.
    """
    out: dict[str, list[str]] = {}
    for peer in sorted(manifests):
        m = manifests[peer]
        needed = _needed(m, reference)
        if needed or m.revision != reference.revision or stale_names(m, reference):
            out[peer] = needed
    return out


def holders(
    manifests: Mapping[str, StateManifest], reference: StateManifest, name: str
) -> list[str]:
    """Peers (sorted) whose manifest holds exactly the reference entry for ``name``."""
    info = reference.entries.get(name)
    if info is None:
        return []
    return sorted(p for p, m in manifests.items() if m.entries.get(name) == info)


def _preference(peer: str, holder: str) -> tuple[int, str]:
    # Tie-break between equally loaded holders. Hashing the fetching peer's
    # id in means two joiners planning independently start on different
    # holders instead of both hammering the lexicographically first one.
    return (xxhash.xxh3_64_intdigest(f"{peer}\0{holder}".encode()), holder)


def transfer_plan(
    manifests: Mapping[str, StateManifest],
    reference: StateManifest,
    peer: str,
    chunk_bytes: int,
) -> list[Fetch]:
    """Byte ranges ``peer`` must fetch to reach ``reference``, and from whom.

    ``peer`` may be absent from ``manifests`` (a joiner with no state): it then
    needs every tensor. Each needed tensor is cut into ``chunk_bytes`` ranges
    (the last one shorter); the ranges go round-robin over the tensor's
    holders, starting from the holder with the fewest bytes assigned so far
    in this plan, so a big tensor is striped across all holders and many
    small ones spread evenly. Fetches are ordered by (name, offset).

    Raises ``InvalidArgument`` for a non-positive ``chunk_bytes`` or when no
    other peer holds a needed tensor (``reference`` was not computed from
    these manifests: recompute it with ``majority``).
    """
    if not _is_int(chunk_bytes) or chunk_bytes <= 0:
        raise InvalidArgument(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    load: dict[str, int] = {}
    plan: list[Fetch] = []
    for name in _needed(manifests.get(peer), reference):
        info = reference.entries[name]
        if info.nbytes == 0:
            continue  # allocated from the reference entry; nothing to move
        sources = [h for h in holders(manifests, reference, name) if h != peer]
        if not sources:
            raise InvalidArgument(
                f"no peer other than {peer!r} holds tensor {name!r} at digest {info.digest}",
                tensor=name,
                peer=peer,
            )
        order = sorted(sources, key=lambda h: (load.get(h, 0), _preference(peer, h)))
        for i, offset in enumerate(range(0, info.nbytes, chunk_bytes)):
            source = order[i % len(order)]
            size = min(chunk_bytes, info.nbytes - offset)
            load[source] = load.get(source, 0) + size
            plan.append(Fetch(name, offset, size, source, info.digest))
    return plan


def shared_transfers(
    manifests: Mapping[str, StateManifest], reference: StateManifest, chunk_bytes: int
) -> frozenset[tuple[str, str]]:
    """The ``(source, fetcher)`` pairs of a sync whose bytes share a node's link
    with another transfer: the fetcher fetches from several sources at once,
    or the source serves several fetchers at once.

    Such a link carries only a share of its path, so its bandwidth meter must
    not time it. Every peer computes the same pairs from the same manifests.
    """
    sources_of: dict[str, set[str]] = {}
    for peer in manifests:
        try:
            plan = transfer_plan(manifests, reference, peer, chunk_bytes)
        except InvalidArgument:
            continue  # that peer's sync fails on its own; it moves no bytes
        if plan:
            sources_of[peer] = {f.source_peer for f in plan}
    fetchers_of = Counter(s for sources in sources_of.values() for s in sources)
    return frozenset(
        (source, fetcher)
        for fetcher, sources in sources_of.items()
        for source in sources
        if len(sources) > 1 or fetchers_of[source] > 1
    )


def check_fetch(fetch: Fetch, local: StateManifest, me: str | None = None) -> TensorInfo:
    """The source side: may this peer serve ``fetch`` from its state ``local``?

    Returns the local entry to slice. Raises ``ProtocolError`` for a request
    that could never be valid (misrouted, range outside the tensor) and
    ``MismatchError`` when this peer no longer holds the requested digest (its
    state moved on since the plan was made; the fetcher must replan).
    """
    if me is not None and fetch.source_peer != me:
        raise ProtocolError(
            f"state fetch of {fetch.name!r} addressed to {fetch.source_peer!r}, not {me!r}",
            tensor=fetch.name,
        )
    info = local.entries.get(fetch.name)
    if info is None or info.digest != fetch.digest:
        raise MismatchError(
            f"this peer does not hold tensor {fetch.name!r} at digest {fetch.digest}",
            tensor=fetch.name,
            peer=me,
        )
    if fetch.offset + fetch.nbytes > info.nbytes:
        raise ProtocolError(
            f"state fetch of {fetch.name!r} bytes [{fetch.offset}, {fetch.offset + fetch.nbytes}) "
            f"outside its {info.nbytes} bytes",
            tensor=fetch.name,
        )
    return info


def verify(name: str, arr: npt.NDArray[Any], reference: StateManifest) -> None:
    """Accept a received tensor only if it hashes to the reference digest.

    ``InvalidArgument`` if the reference has no such tensor, ``MismatchError``
    if the array was allocated with another dtype or shape, ``ProtocolError``
    if its bytes differ (a corrupt or wrong transfer: fetch it again).
    """
    info = reference.entries.get(name)
    if info is None:
        raise InvalidArgument(f"tensor {name!r} is not in the reference state", tensor=name)
    if arr.dtype.name != info.dtype or tuple(arr.shape) != info.shape:
        raise MismatchError(
            f"tensor {name!r} is {arr.dtype.name}{list(arr.shape)}, "
            f"the reference is {info.dtype}{list(info.shape)}",
            tensor=name,
        )
    got = tensor_digest(arr)
    if got != info.digest:
        raise ProtocolError(
            f"tensor {name!r} arrived corrupt: digest {got}, expected {info.digest}",
            tensor=name,
            expected=info.digest,
            got=got,
        )
