"""The early-data stash charges what a stashed piece really holds in memory.

Measured with tracemalloc over pieces built the way the daemon builds them
(metadata decoded by msgpack, so each piece has its own key and tag objects).
"""

from __future__ import annotations

import gc
import tracemalloc

import msgpack
import pytest

from collnet.engine import Router
from collnet.engine.early import key_cost, piece_cost
from collnet.wire.datalink import DataPiece, parse_data


def _stash(router: Router, n: int, tag_of: object) -> tuple[int, int]:
    """Stash ``n`` one-byte pieces; (bytes really allocated, bytes charged)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            tag = tag_of(i)  # type: ignore[operator]
            meta = msgpack.unpackb(msgpack.packb([5, tag, i, 2**40 + i, 2**62 + i, 0, 1]))
            piece = parse_data(meta)
            assert isinstance(piece, DataPiece)
            view, _ = router.data_sink("p1", piece, 1)
            view[:] = b"x"
            router.on_data("p1", piece, view)
            del view, piece, meta
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, router.early_bytes
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "tag_of",
    [
        pytest.param(lambda i: "step", id="one-key"),
        pytest.param(lambda i: 10**12 + i, id="a-key-per-piece-int-tags"),
        pytest.param(lambda i: f"tag-{i}", id="a-key-per-piece-str-tags"),
        pytest.param(lambda i: "x" * 3000, id="one-key-long-tag"),
        pytest.param(lambda i: f"{i}" + "x" * 3000, id="a-key-per-piece-long-tags"),
    ],
)
def test_what_is_charged_covers_what_stashed_pieces_allocate(tag_of: object) -> None:
    allocated, charged = _stash(Router("p0"), 4000, tag_of)
    assert allocated <= charged, f"{allocated / 4000:.0f} B per piece allocated"
    # ... and not wildly more, or honest peers would hit the limit for nothing.
    assert charged <= 3 * allocated


def test_costs_count_the_tag() -> None:
    short, long = DataPiece((1, "t"), 0, 0, 7, 0, 1), DataPiece((1, "t" * 1000), 0, 0, 7, 0, 1)
    assert piece_cost(long, 1) - piece_cost(short, 1) == 999
    assert key_cost(long.key) - key_cost(short.key) == 999
