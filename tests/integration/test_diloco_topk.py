"""DiLoCo with top-k pseudo-gradients (error feedback) through the variable-size all-gather."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_harness import CALL_TIMEOUT_S, run_example_json, run_on_all, running_peers
from collnet_client import Comm
from collnet_client.sparse import TopK, chunked

torch = pytest.importorskip("torch")
from collnet_client.torch import DiLoCo, TopKConfig  # noqa: E402
from test_sdk_diloco import EXAMPLE, _loss, _model  # noqa: E402

pytestmark = pytest.mark.timeout(240)


# (config, values kept per part): float32 pairs with one chunk per tensor, and 4-bit
# values in chunks of 4 with a decayed error feedback.
CONFIGS = {
    "fp32": (TopKConfig(density=0.25), sum(-(-n // 4) for n in (12, 3, 3, 1))),
    "4bit-chunked": (TopKConfig(density=0.25, decay=0.9, bits=4, chunk=4), 6),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_topk_rounds_apply_nesterov_to_the_mean_of_every_peers_sparse_part(
    tmp_path: Path, name: str
) -> None:
    config, kept = CONFIGS[name]
    torch.set_num_threads(1)
    lr, mu, rounds, inner = 0.7, 0.9, 3, 2
    models = [_model() for _ in range(3)]  # torch's seed is global: not in the threads

    def one(rank: int, comm: Comm) -> tuple[list[np.ndarray], list[str], np.ndarray, int]:
        model = models[rank]
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        d = DiLoCo(
            comm, model, opt, inner_steps=inner, outer_lr=lr, outer_momentum=mu,
            compression="topk", topk=config, timeout_s=CALL_TIMEOUT_S,
        )  # fmt: skip
        sent: list[np.ndarray] = []
        gather = comm.all_gather_v_async

        def recording(part: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            sent.append(part.copy())
            return gather(part, *args, **kwargs)

        comm.all_gather_v_async = recording  # type: ignore[method-assign]
        d.start()
        gen = torch.Generator().manual_seed(rank)
        hashes = []
        while d.round < rounds:
            loss = _loss(model, gen)
            opt.zero_grad()
            loss.backward()
            out = d.step()
            if out is not None:
                assert out.reduced and out.error is None and out.in_parity, out
                hashes.append(out.hash)
        return sent, hashes, d.global_weights.copy(), comm.rank

    with running_peers(3, tmp_path) as p:
        results = run_on_all(p.comms, one)
    assert results[0][1] == results[1][1] == results[2][1], "peers differ after a round"
    g = torch.nn.utils.parameters_to_vector(_model().parameters()).detach().numpy().copy()
    n = g.size
    # 25% of each chunk (rounded up), decoded the way every peer decodes them.
    sizes = [q.numel() for q in _model().parameters()]
    sel = TopK(chunked(sizes, config.chunk), config.density, config.decay, config.bits)
    assert sel.kept == kept
    by_rank = sorted(results, key=lambda r: r[3])
    m = np.zeros_like(g)
    for r in range(rounds):
        dense = np.zeros(n, np.float32)
        for sent, *_ in by_rank:
            assert sent[r].nbytes == sel.part_nbytes
            idx, vals = sel.decode(sent[r])
            assert idx.size == kept
            dense[idx] += vals
        avg = dense / np.float32(3)
        m = np.float32(mu) * m + avg
        g = g - np.float32(lr) * (avg + np.float32(mu) * m)
    for _, _, weights, _ in results:
        np.testing.assert_allclose(weights, g, rtol=1e-5, atol=1e-6)


def test_example_topk_one_percent_is_within_a_fifth_of_dense_for_30x_fewer_bytes() -> None:
    common = ("--peers", "3", "--step-ms", "0")
    dense = run_example_json(EXAMPLE, *common)
    sparse = run_example_json(EXAMPLE, *common, "--compression", "topk", "--density", "0.01",
                          "--loss-threshold", "100")  # fmt: skip
    assert sparse["ok"] and sparse["hashes_equal"] and sparse["compression"] == "topk", sparse
    assert sparse["final_loss"] < 0.1 * sparse["initial_loss"], sparse
    assert dense["bytes_sent"] >= 30 * sparse["bytes_sent"] > 0, (sparse, dense)
    # The bar: within 20% of uncompressed on the example (1.03x at 2026-12-03).
    assert sparse["final_loss"] <= 1.2 * dense["final_loss"], (sparse, dense)
