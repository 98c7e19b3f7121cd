"""Pieces that arrived before their collective started here, held and accounted.

A faster peer may begin a collective first; its pieces are read into a stash
and replayed when the collective starts here. Anyone with a data link can
send such pieces, so what the stash holds is bounded by what it really costs
in memory, not by payload bytes alone: one stashed piece of one byte holds an
array object, a record, a ``DataPiece`` with its key, and a list slot, which is
hundreds of bytes. Every piece is charged its payload plus a measured
per-piece overhead (plus its tag, which each piece holds its own copy of),
every distinct key a per-key overhead; the charge counts against the sending
peer's own limit, so one peer cannot take the whole budget, and against the
total. A peer that is not in the world this peer holds (neither active nor
pending) has a much smaller limit: it may be a member admitted a moment ago
whose world has not arrived here yet, but most likely it is nobody. The
number of distinct keys is bounded too. A piece over any limit is a
``ProtocolError``: its link is dropped and what that peer had stashed is
released with it.

Invariants: ``total`` is the sum of ``held(peer)`` over every peer; both go
back to zero once every stashed piece is taken, released or dropped; a peer
holding nothing has no entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collnet.errors import ProtocolError
from collnet.wire.datalink import DataPiece, Key

# Bytes one stashed piece holds besides its payload and its tag: the array
# object, ``_Early`` record, ``DataPiece``, key tuple, ints and list slot.
# Measured with tracemalloc at about 680 (tests/unit/test_engine_early.py
# checks that this still covers it), rounded up for the allocator's own
# rounding and other numpy versions.
PIECE_OVERHEAD_BYTES = 1024
# What one more distinct key costs: its dict slot, its list and the key itself
# (measured at about 170).
KEY_OVERHEAD_BYTES = 512
# Collectives that may have early pieces at once (a ring has a handful).
MAX_EARLY_KEYS = 4096
# What a peer outside the world held here may have stashed.
MAX_STRANGER_BYTES = 64 << 20


class EarlyBuffer(np.ndarray):
    """Bytes of a piece that arrived before its collective started here.

    Uninitialised (``early_buffer``): the kernel writes every byte of it. A
    ``bytearray`` of the size would first be zeroed, which cost a tenth of a
    daemon's time in a 4-peer loopback all-reduce series (py-spy), since a
    peer that starts a moment later finds much of its first step stashed.
    """


def early_buffer(nbytes: int) -> EarlyBuffer:
    """An uninitialised ``EarlyBuffer`` of ``nbytes``."""
    return np.empty(nbytes, np.uint8).view(EarlyBuffer)


@dataclass(slots=True)
class Early:
    peer: str
    piece: DataPiece
    payload: EarlyBuffer


def piece_cost(piece: DataPiece, nbytes: int) -> int:
    """What stashing ``nbytes`` of ``piece`` really holds."""
    tag = piece.key[1]
    return nbytes + PIECE_OVERHEAD_BYTES + (len(tag) if isinstance(tag, str) else 0)


def key_cost(key: Key) -> int:
    tag = key[1]
    return KEY_OVERHEAD_BYTES + (len(tag) if isinstance(tag, str) else 0)


@dataclass(slots=True)
class _Slot:
    """The early pieces of one key, and the peer charged for the key itself."""

    charged: str
    items: list[Early] = field(default_factory=list)


class EarlyStash:
    """Early pieces by key, charged per sending peer; see the module docstring."""

    def __init__(self, max_bytes: int, max_bytes_per_peer: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_peer = max_bytes if max_bytes_per_peer is None else max_bytes_per_peer
        self.total = 0
        self._held: dict[str, int] = {}
        self._slots: dict[Key, _Slot] = {}

    def held(self, peer: str) -> int:
        """Bytes charged to ``peer`` (pieces being read included)."""
        return self._held.get(peer, 0)

    def __len__(self) -> int:
        return len(self._slots)

    def reserve(
        self, peer: str, piece: DataPiece, nbytes: int, stranger: bool = False
    ) -> EarlyBuffer:
        """A buffer for ``nbytes`` of ``piece`` from ``peer`` (``stranger``: not in
        the world held here), charged now; over a limit, ``ProtocolError`` (its
        link is dropped by whoever reads it)."""
        cost = piece_cost(piece, nbytes)
        new_key = piece.key not in self._slots
        if new_key:
            if len(self._slots) >= MAX_EARLY_KEYS:
                raise ProtocolError(
                    f"{peer} sent data for more than {MAX_EARLY_KEYS} collectives not started here"
                )
            cost += key_cost(piece.key)
        held = self._held.get(peer, 0)
        limit = min(self.max_bytes_per_peer, MAX_STRANGER_BYTES if stranger else self.max_bytes)
        if held + cost > limit:
            whose = "a peer outside the world" if stranger else "per peer"
            raise ProtocolError(
                f"{peer} sent {held + cost} bytes (payload and overhead) for collectives "
                f"not started here (limit {limit} {whose})"
            )
        if self.total + cost > self.max_bytes:
            raise ProtocolError(
                f"{peer} sent {nbytes} bytes for collectives not started here while "
                f"{self.total} are held (limit {self.max_bytes})"
            )
        self._charge(peer, piece_cost(piece, nbytes))
        return early_buffer(nbytes)

    def keep(self, peer: str, piece: DataPiece, payload: EarlyBuffer) -> None:
        """The piece ``reserve`` placed has landed: hold it until its key starts."""
        slot = self._slots.get(piece.key)
        if slot is None:
            slot = self._slots[piece.key] = _Slot(peer)
            self._charge(peer, key_cost(piece.key))
        slot.items.append(Early(peer, piece, payload))

    def release(self, peer: str, piece: DataPiece, nbytes: int) -> None:
        """A reserved piece is not kept after all (its collective started or failed)."""
        self._charge(peer, -piece_cost(piece, nbytes))

    def take(self, key: Key) -> list[Early]:
        """Every piece of ``key``, no longer charged (its collective starts)."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return []
        self._release_slot(key, slot)
        return slot.items

    def drop_peer(self, peer: str) -> None:
        """``peer``'s link is gone, so nothing more from it lands: the keys it sent
        pieces for are dropped whole (such a collective cannot complete from what
        is left), and so are its pieces still being read."""
        for key in [k for k, s in self._slots.items() if any(i.peer == peer for i in s.items)]:
            self._release_slot(key, self._slots.pop(key))
        # What is left charged to it are pieces it was still sending: they will
        # never land now.
        self.total -= self._held.pop(peer, 0)

    def drop_before(self, epoch: int) -> None:
        """Keys of epochs before ``epoch`` can never start here: drop them."""
        for key in [k for k in self._slots if k[0] < epoch]:
            self._release_slot(key, self._slots.pop(key))

    def _release_slot(self, key: Key, slot: _Slot) -> None:
        self._charge(slot.charged, -key_cost(key))
        for item in slot.items:
            self._charge(item.peer, -piece_cost(item.piece, len(item.payload)))

    def _charge(self, peer: str, nbytes: int) -> None:
        self.total += nbytes
        held = self._held.get(peer, 0) + nbytes
        if held:
            self._held[peer] = held
        else:
            self._held.pop(peer, None)
