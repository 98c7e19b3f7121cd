"""DiLoCo checkpoints: a whole world stopped mid-run and resumed by a fresh one.

A run of N syncs, and the same run checkpointed after k syncs (``torch.save``),
every daemon stopped, a new cluster started, every trainer restored
(``load_state_dict`` of DiLoCo, model, inner optimizer and data position)
and run to N: the final parameters are bit-identical. Two peers, so that the
all-reduce's sum does not depend on the order a new ring takes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_harness import CALL_TIMEOUT_S, run_example_json, run_on_all, running_peers
from collnet_client import Comm

torch = pytest.importorskip("torch")
from collnet_client.torch import DiLoCo, TopKConfig  # noqa: E402
from test_sdk_diloco import EXAMPLE, _loss, _model  # noqa: E402

pytestmark = pytest.mark.timeout(240)

MODES = {
    "blocking-nesterov": {"inner_steps": 3},
    "streaming-adam-uint8": {
        "inner_steps": 4,
        "streaming": True,
        "fragments": 2,
        "overlap": 1,
        "codec": "uint8",
        "error_feedback": True,
        "outer_optimizer": lambda ps: torch.optim.Adam(ps, lr=0.05),
    },
    # The top-k residuals (per peer) must come back too, or the parts sent differ.
    "streaming-topk-4bit": {
        "inner_steps": 4,
        "streaming": True,
        "fragments": 2,
        "overlap": 1,
        "compression": "topk",
        "topk": TopKConfig(density=0.25, decay=0.9, bits=4, chunk=4),
    },
}


def _run(
    tmp_path: Path, mode: str, syncs: int, saved: list[bytes] | None, stop_at: int | None
) -> list[Any]:
    torch.set_num_threads(1)
    models = [_model() for _ in range(2)]  # torch's seed is global: not in the threads

    def one(rank: int, comm: Comm) -> Any:
        model = models[rank]
        inner = torch.optim.AdamW(model.parameters(), lr=0.02)
        d = DiLoCo(comm, model, inner, timeout_s=CALL_TIMEOUT_S, **MODES[mode])
        gen = torch.Generator().manual_seed(rank)
        if saved is not None:
            state = torch.load(io.BytesIO(saved[rank]), weights_only=False)
            model.load_state_dict(state["model"])
            inner.load_state_dict(state["inner"])
            gen.set_state(state["data"])
            d.load_state_dict(state["diloco"])
        first = d.start()
        assert not first.fetched and first.in_parity
        while d.round < syncs:
            loss = _loss(model, gen)
            inner.zero_grad()
            loss.backward()
            out = d.step()
            if out is not None and out.round == stop_at:
                buf = io.BytesIO()
                torch.save(
                    {"diloco": d.state_dict(), "model": model.state_dict(),
                     "inner": inner.state_dict(), "data": gen.get_state()},
                    buf,
                )  # fmt: skip
                return buf.getvalue()
        d.finish()
        params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
        return d.state_hash(), d.global_weights.copy(), params.copy(), d.revision

    with running_peers(2, tmp_path) as p:
        return run_on_all(p.comms, one)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_world_resumed_from_checkpoints_ends_bit_identical_to_an_uninterrupted_run(
    tmp_path: Path, mode: str
) -> None:
    syncs, k = 8, 3
    whole = _run(tmp_path / "whole", mode, syncs, None, None)
    saved = _run(tmp_path / "first", mode, syncs, None, k)
    assert all(isinstance(b, bytes) for b in saved)
    # The first world is gone (every daemon stopped); a new one takes over.
    resumed = _run(tmp_path / "second", mode, syncs, saved, None)
    for a, b in zip(whole, resumed, strict=True):
        assert a[0] == b[0] and a[3] == b[3]
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert whole[0][0] == whole[1][0]


def test_a_checkpoint_of_another_run_shape_is_refused(tmp_path: Path) -> None:
    with running_peers(1, tmp_path, admit=False) as p:
        model = _model()
        d = DiLoCo(p.comms[0], model, torch.optim.SGD(model.parameters(), lr=0.1), inner_steps=2)
        state = d.state_dict()
        other = DiLoCo(
            p.comms[0], model, torch.optim.SGD(model.parameters(), lr=0.1), inner_steps=3
        )
        with pytest.raises(ValueError, match="inner_steps"):
            other.load_state_dict(state)
        state["version"] = 99
        with pytest.raises(ValueError, match="version"):
            d.load_state_dict(state)


def test_example_streaming_checkpoint_resumed_by_a_fresh_world_is_bit_identical(
    tmp_path: Path,
) -> None:
    # A short run: what is checked is bit-identity, not how far the loss got.
    common = ("--peers", "2", "--step-ms", "0", "--streaming", "--fragments", "4",
              "--outer-steps", "4", "--inner-steps", "8", "--loss-threshold", "100")  # fmt: skip
    whole = run_example_json(EXAMPLE, *common)
    stopped = run_example_json(
        EXAMPLE, *common, "--checkpoint", str(tmp_path), "--checkpoint-at", "6"
    )
    assert stopped["checkpointed"] and stopped["ok"], stopped
    assert sorted(f.name for f in tmp_path.iterdir()) == ["trainer0.pt", "trainer1.pt"]
    resumed = run_example_json(EXAMPLE, *common, "--resume", str(tmp_path))
    assert whole["ok"] and resumed["ok"], (whole, resumed)
    assert resumed["final_hash"] == whole["final_hash"] and resumed["final_hashes_equal"]
    assert resumed["final_loss"] == whole["final_loss"]
    assert resumed["bytes_sent"] == whole["bytes_sent"]
