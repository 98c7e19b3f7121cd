"""collnet_client.torch over real daemons, and examples/diloco_train.py end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import collnet_client
import numpy as np
import pytest
from cluster_harness import CALL_TIMEOUT_S, run_example_json, run_on_all, running_peers
from collnet_client import Comm

torch = pytest.importorskip("torch")
from collnet_client.torch import DiLoCo, sync_state  # noqa: E402
from collnet_client.torch.exchange import Exchange  # noqa: E402

pytestmark = pytest.mark.timeout(240)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "diloco_train.py"


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _loss(model: Any, gen: Any) -> Any:
    """A batch's loss: learn the sum of the inputs."""
    x = torch.randn(8, 4, generator=gen, device=gen.device)
    return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()


def _outer(kind: str) -> Any:
    if kind == "nesterov":
        return None  # the default, through outer_lr and outer_momentum
    return lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.99))


@pytest.mark.parametrize("outer", ["nesterov", "adam"])
def test_diloco_outer_step_is_the_outer_optimizer_on_the_averaged_pseudo_gradient(
    tmp_path: Path, outer: str
) -> None:
    torch.set_num_threads(1)
    lr, mu, rounds, inner = 0.7, 0.9, 3, 2
    models = [_model() for _ in range(2)]  # here: torch's seed is global, threads would race

    def one(rank: int, comm: Comm) -> tuple[list[np.ndarray], list[str], np.ndarray]:
        model = models[rank]
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        kwargs: dict[str, Any] = (
            {"outer_lr": lr, "outer_momentum": mu}
            if outer == "nesterov"
            else {"outer_optimizer": _outer(outer)}
        )
        d = DiLoCo(comm, model, opt, inner_steps=inner, timeout_s=CALL_TIMEOUT_S, **kwargs)
        d.start()
        gen = torch.Generator().manual_seed(rank)
        deltas, hashes = [], []
        for _ in range(rounds):
            for _ in range(inner):
                x = torch.randn(8, 4, generator=gen)
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            deltas.append(d.anchor - d._read_local(0, len(d.params)))
            hashes.append(d.outer_step().hash)
        hashes.append(d.finish().hash)
        return deltas, hashes, d.global_weights.copy()

    with running_peers(2, tmp_path) as p:
        results = run_on_all(p.comms, one)
    assert results[0][1] == results[1][1], "peers' global weights differ after a round"
    assert np.array_equal(results[0][2], results[1][2])
    # The reference: average the peers' pseudo-gradients, then the outer optimizer.
    g = torch.nn.utils.parameters_to_vector(_model().parameters()).detach().numpy().copy()
    if outer == "nesterov":
        m = np.zeros_like(g)
        for r in range(rounds):
            avg = (results[0][0][r] + results[1][0][r]) / np.float32(2)
            m = np.float32(mu) * m + avg
            g = g - np.float32(lr) * (avg + np.float32(mu) * m)
    else:
        w = torch.from_numpy(g)
        ref = _outer(outer)([w])
        for r in range(rounds):
            w.grad = torch.from_numpy((results[0][0][r] + results[1][0][r]) / np.float32(2))
            ref.step()
    np.testing.assert_allclose(results[0][2], g, rtol=1e-5, atol=1e-6)


def test_diloco_with_two_trainers_per_node_keeps_every_trainer_identical(
    tmp_path: Path,
) -> None:
    # Each node's daemon meets its two trainers and crosses the network once.
    torch.set_num_threads(1)
    models = [_model() for _ in range(4)]

    def one(rank: int, comm: Comm) -> list[str]:
        model = models[rank]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        d = DiLoCo(comm, model, opt, inner_steps=2, timeout_s=CALL_TIMEOUT_S)
        d.start()
        gen = torch.Generator().manual_seed(rank)
        hashes = []
        while d.round < 3:
            x = torch.randn(16, 4, generator=gen)
            loss = (model(x) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            outer = d.step()
            if outer is not None:
                assert outer.in_parity and outer.world == 2
                hashes.append(outer.hash)
        return hashes

    with running_peers(2, tmp_path, admit=False) as p:
        comms = [
            collnet_client.connect(d.ipc, timeout_s=CALL_TIMEOUT_S, local_size=2)
            for d in p.cluster.daemons
            for _ in range(2)
        ]
        try:
            results = run_on_all(comms, one)
        finally:
            for comm in comms:
                comm.close()
    assert len(results[0]) == 3 and all(r == results[0] for r in results)


class _Outcome:
    """A stand-in handle: how a round's all-reduce ended on one peer."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


def test_a_round_completed_on_some_peers_only_is_reconciled_by_the_sync(tmp_path: Path) -> None:
    # A peer dying at the very end of an all-gather can leave one survivor with the
    # result and another with PeerLost; the sync must bring both to the newer state.
    from collnet_client import PeerLost

    models = [_model() for _ in range(2)]

    def one(rank: int, comm: Comm) -> tuple[Any, ...]:
        model = models[rank]
        d = DiLoCo(comm, model, torch.optim.SGD(model.parameters(), lr=0.1), inner_steps=1)
        d.start()
        d._buffer.fill(0.01)  # the averaged pseudo-gradient, as the completing peer got it
        error = None if rank == 0 else PeerLost("lost at the end of the all-gather", peer="x")
        d._apply(Exchange(0, 0, 0, _Outcome(error), d._buffer, 0))
        reduced = d._applied
        d._round[0] += 1
        _, result = d._agree(CALL_TIMEOUT_S)
        return reduced, d.revision, d.state_hash(), tuple(result.fetched), result.in_parity

    with running_peers(2, tmp_path) as p:
        (red0, rev0, h0, f0, par0), (red1, rev1, h1, f1, par1) = run_on_all(p.comms, one)
    assert red0 and not red1
    assert rev0 == rev1 == 1 and h0 == h1 and par0 and par1
    assert not f0 and any(name.startswith("weights.") for name in f1)


def test_torch_sync_state_copies_fetched_tensors_back_into_strided_tensors(
    tmp_path: Path,
) -> None:
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)

    def one(rank: int, comm: Comm) -> Any:
        base = values.clone() if rank == 0 else torch.zeros(4, 3)
        # Rank 1's tensor is a transposed view: synced through a host copy.
        tensor = base if rank == 0 else base.t()
        counter = torch.tensor([5 if rank == 0 else 0], dtype=torch.int64)
        # Comm.sync_state takes torch tensors as well as the torch helper does.
        sync = sync_state if rank == 0 else type(comm).sync_state
        result = sync(comm, {"w": tensor, "step": counter}, 1 - rank)
        return tensor.clone(), counter.clone(), result

    with running_peers(2, tmp_path) as p:
        (t0, _, r0), (t1, c1, r1) = run_on_all(p.comms, one)
    assert torch.equal(t1, values) and torch.equal(t0, values)
    assert int(c1[0]) == 5
    assert set(r1.fetched) == {"w", "step"} and not r0.fetched
    assert r0.in_parity and r1.in_parity and r0.state_digest == r1.state_digest


def test_example_three_peers_converge_with_equal_hashes() -> None:
    out = run_example_json(EXAMPLE, "--peers", "3", "--step-ms", "0")
    assert out["ok"] and out["hashes_equal"], out
    assert out["final_loss"] < out["loss_threshold"] < out["initial_loss"], out
    assert out["peers_final"] == 3


def test_example_survives_a_killed_peer_and_trains_a_joiner() -> None:
    out = run_example_json(EXAMPLE, "--peers", "3", "--kill", "1", "--join", "1")
    assert out["ok"] and out["hashes_equal"], out
    assert out["final_loss"] < out["loss_threshold"], out
    assert len(out["killed"]) == 1 and len(out["joined"]) == 1
    # two survivors and the joiner finish with the same model
    assert out["peers_final"] == 3 and out["world_final"] == 3
    assert out["killed_trainer_exit_codes"] == [3]


def test_trainer_exits_with_the_typed_error_when_its_daemon_dies(tmp_path: Path) -> None:
    with running_peers(1, tmp_path, admit=False) as p:
        p.close()
        daemon = p.cluster.daemons[0]
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--daemon", daemon.ipc, "--progress-json",
             "--outer-steps", "100000", "--inner-steps", "5", "--step-ms", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                event = json.loads(line)
                if event["event"] == "outer_step":
                    assert event["peer"] == daemon.peer_id and event["world"] == 1
                    assert {"step", "epoch", "revision", "hash", "loss"} <= set(event)
                    break
            p.cluster.kill(daemon, signal.SIGKILL)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 3, stderr
    assert "DaemonUnavailable" in stderr


def test_example_trainer_restarted_on_its_live_daemon_rejoins_and_converges() -> None:
    out = run_example_json(EXAMPLE, "--peers", "3", "--restart-trainer", "1")
    assert out["ok"] and out["hashes_equal"], out
    assert out["final_loss"] < out["loss_threshold"] < out["initial_loss"], out
    assert out["killed"] == [] and out["restarted_trainers_rejoined"], out
    (restart,) = out["trainer_restarts"]
    # Back in the world of all three, at a round after the one it died in, and
    # trained to the end with the same model as the others.
    assert restart["world_at_rejoin"] == 3, restart
    assert restart["rejoined_at_step"] >= restart["killed_at_step"], restart
    assert out["peers_final"] == 3 and out["world_final"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("streaming", [False, True], ids=["blocking", "streaming"])
def test_diloco_with_a_cuda_model_takes_the_staged_path_and_keeps_peers_identical(
    tmp_path: Path, streaming: bool
) -> None:
    models = [_model().cuda() for _ in range(2)]

    def one(rank: int, comm: Comm) -> tuple[list[str], np.ndarray, np.ndarray]:
        model = models[rank]
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        d = DiLoCo(
            comm, model, opt, inner_steps=4, streaming=streaming,
            fragments=2 if streaming else 1, timeout_s=CALL_TIMEOUT_S,
        )  # fmt: skip
        d.start()
        gen = torch.Generator(device="cuda").manual_seed(rank)
        hashes = []
        while d.round < 4:
            x = torch.randn(8, 4, generator=gen, device="cuda")
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            out = d.step()
            if out is not None:
                hashes.append(out.hash)
        hashes.append(d.finish().hash)
        local = torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy()
        return hashes, d.global_weights.copy(), local

    with running_peers(2, tmp_path) as p:
        (h0, g0, l0), (h1, g1, l1) = run_on_all(p.comms, one)
    assert h0 == h1 and np.array_equal(g0, g1)
    # finish() leaves the global weights in the CUDA model, bit for bit.
    assert np.array_equal(l0, g0) and np.array_equal(l1, g1)
    assert all(q.is_cuda for q in models[0].parameters())
