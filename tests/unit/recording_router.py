"""A link router for meshes and links in tests: it records the links lost and
discards whatever else arrives (no collective runs over these links)."""

from __future__ import annotations

from typing import Any

from collnet.errors import CollnetError
from collnet.wire import Frame


class RecordingRouter:
    def __init__(self) -> None:
        self.lost: list[tuple[str, CollnetError]] = []

    def data_sink(self, peer: str, meta: Any, nbytes: int) -> memoryview | None:
        return None

    def on_data(self, peer: str, meta: Any, payload: memoryview) -> None:
        pass

    def on_control(self, peer: str, frame: Frame) -> None:
        pass

    def on_link_lost(self, peer: str, exc: CollnetError) -> None:
        self.lost.append((peer, exc))
