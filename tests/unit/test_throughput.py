"""The link bandwidth meter, driven with a fake clock and byte counter."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collnet.topology.throughput import ThroughputMeter

MIB = 1 << 20


def counter(value: int) -> Callable[[], int]:
    """A byte counter that reads ``value``."""
    return lambda: value


def test_striped_pieces_in_flight_together_measure_the_whole_link() -> None:
    meter = ThroughputMeter()
    # Four 4 MiB pieces on four connections, all arriving over the same second.
    for _ in range(4):
        meter.begin(10.0, counter(0))
    for _ in range(4):
        meter.end(11.0, counter(16 * MIB))
    assert meter.bytes_per_s == pytest.approx(16 * MIB)
    assert meter.samples == 1


def test_idle_time_between_transfers_does_not_dilute_the_estimate() -> None:
    meter = ThroughputMeter(alpha=1.0)
    meter.begin(0.0, counter(0))
    meter.end(0.5, counter(8 * MIB))
    meter.begin(100.0, counter(8 * MIB))  # a long pause, then the same rate again
    meter.end(100.5, counter(16 * MIB))
    assert meter.bytes_per_s == pytest.approx(16 * MIB)
    assert meter.samples == 2


def test_small_windows_are_not_samples() -> None:
    meter = ThroughputMeter(min_sample_bytes=MIB)
    meter.begin(0.0, counter(0))
    meter.end(0.001, counter(64 * 1024))
    assert meter.bytes_per_s is None and meter.samples == 0


def test_a_long_busy_stretch_yields_samples_while_it_runs() -> None:
    meter = ThroughputMeter(sample_period_s=1.0)
    t, received = 0.0, 0
    meter.begin(t, counter(received))
    for _ in range(10):  # pieces overlap: the window never empties
        meter.begin(t, counter(received))
        t += 0.5
        received += 50 * MIB
        meter.end(t, counter(received))
    assert meter.samples >= 4
    assert meter.bytes_per_s == pytest.approx(100 * MIB)


def test_an_end_without_a_begin_is_ignored() -> None:
    meter = ThroughputMeter()
    meter.end(1.0, counter(100 * MIB))
    assert meter.bytes_per_s is None


@given(
    st.lists(
        st.tuples(st.floats(0.001, 5.0), st.integers(1, 1 << 30)),
        min_size=1,
        max_size=30,
    )
)
def test_estimate_stays_within_the_range_of_the_samples(pieces: list[tuple[float, int]]) -> None:
    meter = ThroughputMeter(min_sample_bytes=1)
    t, received = 0.0, 0
    rates = []
    for duration_s, nbytes in pieces:
        meter.begin(t, counter(received))
        t += duration_s
        received += nbytes
        meter.end(t, counter(received))
        rates.append(nbytes / duration_s)
    assert meter.bytes_per_s is not None
    assert min(rates) * (1 - 1e-9) <= meter.bytes_per_s <= max(rates) * (1 + 1e-9)


def test_a_lone_message_read_short_at_its_header_still_counts_whole() -> None:
    # The header's read brought 4 KiB of the payload with it, so the counter
    # moves by 4 KiB less than the message while the window is open.
    meter = ThroughputMeter(alpha=1.0)
    meter.begin(0.0, counter(4096))
    meter.end(0.01, counter(MIB), MIB)
    assert meter.bytes_per_s == MIB / 0.01


def test_a_cut_window_counts_only_the_bytes_the_counter_saw() -> None:
    meter = ThroughputMeter(alpha=1.0, sample_period_s=1.0)
    meter.begin(0.0, counter(0))
    meter.begin(0.0, counter(0))
    meter.end(1.0, counter(3 * MIB), 2 * MIB)  # cut: 3 MiB in the first second
    assert meter.bytes_per_s == 3 * MIB
    meter.end(1.5, counter(4 * MIB), 2 * MIB)  # began before the cut: not counted whole
    assert meter.bytes_per_s == 1 * MIB / 0.5


def test_pieces_of_one_message_arriving_one_after_another_make_one_sample() -> None:
    # A 1 MiB message striped as 4 pieces of 256 KiB that arrive in turn.
    meter = ThroughputMeter(alpha=1.0)
    for i in range(4):
        t = i * 0.001
        meter.begin(t, counter(i * MIB // 4))
        meter.end(t + 0.001, counter((i + 1) * MIB // 4), MIB // 4)
    assert meter.samples == 1
    assert meter.bytes_per_s == pytest.approx(MIB / 0.004)


def test_small_windows_apart_in_time_are_not_joined() -> None:
    meter = ThroughputMeter(alpha=1.0)
    for i in range(8):
        t = i * 1.0  # each its own collective, a second apart
        meter.begin(t, counter(i * MIB // 4))
        meter.end(t + 0.001, counter((i + 1) * MIB // 4), MIB // 4)
    assert meter.samples == 0 and meter.bytes_per_s is None
