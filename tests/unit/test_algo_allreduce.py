"""Ring and star all-reduce driven through RingSim: results, bit-identity, peer loss."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from ringsim import FP16_TEST, RingSim, build

from collnet.algo import (
    Abort,
    Complete,
    Send,
    make_all_reduce,
)
from collnet.algo.ops import DTYPES, OPS
from collnet.codec.base import Codec
from collnet.errors import NonFiniteError, PeerLost

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float32), np.dtype(np.float16), BF16]

_NP_OPS: dict[str, Callable[..., Any]] = {
    "sum": np.add,
    "avg": np.add,
    "min": np.minimum,
    "max": np.maximum,
    "prod": np.multiply,
}


def _real_codecs() -> list[Codec]:
    try:
        from collnet.codec.registry import get_codec  # type: ignore[import-not-found]
    except ImportError:
        return []
    names = ("uint8", "uint4", "fp16", "bf16", "uint8+lz4", "fp16+lz4")
    return [get_codec(name) for name in names]


REAL_CODECS = _real_codecs()


def run_all_reduce(
    algo: str,
    inputs: list[np.ndarray],
    op: str,
    seed: int,
    codec: Codec | None = None,
    chunk_bytes: int = 1 << 20,
    root: int = 0,
) -> RingSim:
    sim = RingSim(build(algo, inputs, op, codec, chunk_bytes, root), random.Random(seed))
    sim.start()
    sim.run()
    assert all(isinstance(sim.outcome.get(r), Complete) for r in range(len(inputs))), sim.outcome
    return sim


def assert_bit_identical(bufs: list[np.ndarray]) -> None:
    first = bufs[0].view(np.uint8).tobytes()
    for r, b in enumerate(bufs[1:], 1):
        assert b.view(np.uint8).tobytes() == first, f"rank {r} differs from rank 0"


def small_int_inputs(
    rng: np.random.Generator, world: int, n: int, dtype: np.dtype, op: str
) -> list[np.ndarray]:
    # Values whose reductions are exact in every dtype and any order: small
    # integers for sums (|sum| <= 72), powers of two with signs for products.
    if op == "prod":
        vals = rng.choice(np.array([-2, -1, 1, 2]), size=(world, n))
    else:
        vals = rng.integers(-8, 9, size=(world, n))
    return [vals[r].astype(dtype) for r in range(world)]


def exact_reference(inputs: list[np.ndarray], op: str) -> np.ndarray:
    dtype = inputs[0].dtype
    acc = inputs[0].astype(np.float64) if dtype.kind == "f" else inputs[0].copy()
    for x in inputs[1:]:
        acc = _NP_OPS[op](acc, x.astype(acc.dtype))
    out = acc.astype(dtype)
    if op == "avg":
        out = np.true_divide(out, dtype.type(len(inputs))).astype(dtype)
    return out


SIZES = [0, 1, 2, 5, 13, 31]


@pytest.mark.parametrize("algo", ["ring", "star", "direct"])
@pytest.mark.parametrize(
    ("dtype", "op"),
    [(d, op) for d in DTYPES for op in OPS if not (op == "avg" and d.kind == "i")],
    ids=str,
)
def test_all_reduce_exact_for_every_world_size_dtype_and_op(
    algo: str, dtype: np.dtype, op: str
) -> None:
    rng = np.random.default_rng(hash((algo, str(dtype), op)) % 2**32)
    for world in range(1, 10):
        for n in SIZES:
            inputs = small_int_inputs(rng, world, n, dtype, op)
            ref = exact_reference(inputs, op)
            chunk_bytes = dtype.itemsize * int(rng.integers(1, 4))
            root = int(rng.integers(0, world))
            run_all_reduce(
                algo, inputs, op, seed=world * 100 + n, chunk_bytes=chunk_bytes, root=root
            )
            for r, out in enumerate(inputs):
                assert out.view(np.uint8).tobytes() == ref.view(np.uint8).tobytes(), (
                    f"world={world} n={n} rank={r}: {out} != {ref}"
                )


@given(
    algo=st.sampled_from(["ring", "star", "direct"]),
    dtype=st.sampled_from(FLOATS),
    op=st.sampled_from(["sum", "avg", "prod"]),
    world=st.integers(1, 9),
    n=st.integers(0, 97),
    chunk_elems=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=300, deadline=None)
def test_float_all_reduce_is_bit_identical_on_all_ranks_and_close_to_reference(
    algo: str, dtype: np.dtype, op: str, world: int, n: int, chunk_elems: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    if op == "prod":
        mags = rng.uniform(0.5, 1.5, size=(world, n)) * rng.choice([-1.0, 1.0], size=(world, n))
    else:
        mags = rng.standard_normal((world, n))
    inputs = [mags[r].astype(dtype) for r in range(world)]
    as64 = [x.astype(np.float64) for x in inputs]
    run_all_reduce(algo, inputs, op, seed, chunk_bytes=chunk_elems * dtype.itemsize)
    assert_bit_identical(inputs)
    eps = float(ml_dtypes.finfo(dtype).eps)
    if op == "prod":
        ref = np.prod(as64, axis=0) if n else np.zeros(0)
        np.testing.assert_allclose(inputs[0].astype(np.float64), ref, rtol=(world + 1) * eps)
        return
    ref = np.sum(as64, axis=0) if n else np.zeros(0)
    bound = (world + 1) * eps * np.sum(np.abs(as64), axis=0) if n else np.zeros(0)
    if op == "avg":
        ref, bound = ref / world, bound / world + eps * np.abs(ref / world)
    assert np.all(np.abs(inputs[0].astype(np.float64) - ref) <= bound + 1e-30)


def quantized_bound(codec: Codec, world: int, inputs64: list[np.ndarray]) -> float:
    # Each hop re-quantizes a partial result no larger than the sum of the
    # ranks' max magnitudes; a coarse per-codec relative step bounds each.
    step = {
        "test-fp16": 2.0**-10,
        "fp16": 2.0**-10,
        "bf16": 2.0**-7,
        "uint8": 2.0 / 255,
        "uint4": 2.0 / 15,
    }[codec.name.removesuffix("+lz4")]
    scale = sum(float(np.max(np.abs(x))) for x in inputs64 if x.size)
    return (world + 1) * step * scale + 1e-6


@given(
    algo=st.sampled_from(["ring", "star", "direct"]),
    dtype=st.sampled_from(FLOATS),
    op=st.sampled_from(["sum", "avg", "min", "max"]),
    world=st.integers(1, 9),
    n=st.integers(0, 97),
    chunk_elems=st.integers(1, 40),
    codec_index=st.integers(0, len(REAL_CODECS)),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=300, deadline=None)
def test_quantized_all_reduce_is_bit_identical_and_within_codec_bound(
    algo: str,
    dtype: np.dtype,
    op: str,
    world: int,
    n: int,
    chunk_elems: int,
    codec_index: int,
    seed: int,
) -> None:
    codec = ([FP16_TEST, *REAL_CODECS])[codec_index]
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(n).astype(dtype) for _ in range(world)]
    as64 = [x.astype(np.float64) for x in inputs]
    run_all_reduce(algo, inputs, op, seed, codec=codec, chunk_bytes=chunk_elems * dtype.itemsize)
    assert_bit_identical(inputs)
    if n == 0:
        return
    ref = _NP_OPS[op].reduce(np.stack(as64), axis=0)
    if op == "avg":
        ref = ref / world
    bound = quantized_bound(codec, world, as64) + float(ml_dtypes.finfo(dtype).eps) * np.abs(ref)
    assert np.all(np.abs(inputs[0].astype(np.float64) - ref) <= bound)


def test_quantized_ring_forwards_the_owners_bytes_unchanged() -> None:
    world, n = 4, 40
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal(n).astype(np.float32) for _ in range(world)]
    scheds = build("ring", inputs, "sum", FP16_TEST, chunk_bytes=4 * 4)
    sim = RingSim(scheds, random.Random(3))
    sent: dict[tuple[int, int, int], bytes] = {}
    perform = sim.perform

    def record(rank: int, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                sent[(rank, a.step, a.chunk)] = bytes(a.payload)
        perform(rank, actions)

    sim.perform = record  # type: ignore[method-assign]
    sim.start()
    sim.run()
    # All-gather step s + 1 of rank r carries exactly what rank r - 1 sent at step s.
    for (rank, step, chunk), payload in sent.items():
        if step >= world:
            assert payload == sent[((rank - 1) % world, step - 1, chunk)]


def test_raw_path_sends_views_of_the_tensor_and_receives_results_in_place() -> None:
    world, n = 3, 12
    inputs = [np.arange(n, dtype=np.float32) + r for r in range(world)]
    scheds = build("ring", inputs, "sum", chunk_bytes=8)
    for r, s in enumerate(scheds):
        for a in s.start():
            assert isinstance(a, Send)
            assert np.shares_memory(np.frombuffer(a.payload, dtype=np.uint8), inputs[r])
    # Reduce-scatter contributions land in scratch; all-gather results land in the tensor.
    contribution = np.frombuffer(scheds[0].recv_buffer(2, 0, 0, 8), dtype=np.uint8)
    result = np.frombuffer(scheds[0].recv_buffer(2, world - 1, 0, 8), dtype=np.uint8)
    assert not np.shares_memory(contribution, inputs[0])
    assert np.shares_memory(result, inputs[0])


def test_world_one_completes_at_start_for_both_algorithms() -> None:
    for algo in ("ring", "star", "direct"):
        x = np.arange(5, dtype=np.float32)
        s = make_all_reduce(algo, 0, 1, x, "avg")
        assert s.start() == [Complete()]
        assert s.finished
        assert s.on_peer_lost(0) == []
        np.testing.assert_array_equal(x, np.arange(5, dtype=np.float32))


@pytest.mark.parametrize("algo", ["ring", "star", "direct"])
def test_empty_tensor_completes_at_start_on_every_rank(algo: str) -> None:
    inputs = [np.zeros(0, dtype=np.float32) for _ in range(4)]
    for s in build(algo, inputs, "sum"):
        assert s.start() == [Complete()]


@given(
    algo=st.sampled_from(["ring", "star", "direct"]),
    world=st.integers(2, 8),
    n=st.integers(0, 60),
    chunk_elems=st.integers(1, 9),
    quantized=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
@settings(max_examples=300, deadline=None)
def test_peer_lost_at_random_point_aborts_every_unfinished_survivor(
    algo: str,
    world: int,
    n: int,
    chunk_elems: int,
    quantized: bool,
    seed: int,
    data: st.DataObject,
) -> None:
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(-8, 9, size=n).astype(np.float32) for _ in range(world)]
    ref = exact_reference([x.copy() for x in inputs], "sum")
    codec = FP16_TEST if quantized else None

    def make_sim(bufs: list[np.ndarray]) -> RingSim:
        scheds = build(algo, bufs, "sum", codec, chunk_bytes=4 * chunk_elems, root=seed % world)
        return RingSim(scheds, random.Random(seed))

    # A dry run with the same delivery order measures how long a full run takes.
    dry = make_sim([x.copy() for x in inputs])
    dry.start()
    dry.run()
    total_steps = 2 * dry.delivered
    sim = make_sim(inputs)
    sim.start()
    sim.run(max_steps=data.draw(st.integers(0, total_steps), label="steps before death"))
    victim = data.draw(st.integers(0, world - 1), label="victim")
    sim.kill(victim)
    survivors = [r for r in range(world) if r != victim]
    unaware = list(survivors)
    random.Random(seed + 1).shuffle(unaware)
    finished_before = {r for r in survivors if r in sim.outcome}
    # Survivors learn of the loss one by one, between further deliveries.
    while unaware:
        sim.run(max_steps=data.draw(st.integers(0, 5), label="steps between notices"))
        r = unaware.pop()
        was_finished = r in sim.outcome
        sim.notify_lost(r, victim)
        if was_finished:
            continue
        outcome = sim.outcome[r]
        assert isinstance(outcome, Abort), outcome
        assert isinstance(outcome.error, PeerLost)
        assert outcome.error.fields["rank"] == victim
        assert f"peer rank {victim} lost" in outcome.error.message
    sim.run()  # late messages to aborted ranks are drained, never acted on
    for r in survivors:
        outcome = sim.outcome[r]
        assert isinstance(outcome, Complete | Abort)
        if isinstance(outcome, Complete) and not quantized:
            # A rank that completed holds the right answer even though a peer died.
            assert inputs[r].tobytes() == ref.tobytes()
    completed = {r for r in survivors if isinstance(sim.outcome[r], Complete)}
    assert finished_before <= completed
    share = "all" if completed == set(survivors) else "some" if completed else "none"
    event(f"survivors completed: {share}")


def test_peer_lost_names_the_ring_step() -> None:
    inputs = [np.ones(8, dtype=np.float32) for _ in range(3)]
    scheds = build("ring", inputs, "sum", chunk_bytes=4)
    scheds[1].start()
    (abort,) = scheds[1].on_peer_lost(2)
    assert isinstance(abort, Abort) and isinstance(abort.error, PeerLost)
    assert "ring all-reduce step 0 (reduce-scatter)" in abort.error.message
    assert abort.error.fields["rank"] == 2
    assert scheds[1].on_peer_lost(0) == []
    assert scheds[1].finished
    # Ranks outside the collective are not participants.
    assert scheds[0].on_peer_lost(7) == []
    assert not scheds[0].finished


@pytest.mark.parametrize("algo", ["ring", "star", "direct"])
def test_local_data_the_codec_cannot_encode_aborts_with_codec_error(algo: str) -> None:
    inputs = [np.ones(6, dtype=np.float32) for _ in range(3)]
    # An element rank 1 sends at start: segment 1 for the ring's first step,
    # the root's tensor for the star, segment 0 (not its own) for direct.
    inputs[1][0 if algo == "direct" else 2] = np.inf
    scheds = build(algo, inputs, "sum", FP16_TEST)
    (abort,) = scheds[1].start()
    assert isinstance(abort, Abort) and isinstance(abort.error, NonFiniteError)
    assert scheds[1].finished
    assert scheds[1].on_peer_lost(0) == []


def test_direct_owner_whose_own_data_the_codec_cannot_encode_aborts_at_finalize() -> None:
    inputs = [np.ones(6, dtype=np.float32) for _ in range(3)]
    inputs[1][2] = np.inf  # in segment 1, which rank 1 owns and never encodes alone
    sim = RingSim(build("direct", inputs, "sum", FP16_TEST), random.Random(0))
    sim.start()
    assert 1 not in sim.outcome
    sim.run()
    abort = sim.outcome[1]
    assert isinstance(abort, Abort) and isinstance(abort.error, NonFiniteError)
    # The others got segment 1's result from no one: they wait for the executor
    # to tell them (as for the star's root), they never complete.
    assert not any(isinstance(o, Complete) for o in sim.outcome.values())


@pytest.mark.parametrize("algo", ["ring", "star", "direct"])
def test_partial_sum_overflowing_the_codec_aborts_instead_of_sending_garbage(algo: str) -> None:
    inputs = [np.full(6, 40000.0, dtype=np.float32) for _ in range(3)]
    sim = RingSim(build(algo, inputs, "sum", FP16_TEST, chunk_bytes=8), random.Random(0))
    sim.start()
    sim.run()
    aborts = [o for o in sim.outcome.values() if isinstance(o, Abort)]
    assert aborts and all(isinstance(o.error, NonFiniteError) for o in aborts)
    assert not any(isinstance(o, Complete) for o in sim.outcome.values())


def test_codec_named_none_takes_the_zero_copy_path() -> None:
    from collnet.codec.base import Codec as _Codec

    class NoneCodec(_Codec):
        name = "none"
        lossy = False

        def encode(self, x: np.ndarray) -> np.ndarray:
            raise AssertionError("the raw path never encodes")

        def decode(self, data: Any, n: int, out: Any = None) -> np.ndarray:
            raise AssertionError("the raw path never decodes")

    inputs = [np.arange(7, dtype=np.int32) * (r + 1) for r in range(3)]
    scheds = build("ring", inputs, "sum", NoneCodec(), chunk_bytes=4)
    sim = RingSim(scheds, random.Random(2))
    sim.start()
    sim.run()
    for x in inputs:
        np.testing.assert_array_equal(x, np.arange(7, dtype=np.int32) * 6)
