"""Heartbeats over one connection or link: the I/O half of ``Liveness``.

Every ``interval_s`` the driver sends ``HEARTBEAT {"ping": seq}``; the far end
answers ``{"pong": seq}`` at once. Any byte received counts as a sign of life
(the driver watches a byte counter, so a link busy with a transfer never looks
silent). When the peer has been silent past the adaptive timeout, ``on_dead``
is called once with the silence in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from collnet.errors import CollnetError, ProtocolError
from collnet.membership.liveness import Liveness


class Heartbeat:
    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        traffic: Callable[[], int],
        on_dead: Callable[[float], None],
        liveness: Liveness,
        on_rtt: Callable[[float, float], None] | None = None,
    ) -> None:
        self.send = send
        # Told of every round-trip sample (seconds, and when it was taken).
        self.on_rtt = on_rtt
        self.traffic = traffic
        self.on_dead = on_dead
        self.liveness = liveness
        self._task: asyncio.Task[None] | None = None
        self._seen_bytes = -1

    def start(self) -> None:
        self.liveness.start(time.monotonic())
        self._seen_bytes = self.traffic()
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def on_frame(self, meta: Any) -> None:
        """A HEARTBEAT frame arrived."""
        now = time.monotonic()
        self.liveness.heard(now)
        if not isinstance(meta, dict):
            raise ProtocolError("HEARTBEAT metadata must be a map")
        ping, pong = meta.get("ping"), meta.get("pong")
        if isinstance(ping, int):
            with contextlib.suppress(CollnetError):
                self.send({"pong": ping})
        elif isinstance(pong, int):
            rtt = self.liveness.pong(pong, now)
            if rtt is not None and self.on_rtt is not None:
                self.on_rtt(rtt, now)

    def probe(self) -> None:
        """One extra ping now: a round-trip sample sooner than the next beat."""
        with contextlib.suppress(CollnetError):
            self.send({"ping": self.liveness.ping(time.monotonic())})

    async def _run(self) -> None:
        lv = self.liveness
        while True:
            slept_from = time.monotonic()
            await asyncio.sleep(lv.interval_s)
            now = time.monotonic()
            if now - slept_from > 2 * lv.interval_s:
                # Our own loop stalled (a long reduction, a paused process): the
                # silence is ours, not the peer's.
                lv.heard(now)
            seen = self.traffic()
            if seen != self._seen_bytes:
                self._seen_bytes = seen
                lv.heard(now)
            if lv.expired(now):
                # Bytes may be waiting in the socket behind our own timer: let the
                # loop read them once before passing judgement.
                await asyncio.sleep(0)
                if self.traffic() == self._seen_bytes and lv.expired(time.monotonic()):
                    self._task = None
                    self.on_dead(lv.silent_s(time.monotonic()))
                    return
            try:
                self.send({"ping": lv.ping(now)})
            except CollnetError:
                return
