"""A trainer killed and started again on its live daemon: the world goes on.

Real processes: a coordinator, daemons, and one trainer process per trainer,
each all-reducing with default tags in a loop (``update_topology`` every
``EVERY`` collectives, as a training loop does at every outer step, and after
a ``PeerLost``). A trainer is SIGKILLed while the others wait in a collective
it will never join: its daemon leaves the world at once, so they fail with
``PeerLost`` naming that daemon within a few seconds, not at their deadline.
The same trainer started again on the same daemon is admitted at the
survivors' next ``update_topology``, and all of them all-reduce correctly
(the numpy reference, bit-identical everywhere) within 10 s of its restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import collnet_client
import numpy as np
import pytest
from cluster_harness import running_peers, wait_until
from collnet_daemon.config import DaemonConfig
from collnet_daemon.control import ControlPlane
from collnet_daemon.coordinator import CoordinatorService

from collnet.errors import PeerLost
from collnet.membership import PeerInfo, WorldView

pytestmark = pytest.mark.timeout(180)

EVERY = 5  # collectives between two update_topology calls
COUNT = 40_000  # int64 elements: 320 KB, so the ring algorithm runs
FAIL_BOUND_S = 5.0  # the collective timeout is 30 s
REJOIN_BOUND_S = 10.0

# One trainer: its input of a collective depends only on (name, epoch, tag), so
# the test can rebuild every trainer's input and the reference.
_TRAINER = """
import hashlib, json, os, sys, time, zlib
import numpy as np
import collnet_client
from collnet_client import PeerLost

ipc, name, local_size, every, count, pause = sys.argv[1:7]
local_size, every, count = int(local_size), int(every), int(count)

def emit(**event):
    print(json.dumps({**event, "t": time.time()}), flush=True)

def tensor(epoch, tag):
    seed = zlib.crc32(f"{name}/{epoch}/{tag}".encode())
    return np.random.default_rng(seed).integers(-1000, 1000, count).astype(np.int64)

comm = collnet_client.connect(ipc, timeout_s=60, local_size=local_size)
world = comm.update_topology()
emit(e="joined", epoch=world.epoch, world=list(world.peers))
issued = 0  # in this epoch: the SDK's default tags count the same way (1, 2, ...)
while True:
    if issued and issued % every == 0:
        agreed = comm.update_topology()
        issued = 0 if agreed.epoch != world.epoch else issued
        world = agreed
    issued += 1
    try:
        out = comm.all_reduce(tensor(world.epoch, issued), op="sum", timeout_s=30)
    except PeerLost as exc:
        emit(e="error", kind=exc.kind, peer=exc.peer, epoch=world.epoch, tag=issued)
        agreed = comm.update_topology()
        issued = 0 if agreed.epoch != world.epoch else issued
        world = agreed
        continue
    emit(e="ok", epoch=world.epoch, tag=issued, world=list(world.peers),
         hash=hashlib.sha256(out.tobytes()).hexdigest())
    if pause and os.path.exists(pause) and issued % every:
        # The others' next collective is an all-reduce this trainer never joins.
        emit(e="paused")
        time.sleep(3600)
"""


def _input(name: str, epoch: int, tag: int) -> np.ndarray:
    seed = zlib.crc32(f"{name}/{epoch}/{tag}".encode())
    return np.random.default_rng(seed).integers(-1000, 1000, COUNT).astype(np.int64)


class Trainer:
    """One trainer process and its events (JSON lines), read by a thread."""

    def __init__(self, ipc: str, name: str, local_size: int = 1, pause: Path | None = None):
        self.name = name
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TRAINER, ipc, name, str(local_size), str(EVERY),
             str(COUNT), str(pause or "")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["e"] == kind]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@contextmanager
def _trainers() -> Iterator[list[Trainer]]:
    started: list[Trainer] = []
    try:
        yield started
    finally:
        errors = {t.name: t.stop()[-2000:] for t in started}
        print("trainer stderr:", errors)


def _oks_in(trainer: Trainer, peers: set[str], since: float = 0.0) -> list[dict[str, Any]]:
    return [e for e in trainer.of("ok") if set(e["world"]) == peers and e["t"] >= since]


def _kill_while_the_others_wait(victim: Trainer, pause: Path) -> float:
    """Pause the victim after a collective, so the others' next one waits for it, then
    SIGKILL it; the time of the kill."""
    pause.touch()
    wait_until(lambda: bool(victim.of("paused")), 30.0, f"{victim.name} to pause")
    time.sleep(0.5)  # the others are now inside an all-reduce the victim never joins
    pause.unlink()
    killed_t = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    return killed_t


def _assert_fails_fast_naming(trainer: Trainer, peer: str, killed_t: float) -> None:
    wait_until(
        lambda: any(e["t"] >= killed_t for e in trainer.of("error")),
        30.0,
        f"{trainer.name}'s collective to fail",
    )
    first = next(e for e in trainer.of("error") if e["t"] >= killed_t)
    assert first["kind"] == "PeerLost" and first["peer"] == peer, first
    took = first["t"] - killed_t
    print(f"{trainer.name}: PeerLost naming {peer} {took:.2f}s after the kill")
    assert took < FAIL_BOUND_S, f"{trainer.name} failed {took:.1f}s after the kill"


def _assert_rejoined_in_time(
    trainers: list[Trainer], peers: set[str], restarted_t: float, steps: int = 10
) -> None:
    """Every trainer completes ``steps`` common collectives in a world of ``peers``
    after the restart; the first within REJOIN_BOUND_S of it."""

    def common() -> list[tuple[int, int]]:
        keys = [{(e["epoch"], e["tag"]) for e in _oks_in(t, peers, restarted_t)} for t in trainers]
        return sorted(set.intersection(*keys))

    wait_until(lambda: len(common()) >= steps, 60.0, f"{steps} collectives of {sorted(peers)}")
    first = common()[0]
    done_t = max(e["t"] for t in trainers for e in t.of("ok") if (e["epoch"], e["tag"]) == first)
    took = done_t - restarted_t
    print(f"all of {sorted(peers)} all-reduced {took:.2f}s after the restart")
    assert took < REJOIN_BOUND_S, f"all of {sorted(peers)} all-reduced {took:.1f}s after restart"


def _assert_every_result_correct(trainers: list[Trainer], names_of: dict[str, list[str]]) -> None:
    """Each result is the numpy sum of the inputs of the trainers of that world, and
    every trainer of a collective holds the same bytes."""
    by_key: dict[tuple[int, int], set[str]] = {}
    checked = 0
    for trainer in trainers:
        for e in trainer.of("ok"):
            key = (e["epoch"], e["tag"])
            names = [n for peer in sorted(e["world"]) for n in names_of[peer]]
            ref = np.sum([_input(n, *key) for n in names], axis=0, dtype=np.int64)
            assert e["hash"] == hashlib.sha256(ref.tobytes()).hexdigest(), (trainer.name, e)
            by_key.setdefault(key, set()).add(e["hash"])
            checked += 1
    assert all(len(h) == 1 for h in by_key.values())
    assert checked > 30


def test_a_trainer_killed_and_restarted_on_its_daemon_rejoins_within_10s(tmp_path: Path) -> None:
    with running_peers(3, tmp_path, admit=False) as p, _trainers() as trainers:
        p.close()  # the harness's own clients never joined: they change nothing
        d = p.cluster.daemons
        ids = [x.peer_id for x in d]
        pause = tmp_path / "pause"
        trainers += [
            Trainer(x.ipc, f"t{i}", pause=pause if i == 1 else None) for i, x in enumerate(d)
        ]
        everyone = set(ids)
        for t in trainers:
            wait_until(lambda t=t: len(_oks_in(t, everyone)) >= 5, 60.0, f"{t.name} to run")

        killed_t = _kill_while_the_others_wait(trainers[1], pause)
        for survivor in (trainers[0], trainers[2]):
            _assert_fails_fast_naming(survivor, ids[1], killed_t)
        # The survivors go on in the world without daemon 1, which stays up.
        rest = {ids[0], ids[2]}
        for t in (trainers[0], trainers[2]):
            wait_until(lambda t=t: bool(_oks_in(t, rest, killed_t)), 20.0, f"{t.name} to go on")
        assert d[1].proc.poll() is None, "the daemon outlives its trainer"
        # A client that only looks (a probe, a health check) is no trainer: the idle
        # daemon answers it and stays out of the world, not even pending.
        with collnet_client.connect(d[1].ipc, timeout_s=30) as probe:
            seen = probe.world
        assert ids[1] not in seen.peers + seen.pending, seen

        restarted = Trainer(d[1].ipc, "t1")
        trainers.append(restarted)
        _assert_rejoined_in_time([trainers[0], trainers[2], restarted], everyone, restarted.started)
        _assert_every_result_correct(trainers, {ids[i]: [f"t{i}"] for i in range(3)})


def test_one_of_two_local_trainers_killed_and_restarted_rejoins_within_10s(
    tmp_path: Path,
) -> None:
    with running_peers(2, tmp_path, admit=False) as p, _trainers() as trainers:
        p.close()
        d = p.cluster.daemons
        ids = [x.peer_id for x in d]
        pause = tmp_path / "pause"
        trainers += [
            Trainer(d[0].ipc, "t0"),
            Trainer(d[1].ipc, "t1a", local_size=2, pause=pause),
            Trainer(d[1].ipc, "t1b", local_size=2),
        ]
        everyone = set(ids)
        for t in trainers:
            wait_until(lambda t=t: len(_oks_in(t, everyone)) >= 5, 60.0, f"{t.name} to run")

        killed_t = _kill_while_the_others_wait(trainers[1], pause)
        # The other local trainer cannot complete its node's group, nor the remote
        # peer its collective: both hear that daemon 1 left.
        for survivor in (trainers[0], trainers[2]):
            _assert_fails_fast_naming(survivor, ids[1], killed_t)
        wait_until(lambda: bool(_oks_in(trainers[0], {ids[0]}, killed_t)), 20.0, "t0 to go on")

        restarted = Trainer(d[1].ipc, "t1a", local_size=2)
        trainers.append(restarted)
        _assert_rejoined_in_time([trainers[0], trainers[2], restarted], everyone, restarted.started)
        _assert_every_result_correct(trainers, {ids[0]: ["t0"], ids[1]: ["t1a", "t1b"]})


def _plane(coordinator: tuple[str, int], peer_id: str) -> ControlPlane:
    """A daemon's control plane alone, holding the newest world it was given."""
    held = [WorldView(0, ())]

    def adopt(world: WorldView) -> None:
        if world.epoch >= held[0].epoch:
            held[0] = world

    config = DaemonConfig(coordinator=coordinator, ipc="ipc:///unused", peer_id=peer_id)
    return ControlPlane(config, lambda: held[0], adopt)


async def test_a_session_ends_with_a_leave_on_a_live_connection_and_opens_as_pending() -> None:
    service = CoordinatorService()
    address = await service.start("127.0.0.1", 0)
    a, b = _plane(address, "a"), _plane(address, "b")
    try:
        await a.start(PeerInfo("a", "127.0.0.1", 1))
        await b.start(PeerInfo("b", "127.0.0.1", 2))
        first, _ = await asyncio.gather(a.update_topology(10.0), b.update_topology(10.0))
        assert set(first.ids) == {"a", "b"}

        # b's trainer is gone while b waits at the barrier: the leave answers that
        # call (the coordinator drops it) and the member goes on alone.
        waiting = asyncio.ensure_future(b.update_topology(10.0))
        await asyncio.sleep(0.2)
        assert await b.end_session(2.0)
        with pytest.raises(PeerLost):
            await asyncio.wait_for(waiting, 5.0)
        assert service.state.world().ids == ("a",) and service.state.epoch == first.epoch + 1

        # Idle, b stays connected and unregistered; it may still look at the world.
        await asyncio.sleep(0.2)
        assert b.connected
        seen = await b.world(5.0)
        assert seen.ids == ("a",) and seen.pending == ()

        # A trainer joins again: pending at once, admitted at the member's next call.
        await b.begin_session()
        assert service.state.world().pending == ("b",)
        again, joined = await asyncio.gather(a.update_topology(10.0), b.update_topology(10.0))
        assert set(again.ids) == {"a", "b"} and again == joined
        assert again.epoch == first.epoch + 2
    finally:
        a.close()
        b.close()
        await service.close()
