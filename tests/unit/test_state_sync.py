"""The majority, divergence, transfer plans and a simulated sync, all without I/O."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collnet.errors import InvalidArgument, MismatchError, ProtocolError
from collnet.state import (
    Fetch,
    StateManifest,
    TensorInfo,
    allocate,
    byte_view,
    check_fetch,
    diverged,
    holders,
    in_parity,
    majority,
    manifest_of,
    shared_transfers,
    stale_names,
    tensor_digest,
    transfer_plan,
    verify,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def info(digest_seed: int, nbytes: int = 8, dtype: str = "uint8") -> TensorInfo:
    """A fabricated entry: plans only read manifests, so no array is needed."""
    return TensorInfo(dtype, (nbytes,), nbytes, f"{digest_seed:032x}")


def manifest(revision: int, **entries: TensorInfo) -> StateManifest:
    return StateManifest(revision, entries)


# ---------------------------------------------------------------- majority


def test_majority_of_nothing_is_none() -> None:
    assert majority({}) is None


def test_majority_picks_the_most_held_entry_per_tensor() -> None:
    world = {
        "a": manifest(3, w=info(1), b=info(10)),
        "b": manifest(3, w=info(2), b=info(10)),
        "c": manifest(3, w=info(2), b=info(11)),
    }
    ref = majority(world)
    assert ref == manifest(3, w=info(2), b=info(10))


def test_majority_tie_goes_to_the_smallest_digest_whatever_the_order() -> None:
    world = {
        "a": manifest(1, w=info(9)),
        "b": manifest(1, w=info(9)),
        "c": manifest(1, w=info(4)),
        "d": manifest(1, w=info(4)),
    }
    assert majority(world) == manifest(1, w=info(4))
    assert majority(dict(reversed(list(world.items())))) == manifest(1, w=info(4))


def test_majority_with_odd_count_and_a_three_way_split() -> None:
    world = {
        "p0": manifest(2, w=info(7)),
        "p1": manifest(2, w=info(5)),
        "p2": manifest(2, w=info(7)),
        "p3": manifest(2, w=info(5)),
        "p4": manifest(2, w=info(3)),  # smallest digest but only one vote
    }
    assert majority(world) == manifest(2, w=info(5))
    world["p4"] = manifest(2, w=info(7))
    assert majority(world) == manifest(2, w=info(7))


def test_majority_is_the_newest_revision_even_when_few_hold_it() -> None:
    world = {
        "old0": manifest(4, w=info(1), b=info(1)),
        "old1": manifest(4, w=info(1), b=info(1)),
        "old2": manifest(4, w=info(1), b=info(1)),
        "new": manifest(5, w=info(2), b=info(1)),
    }
    assert majority(world) == manifest(5, w=info(2), b=info(1))


def test_majority_names_are_the_union_over_the_newest_revision() -> None:
    world = {
        "a": manifest(1, w=info(1)),
        "b": manifest(1, w=info(1), extra=info(5)),
        "old": manifest(0, gone=info(6)),
    }
    assert majority(world) == manifest(1, w=info(1), extra=info(5))


def test_majority_counts_the_whole_entry_not_just_the_digest() -> None:
    # two peers claim one digest with different shapes: different candidates
    same = f"{1:032x}"
    flat = TensorInfo("float32", (6,), 24, same)
    square = TensorInfo("float32", (2, 3), 24, same)
    world = {"a": manifest(1, w=flat), "b": manifest(1, w=square), "c": manifest(1, w=square)}
    assert majority(world) == manifest(1, w=square)


@FAST
@given(st.lists(st.integers(0, 3), min_size=1, max_size=9), st.randoms(use_true_random=False))
def test_majority_is_independent_of_peer_names_and_order(
    votes: list[int], rnd: random.Random
) -> None:
    world = {f"p{i}": manifest(1, w=info(v)) for i, v in enumerate(votes)}
    counts = Counter(votes)
    best = max(counts.values())
    expected = min(v for v, c in counts.items() if c == best)
    items = list(world.values())
    rnd.shuffle(items)
    renamed = {f"q{rnd.randrange(1000)}-{i}": m for i, m in enumerate(items)}
    assert majority(world) == majority(renamed) == manifest(1, w=info(expected))


# ---------------------------------------------------------------- diverged


def test_diverged_lists_exactly_missing_and_different_tensors() -> None:
    ref = manifest(2, a=info(1), b=info(2), c=info(3))
    world = {
        "same": manifest(2, a=info(1), b=info(2), c=info(3)),
        "diff_b": manifest(2, a=info(1), b=info(9), c=info(3)),
        "miss_c": manifest(2, a=info(1), b=info(2)),
        "old": manifest(1, a=info(1), b=info(2), c=info(8)),
        "old_same": manifest(1, a=info(1), b=info(2), c=info(3)),
        "stale": manifest(2, a=info(1), b=info(2), c=info(3), x=info(4)),
        "empty": manifest(0),
        "reshaped": manifest(
            2, a=TensorInfo("uint8", (2, 4), 8, info(1).digest), b=info(2), c=info(3)
        ),
    }
    assert diverged(world, ref) == {
        "diff_b": ["b"],
        "miss_c": ["c"],
        "old": ["c"],
        "old_same": [],
        "stale": [],
        "empty": ["a", "b", "c"],
        "reshaped": ["a"],
    }
    assert stale_names(world["stale"], ref) == ["x"]
    assert stale_names(world["old"], ref) == []
    assert not in_parity(world)
    assert in_parity({"x": ref, "y": manifest(2, c=info(3), b=info(2), a=info(1))})
    assert in_parity({})


@FAST
@given(
    n_good=st.integers(2, 5),
    n_bad=st.integers(0, 4),
    n_tensors=st.integers(1, 6),
    data=st.data(),
)
def test_diverged_finds_each_corrupted_peer_and_only_its_corrupted_tensors(
    n_good: int, n_bad: int, n_tensors: int, data: st.DataObject
) -> None:
    ref = manifest(10, **{f"t{i}": info(1000 + i) for i in range(n_tensors)})
    world = {f"good{i}": ref for i in range(n_good)}
    truth: dict[str, list[str]] = {}
    for j in range(n_bad):
        names = sorted(data.draw(st.sets(st.sampled_from(sorted(ref.entries)), min_size=1)))
        missing = data.draw(st.sets(st.sampled_from(names)))
        older = data.draw(st.booleans())
        entries = dict(ref.entries)
        for k, name in enumerate(names):
            if name in missing:
                del entries[name]
            else:
                # unique per peer and tensor: a corrupt value never gets two votes
                entries[name] = info(10_000 * (j + 1) + k)
        world[f"bad{j}"] = StateManifest(9 if older else 10, entries)
        truth[f"bad{j}"] = names
    assert majority(world) == ref
    assert diverged(world, ref) == truth


# ---------------------------------------------------------------- plans


def check_plan(
    plan: list[Fetch],
    world: dict[str, StateManifest],
    ref: StateManifest,
    peer: str,
    chunk_bytes: int,
) -> None:
    """Every invariant a transfer plan promises, checked from the outside."""
    own = world.get(peer)
    needed = {n for n, i in ref.entries.items() if own is None or own.entries.get(n) != i}
    by_name: dict[str, list[Fetch]] = {}
    for f in plan:
        by_name.setdefault(f.name, []).append(f)
    assert set(by_name) == {n for n in needed if ref.entries[n].nbytes > 0}
    assert plan == sorted(plan, key=lambda f: (f.name, f.offset))
    for name, fetches in by_name.items():
        want = ref.entries[name]
        # exact cover of [0, nbytes): contiguous, no gap, no overlap
        pos = 0
        for f in fetches:
            assert f.offset == pos and 0 < f.nbytes <= chunk_bytes
            assert f.digest == want.digest
            pos += f.nbytes
        assert pos == want.nbytes
        # only true holders, never the peer itself
        for f in fetches:
            assert f.source_peer != peer
            assert world[f.source_peer].entries.get(name) == want
        n_holders = len([p for p in holders(world, ref, name) if p != peer])
        assert len({f.source_peer for f in fetches}) == min(len(fetches), n_holders)


@st.composite
def worlds(draw: st.DrawFn) -> tuple[dict[str, StateManifest], StateManifest, str]:
    n_tensors = draw(st.integers(1, 6))
    sizes = [draw(st.integers(0, 300)) for _ in range(n_tensors)]
    ref = manifest(5, **{f"t{i}": info(500 + i, s) for i, s in enumerate(sizes)})
    world: dict[str, StateManifest] = {}
    for h in range(draw(st.integers(1, 5))):
        # holders drop some tensors or hold other bytes, but the reference
        # stays the majority because at least one full holder exists below
        entries = dict(ref.entries)
        for name in sorted(ref.entries):
            fate = draw(st.sampled_from(["keep", "keep", "drop", "other"]))
            if fate == "drop":
                del entries[name]
            elif fate == "other":
                entries[name] = info(90_000 + h, ref.entries[name].nbytes)
        world[f"h{h}"] = StateManifest(draw(st.sampled_from([4, 5])), entries)
    world["full"] = ref
    peer = draw(st.sampled_from(["joiner", *sorted(world)]))
    if peer == "joiner" and draw(st.booleans()):
        world["joiner"] = manifest(0)
    return world, ref, peer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.integers(1, 128))
def test_transfer_plan_covers_every_needed_byte_once_from_true_holders(
    w: tuple[dict[str, StateManifest], StateManifest, str], chunk_bytes: int
) -> None:
    world, ref, peer = w
    plan = transfer_plan(world, ref, peer, chunk_bytes)
    check_plan(plan, world, ref, peer, chunk_bytes)
    # deterministic: the same answer again, and whatever the dict order
    assert transfer_plan(world, ref, peer, chunk_bytes) == plan
    assert transfer_plan(dict(reversed(list(world.items()))), ref, peer, chunk_bytes) == plan


def test_big_tensor_is_striped_evenly_over_all_four_holders() -> None:
    ref = manifest(1, w=info(1, 16 * 100))
    world = {f"h{i}": ref for i in range(4)}
    plan = transfer_plan(world, ref, "joiner", chunk_bytes=100)
    assert len(plan) == 16
    assert Counter(f.source_peer for f in plan) == {f"h{i}": 4 for i in range(4)}


def test_many_small_tensors_spread_evenly_over_holders() -> None:
    ref = manifest(1, **{f"t{i:02d}": info(i, 10) for i in range(12)})
    world = {f"h{i}": ref for i in range(3)}
    plan = transfer_plan(world, ref, "joiner", chunk_bytes=64)
    assert Counter(f.source_peer for f in plan) == {"h0": 4, "h1": 4, "h2": 4}


def test_plan_never_uses_a_peer_holding_other_bytes_and_uses_older_exact_holders() -> None:
    ref = manifest(3, w=info(1, 400), b=info(2, 400))
    world = {
        "r0": ref,
        "r1": ref,
        "other": manifest(3, w=info(77, 400), b=info(2, 400)),  # w differs
        "old_exact": manifest(2, w=info(1, 400), b=info(66, 400)),  # older, w identical
        "me": manifest(3, b=info(2, 400)),
    }
    plan = transfer_plan(world, ref, "me", chunk_bytes=50)
    assert {f.name for f in plan} == {"w"}
    assert {f.source_peer for f in plan} == {"r0", "r1", "old_exact"}
    check_plan(plan, world, ref, "me", 50)


def test_plan_for_a_peer_in_parity_is_empty_and_never_fetches_from_itself() -> None:
    ref = manifest(1, w=info(1, 100))
    assert transfer_plan({"a": ref, "b": ref}, ref, "a", 10) == []
    # the only holder is the peer itself: nothing to fetch, and no self-fetch
    assert transfer_plan({"a": ref, "b": manifest(1)}, ref, "a", 10) == []


def test_zero_byte_tensors_get_no_fetch_but_are_needed() -> None:
    empty = TensorInfo("float32", (0, 4), 0, tensor_digest(np.zeros((0, 4), np.float32)))
    ref = manifest(1, e=empty, w=info(1, 30))
    world = {"a": ref}
    assert diverged(world | {"j": manifest(0)}, ref)["j"] == ["e", "w"]
    plan = transfer_plan(world, ref, "j", 16)
    assert [(f.name, f.offset, f.nbytes) for f in plan] == [("w", 0, 16), ("w", 16, 14)]


def test_plan_rejects_bad_chunk_size_and_unheld_tensors() -> None:
    ref = manifest(1, w=info(1, 10))
    for bad in [0, -1, True, 1.5]:
        with pytest.raises(InvalidArgument):
            transfer_plan({"a": ref}, ref, "j", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="holds tensor 'w'"):
        transfer_plan({"a": manifest(1, w=info(2, 10))}, ref, "j", 4)


def test_two_joiners_do_not_all_start_on_the_same_holder() -> None:
    ref = manifest(1, w=info(1, 10))
    world = {f"h{i}": ref for i in range(4)}
    firsts = {transfer_plan(world, ref, f"joiner{j}", 64)[0].source_peer for j in range(16)}
    assert len(firsts) > 1


# ---------------------------------------------------------------- transfers sharing a link


def test_one_holder_serving_one_fetcher_shares_no_link() -> None:
    ref = manifest(1, w=info(1, 1000))
    assert shared_transfers({"h": ref, "j": manifest(0)}, ref, 100) == frozenset()
    # in parity: nothing moves, nothing is shared
    assert shared_transfers({"a": ref, "b": ref}, ref, 100) == frozenset()


def test_a_joiner_fetching_from_four_holders_shares_its_link_with_all_of_them() -> None:
    ref = manifest(1, w=info(1, 16 * 100))
    world: dict[str, StateManifest] = {f"h{i}": ref for i in range(4)} | {"j": manifest(0)}
    assert shared_transfers(world, ref, 100) == {(f"h{i}", "j") for i in range(4)}


def test_a_holder_serving_two_fetchers_shares_its_link_between_them() -> None:
    ref = manifest(1, w=info(1, 50))
    world = {"h": ref, "j1": manifest(0), "j2": manifest(0)}
    assert shared_transfers(world, ref, 100) == {("h", "j1"), ("h", "j2")}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.integers(1, 128))
def test_shared_transfers_are_exactly_those_that_meet_another_at_either_end(
    w: tuple[dict[str, StateManifest], StateManifest, str], chunk_bytes: int
) -> None:
    world, ref, _ = w
    sources = {p: {f.source_peer for f in transfer_plan(world, ref, p, chunk_bytes)} for p in world}
    moving = {(s, p) for p, ss in sources.items() for s in ss}
    fetchers = Counter(s for s, _ in moving)
    shared = shared_transfers(world, ref, chunk_bytes)
    assert shared <= moving
    for s, p in moving:
        assert ((s, p) in shared) == (len(sources[p]) > 1 or fetchers[s] > 1)
    assert shared_transfers(dict(reversed(list(world.items()))), ref, chunk_bytes) == shared


# ---------------------------------------------------------------- fetch wire, source side


def test_fetch_wire_round_trip_and_rejection() -> None:
    f = Fetch("w", 64, 32, "h1", f"{5:032x}")
    assert Fetch.from_wire(f.to_wire()) == f
    for bad in [
        None,
        [],
        ["w", 64, 32, "h1"],
        ["", 64, 32, "h1", f.digest],
        ["w", -1, 32, "h1", f.digest],
        ["w", 64, True, "h1", f.digest],
        ["w", 64, 2**64, "h1", f.digest],
        ["w", 64, 32, "", f.digest],
        ["w", 64, 32, 7, f.digest],
        ["w", 64, 32, "h1", "xyz"],
        [b"w", 64, 32, "h1", f.digest],
    ]:
        with pytest.raises(ProtocolError):
            Fetch.from_wire(bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.none() | st.integers() | st.text(max_size=40) | st.floats(), max_size=6))
def test_garbage_fetch_is_a_protocol_error_and_nothing_else(obj: list[Any]) -> None:
    try:
        f = Fetch.from_wire(obj)
    except ProtocolError:
        return
    assert Fetch.from_wire(f.to_wire()) == f


def test_source_serves_only_in_range_requests_for_the_digest_it_holds() -> None:
    local = manifest(1, w=info(1, 100))
    d = local.entries["w"].digest
    assert check_fetch(Fetch("w", 90, 10, "me", d), local, "me") == local.entries["w"]
    with pytest.raises(ProtocolError):
        check_fetch(Fetch("w", 90, 11, "me", d), local, "me")
    with pytest.raises(ProtocolError):
        check_fetch(Fetch("w", 0, 10, "someone else", d), local, "me")
    with pytest.raises(MismatchError):
        check_fetch(Fetch("w", 0, 10, "me", info(2).digest), local, "me")
    with pytest.raises(MismatchError):
        check_fetch(Fetch("nope", 0, 10, "me", d), local, "me")


# ---------------------------------------------------------------- verify


def test_verify_accepts_exact_and_rejects_corrupt_or_misallocated_tensors() -> None:
    w = np.arange(10, dtype=np.float32)
    ref = manifest_of({"w": w}, 1)
    verify("w", w.copy(), ref)
    bad = w.copy()
    byte_view(bad)[17] ^= 0x01
    with pytest.raises(ProtocolError, match="corrupt"):
        verify("w", bad, ref)
    with pytest.raises(MismatchError):
        verify("w", w.reshape(2, 5), ref)
    with pytest.raises(MismatchError):
        verify("w", w.view(np.int32), ref)
    with pytest.raises(InvalidArgument):
        verify("nope", w, ref)


# ---------------------------------------------------------------- simulated sync


def sync(
    arrays: dict[str, dict[str, np.ndarray]],
    revisions: dict[str, int],
    chunk_bytes: int,
    lies: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, list[Fetch]]:
    """Run one sync round in memory: every diverged peer plans, copies, verifies.

    ``lies`` replaces what a source *sends* (not what it reports), to model
    a corrupt transfer. Returns the plans, for assertions about sources.
    """
    world = {p: manifest_of(arrays[p], revisions[p]) for p in arrays}
    ref = majority(world)
    assert ref is not None
    plans: dict[str, list[Fetch]] = {}
    received: dict[str, dict[str, np.ndarray]] = {}
    for peer, _ in diverged(world, ref).items():
        plan = transfer_plan(world, ref, peer, chunk_bytes)
        plans[peer] = plan
        fresh = {n: allocate(ref.entries[n]) for n in diverged(world, ref)[peer]}
        for f in plan:
            check_fetch(f, world[f.source_peer], f.source_peer)
            src = (lies or {}).get(f.source_peer, arrays[f.source_peer])[f.name]
            byte_view(fresh[f.name])[f.offset : f.offset + f.nbytes] = byte_view(src)[
                f.offset : f.offset + f.nbytes
            ]
        for n, arr in fresh.items():
            verify(n, arr, ref)
        received[peer] = fresh
    # apply only after every plan is made: sources serve their pre-sync state
    for peer, fresh in received.items():
        state = {n: a for n, a in arrays[peer].items() if n in ref.entries}
        state.update(fresh)
        arrays[peer] = state
        revisions[peer] = ref.revision
    after = {p: manifest_of(arrays[p], revisions[p]) for p in arrays}
    assert in_parity(after)
    assert all(m == ref for m in after.values())
    return plans


def model_state(seed: int, scale: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((64 * scale, 33), dtype=np.float32),
        "layer.0.w": rng.standard_normal((40, 40)).astype(ml_dtypes.bfloat16),
        "layer.0.b": rng.standard_normal(40).astype(np.float16),
        "step": np.array(1234, dtype=np.int64),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "mask": rng.integers(0, 2, 77).astype(np.bool_),
    }


def copy_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: a.copy() for n, a in state.items()}


def test_joiner_with_no_state_syncs_bit_identically_from_four_holders() -> None:
    base = model_state(0, scale=4)
    arrays = {f"h{i}": copy_state(base) for i in range(4)} | {"joiner": {}}
    revisions = {f"h{i}": 9 for i in range(4)} | {"joiner": 0}
    plans = sync(arrays, revisions, chunk_bytes=4096)
    assert set(plans) == {"joiner"}
    assert {f.source_peer for f in plans["joiner"]} == {"h0", "h1", "h2", "h3"}
    # the biggest tensor alone is pulled from every holder
    assert {f.source_peer for f in plans["joiner"] if f.name == "embed"} == {
        "h0",
        "h1",
        "h2",
        "h3",
    }
    for name, arr in base.items():
        got = arrays["joiner"][name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert bytes(byte_view(got)) == bytes(byte_view(arr))


def test_joiner_absent_from_the_manifests_syncs_like_an_empty_one() -> None:
    base = model_state(1)
    world = {f"h{i}": manifest_of(base, 3) for i in range(2)}
    ref = majority(world)
    assert ref is not None
    plan = transfer_plan(world, ref, "new", 1000)
    fresh = {n: allocate(i) for n, i in ref.entries.items()}
    for f in plan:
        byte_view(fresh[f.name])[f.offset : f.offset + f.nbytes] = byte_view(base[f.name])[
            f.offset : f.offset + f.nbytes
        ]
    for n, a in fresh.items():
        verify(n, a, ref)
    assert manifest_of(fresh, 3) == ref


def test_peer_with_one_flipped_byte_fetches_only_that_tensor() -> None:
    base = model_state(2)
    arrays = {f"p{i}": copy_state(base) for i in range(3)}
    byte_view(arrays["p1"]["layer.0.w"])[123] ^= 0x40
    revisions = dict.fromkeys(arrays, 5)
    plans = sync(arrays, revisions, chunk_bytes=512)
    assert set(plans) == {"p1"}
    assert {f.name for f in plans["p1"]} == {"layer.0.w"}
    assert sum(f.nbytes for f in plans["p1"]) == base["layer.0.w"].nbytes
    assert {f.source_peer for f in plans["p1"]} == {"p0", "p2"}


def test_older_and_diverged_peers_all_converge_to_the_newest_revision() -> None:
    old = model_state(3)
    new = copy_state(old)
    new["embed"] += 1.0
    new["step"] += 1
    arrays = {
        "n0": copy_state(new),
        "n1": copy_state(new),
        "o0": copy_state(old),
        "o1": copy_state(old) | {"legacy": np.ones(3)},
        "j": {},
    }
    byte_view(arrays["n1"]["mask"])[0] ^= 1  # one of two newest peers diverged
    revisions = {"n0": 8, "n1": 8, "o0": 7, "o1": 7, "j": 0}
    # 1 vs 1 among the newest: the tie goes to the smaller digest, and the
    # sync must still converge everyone onto it
    plans = sync(arrays, revisions, chunk_bytes=1024)
    assert "legacy" not in arrays["o1"]
    assert {f.name for f in plans["o0"]} <= {"embed", "step", "mask"}
    assert "layer.0.w" not in {f.name for f in plans["o0"]}


def test_a_lying_source_is_caught_by_verify() -> None:
    base = model_state(4, scale=2)
    arrays = {"h0": copy_state(base), "h1": copy_state(base), "j": {}}
    revisions = {"h0": 2, "h1": 2, "j": 0}
    liar = copy_state(base)
    byte_view(liar["embed"])[-1] ^= 0xFF  # h1 reports the right digest, sends other bytes
    with pytest.raises(ProtocolError, match="embed"):
        sync(arrays, revisions, chunk_bytes=256, lies={"h1": liar})


@FAST
@given(
    n_holders=st.integers(1, 5),
    n_diverged=st.integers(0, 3),
    chunk_bytes=st.integers(1, 700),
    seed=st.integers(0, 2**16),
    joiner=st.booleans(),
)
def test_any_sync_round_ends_in_bit_parity(
    n_holders: int, n_diverged: int, chunk_bytes: int, seed: int, joiner: bool
) -> None:
    rng = np.random.default_rng(seed)
    base = model_state(seed)
    # the diverged peers each flip bytes of their own, so the reference is
    # the holders' state as long as at least two holders agree
    n_holders = max(n_holders, 2 if n_diverged else 1)
    arrays = {f"h{i}": copy_state(base) for i in range(n_holders)}
    for j in range(n_diverged):
        state = copy_state(base)
        names = [n for n, a in state.items() if a.nbytes]
        for name in rng.choice(names, size=int(rng.integers(1, len(names) + 1)), replace=False):
            view = byte_view(state[str(name)])
            view[int(rng.integers(0, view.size))] ^= np.uint8(1 << j)
        arrays[f"d{j}"] = state
    if joiner:
        arrays["j"] = {}
    revisions = {p: (0 if p == "j" else 6) for p in arrays}
    sync(arrays, revisions, chunk_bytes)
    for p in arrays:
        for name, arr in base.items():
            assert bytes(byte_view(arrays[p][name])) == bytes(byte_view(arr))
