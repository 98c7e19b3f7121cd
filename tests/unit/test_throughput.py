"""The link bandwidth meter, driven with a fake clock and byte counter."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collnet.topology.throughput import BurstTimer, ThroughputMeter

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


def test_a_short_window_that_drains_queued_bytes_barely_moves_the_estimate() -> None:
    """Bytes the kernel queued while the loop was busy arrive at memory speed:
    such a window reads many times the link, but spans almost no time."""
    meter = ThroughputMeter()
    t, received = 0.0, 0
    for _ in range(3):  # half a second at 100 MiB/s, three times
        meter.begin(t, counter(received))
        t, received = t + 0.5, received + 50 * MIB
        meter.end(t, counter(received))
    assert meter.bytes_per_s == pytest.approx(100 * MIB)
    meter.begin(t, counter(received))  # 2 MiB in a millisecond: 2 GiB/s
    meter.end(t + 0.001, counter(received + 2 * MIB))
    assert meter.samples == 4
    assert 100 * MIB < meter.bytes_per_s < 1.05 * 100 * MIB  # a plain mean: 6.7x
    # A link that really changed is followed within a few windows of its own.
    t, received = t + 1.0, received + 2 * MIB
    for _ in range(4):
        meter.begin(t, counter(received))
        t, received = t + 0.5, received + 5 * MIB
        meter.end(t, counter(received))
    assert meter.bytes_per_s < 25 * MIB  # from 100 to 10 MiB/s: 22 (a plain mean: 32)


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


def test_a_burst_is_timed_blind_to_a_piece_that_lands_late() -> None:
    # 32 pieces of 512 KiB, one landing every 4 ms (1 Gbit/s-ish); piece 7's
    # connection stalls (PROBE_RTT) and it lands 300 ms after the rest.
    timer, piece = BurstTimer(), 512 << 10
    times = [0.004 * i for i in range(32)]
    times[7] = times[-1] + 0.3
    taken = []
    for n, t in enumerate(sorted(times), 1):
        sample = timer.landed(3, 32, t, n * piece)
        if sample is not None:
            taken.append(sample)
    # From the first to land to the 29th (90 % of 32): 28 pieces in 29 intervals
    # of 4 ms, one piece's gap being the one that went missing.
    assert len(taken) == 1 and taken[0] == pytest.approx((28 * piece, 0.004 * 29))
    assert timer.landed(3, 32, 1.0, 40 * piece) is None  # pieces past it add nothing


def test_a_burst_counts_every_byte_the_link_received_meanwhile() -> None:
    # The first timed piece lands while another connection still brings the
    # warm-up's last 3 MiB: those shared the link, so they count.
    timer = BurstTimer()
    assert timer.landed(0, 16, 1.0, 100 * MIB) is None
    out = [timer.landed(0, 16, 1.0 + 0.01 * i, 100 * MIB + i * MIB + (3 * MIB if i > 3 else 0))
           for i in range(1, 15)]  # fmt: skip
    assert out[-1] == pytest.approx((17 * MIB, 0.14)) and not any(out[:-1])


def test_a_new_burst_starts_its_own_count() -> None:
    timer = BurstTimer()
    assert timer.landed(0, 16, 0.0, 0) is None
    assert timer.landed(1, 16, 5.0, MIB) is None  # burst 0 never finished
    out = [timer.landed(1, 16, 5.0 + 0.01 * i, (i + 1) * MIB) for i in range(1, 15)]
    assert out[-1] == pytest.approx((14 * MIB, 0.14)) and not any(out[:-1])


@given(
    st.integers(16, 64),
    st.floats(1e6, 1e10),
    st.lists(st.floats(0.0, 5.0), max_size=3),
    st.randoms(use_true_random=False),
)
def test_up_to_a_tenth_of_a_burst_late_leaves_the_reading_at_the_link_rate(
    pieces: int, rate: float, delays: list[float], rng: random.Random
) -> None:
    nbytes = 1 << 19
    late = min(len(delays), pieces - math.ceil(0.9 * pieces))
    order = list(range(pieces))
    rng.shuffle(order)  # which pieces come late
    times = [i * nbytes / rate for i in range(pieces)]
    for index, delay in zip(order[:late], delays, strict=False):
        times[index] += delay + pieces * nbytes / rate
    timer = BurstTimer()
    taken = []
    for n, t in enumerate(sorted(times), 1):
        sample = timer.landed(0, pieces, t, n * nbytes)
        if sample is not None:
            taken.append(sample)
    assert len(taken) == 1
    sampled_bytes, seconds = taken[0]
    # The pieces that land in time are evenly spaced; at most ``late`` gaps are
    # left where the late ones would have been, among the m - 1 timed ones.
    m = math.ceil(0.9 * pieces)
    reading = sampled_bytes / seconds
    assert sampled_bytes == (m - 1) * nbytes
    assert rate * (m - 1) / (m - 1 + late) * (1 - 1e-9) <= reading <= rate * (1 + 1e-9)


def test_what_a_link_carries_while_it_shares_the_nodes_link_is_not_its_rate() -> None:
    meter = ThroughputMeter(alpha=1.0)
    meter.begin(0.0, counter(0))
    meter.end(1.0, counter(100 * MIB))  # alone: the link's rate
    assert meter.samples == 1 and meter.bytes_per_s == pytest.approx(100 * MIB)
    meter.share()  # a direct all-reduce: a third of it
    meter.begin(2.0, counter(100 * MIB))
    meter.end(3.0, counter(133 * MIB))
    assert meter.samples == 1 and meter.bytes_per_s == pytest.approx(100 * MIB)
    # A window already open when the sharing began is dropped too.
    meter.unshare()
    meter.begin(4.0, counter(133 * MIB))
    meter.share()
    meter.end(5.0, counter(166 * MIB))
    meter.unshare()
    assert meter.samples == 1
    # Alone again: sampled, at its new rate.
    meter.begin(6.0, counter(166 * MIB))
    meter.end(7.0, counter(216 * MIB))
    assert meter.samples == 2 and meter.bytes_per_s == pytest.approx(50 * MIB)


def test_a_long_window_cut_while_shared_samples_only_after_the_sharing_ends() -> None:
    meter = ThroughputMeter(alpha=1.0, sample_period_s=1.0)
    t, received = 0.0, 0
    meter.begin(t, counter(received))
    meter.share()
    for step in range(8):  # one busy stretch, cut every second
        if step == 4:
            meter.unshare()
        meter.begin(t, counter(received))
        t += 1.0
        received += (10 if step < 4 else 30) * MIB
        meter.end(t, counter(received))
    # Cuts up to the end of the shared time were dropped; the rest read 30 MiB/s.
    assert meter.samples >= 1 and meter.bytes_per_s == pytest.approx(30 * MIB)
