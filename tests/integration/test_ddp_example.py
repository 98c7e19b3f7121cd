"""examples/ddp_train.py end to end: DDP over init_process_group("collnet"), a process per rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cluster_harness import run_example_json

pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(240)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_train.py"


def _run(*args: str) -> dict[str, Any]:
    return run_example_json(EXAMPLE, "--steps", "30", *args)


def test_three_ranks_train_with_bit_identical_parameters_after_every_step() -> None:
    out = _run("--peers", "3", "--step-ms", "0")
    assert out["ok"] and out["params_equal"], out
    assert out["final_loss"] < 0.5 * out["initial_loss"], out
    assert out["peers_final"] == 3 and out["world_final"] == 3
    assert out["killed"] == [] and out["errors"] == {} and out["reformed"] == 0


def test_killed_peer_gives_survivors_a_typed_error_and_training_goes_on_reformed() -> None:
    out = _run("--peers", "3", "--kill", "1")
    assert out["ok"] and out["params_equal"], out
    assert len(out["killed"]) == 1 and out["reformed"] == 2, out
    errors = out["errors"]
    assert set(errors) == {"trainer0", "trainer1"}, out
    for error in errors.values():
        # Out of loss.backward(): collnet's PeerLost, also torch's DistBackendError.
        assert error["class"] == "PeerLost" and error["peer"] == out["killed"][0], error
        assert error["dist_backend_error"] and error["collnet_error"], error
        assert error["after_kill_s"] <= out["failure_bound_s"], error
    assert out["peers_final"] == 2 and out["world_final"] == 2
    assert out["final_loss"] < 0.5 * out["initial_loss"], out


def test_two_trainers_per_daemon_train_reform_after_a_node_is_killed() -> None:
    # Ranks 0-1 on the first node, 2-3 on the second, 4-5 on the killed third.
    out = _run("--peers", "3", "--local-size", "2", "--kill", "1")
    assert out["ok"] and out["params_equal"], out
    assert out["local_size"] == 2 and len(out["killed"]) == 1 and out["reformed"] == 4, out
    assert set(out["errors"]) == {f"trainer{i}" for i in range(4)}, out
    for error in out["errors"].values():
        assert error["class"] == "PeerLost" and error["peer"] == out["killed"][0], error
        assert error["dist_backend_error"] and error["after_kill_s"] <= out["failure_bound_s"]
    assert out["peers_final"] == 4 and out["world_final"] == 4
    assert out["final_loss"] < 0.5 * out["initial_loss"], out


def test_quantized_gradients_with_error_feedback_keep_the_replicas_bit_identical() -> None:
    # uint8 loses bits on the wire, but every rank decodes the same bytes.
    out = _run("--peers", "3", "--step-ms", "0", "--codec", "uint8", "--error-feedback")
    assert out["ok"] and out["params_equal"] and out["codec"] == "uint8", out
    assert out["final_loss"] < 0.5 * out["initial_loss"], out


def test_ddps_own_all_reduce_through_the_group_keeps_the_replicas_bit_identical() -> None:
    # No hook: DDP's reducer calls ProcessGroupCollnet.allreduce and waits on its futures.
    out = _run("--peers", "3", "--step-ms", "0", "--no-hook")
    assert out["ok"] and out["params_equal"], out
    assert out["final_loss"] < 0.5 * out["initial_loss"], out
