"""Streaming DiLoCo over real daemons: fragments on a staggered schedule, overlapped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_harness import CALL_TIMEOUT_S, run_example_json, run_on_all, running_peers
from collnet_client import Comm

torch = pytest.importorskip("torch")
from collnet_client.torch import DiLoCo  # noqa: E402
from collnet_client.torch.fragments import split  # noqa: E402
from test_sdk_diloco import EXAMPLE, _loss, _model  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def test_each_fragment_gets_the_outer_step_of_the_peers_average_in_its_turn(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    lr, mu, inner, fragments, rounds = 0.7, 0.9, 4, 2, 3
    models = [_model() for _ in range(2)]  # torch's seed is global: not in the threads

    def one(rank: int, comm: Comm) -> tuple[list[tuple[int, np.ndarray]], list[Any], np.ndarray]:
        model = models[rank]
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        d = DiLoCo(
            comm, model, opt, inner_steps=inner, outer_lr=lr, outer_momentum=mu,
            streaming=True, fragments=fragments, timeout_s=CALL_TIMEOUT_S,
        )  # fmt: skip
        sent: list[tuple[int, np.ndarray]] = []
        start = d.exchanger.start

        def recording(buffer: np.ndarray, fragment: int, *args: Any) -> Any:
            sent.append((fragment, buffer.copy()))  # before the all-reduce overwrites it
            return start(buffer, fragment, *args)

        d.exchanger.start = recording  # type: ignore[method-assign]
        d.start()
        gen = torch.Generator().manual_seed(rank)
        syncs = []
        while d.round < rounds * fragments:
            loss = _loss(model, gen)
            opt.zero_grad()
            loss.backward()
            out = d.step()
            if out is not None:
                syncs.append((out.fragment, out.hash, out.in_parity, d.inner_step))
        last = d.finish()
        syncs.append((last.fragment, last.hash, last.in_parity, d.inner_step))
        return sent, syncs, d.global_weights.copy()

    with running_peers(2, tmp_path) as p:
        (sent0, syncs0, g0), (sent1, syncs1, g1) = run_on_all(p.comms, one)
    assert syncs0 == syncs1, "peers' global weights differ after a sync"
    assert all(parity for _, _, parity, _ in syncs0)
    # One sync every inner_steps / fragments steps, the fragments in turn.
    assert [(f, step) for f, _, _, step in syncs0[:-1]] == [(k % 2, 2 * (k + 1)) for k in range(6)]
    assert np.array_equal(g0, g1)
    # The reference: per fragment, Nesterov on the average of what the peers sent.
    bounds = split([q.numel() for q in _model().parameters()], fragments)
    g = torch.nn.utils.parameters_to_vector(_model().parameters()).detach().numpy().copy()
    m = np.zeros_like(g)
    assert [f for f, _ in sent0] == [f for f, _ in sent1] == [k % 2 for k in range(6)]
    for (f, a), (_, b) in zip(sent0, sent1, strict=True):
        s = slice(bounds[f].start, bounds[f].stop)
        avg = (a + b) / np.float32(2)
        m[s] = np.float32(mu) * m[s] + avg
        g[s] = g[s] - np.float32(lr) * (avg + np.float32(mu) * m[s])
    np.testing.assert_allclose(g0, g, rtol=1e-5, atol=1e-6)


def test_example_streaming_with_four_fragments_converges_like_blocking_for_no_more_bytes() -> None:
    common = ("--peers", "3", "--step-ms", "0")
    blocking = run_example_json(EXAMPLE, *common)
    streaming = run_example_json(EXAMPLE, *common, "--streaming", "--fragments", "4")
    for out in (blocking, streaming):
        assert out["ok"] and out["hashes_equal"] and out["peers_final"] == 3, out
    assert streaming["fragments"] == 4 and streaming["streaming"]
    assert streaming["final_loss"] <= 1.10 * blocking["final_loss"], (streaming, blocking)
    assert 0 < streaming["bytes_per_step"] <= blocking["bytes_per_step"], (streaming, blocking)
