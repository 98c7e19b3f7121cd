"""Top-k DiLoCo on the example's problem, replayed in one process: settings and limits.

``examples/diloco_train.py`` (3 peers, 20 outer x 20 inner steps, AdamW
lr 3e-3) in one process with no daemons: each peer trains its own data, its
pseudo-gradient goes through the SDK's own ``collnet_client.sparse.TopK``
(selection, decayed error feedback, quantized values, the part's encoding),
and the parts are averaged in rank order (``TopK.average``), as the
all-gather's receivers do. It reproduces the cluster run's final loss to the
bit, in seconds, so a grid of settings is cheap:

    python bench/diloco_topk_replay.py                          # the example's top-k defaults
    python bench/diloco_topk_replay.py --grid --json            # outer lr x decay
    python bench/diloco_topk_replay.py --compression none       # dense, Nesterov 0.7 / 0.9

``--oracle K`` is a bound, not a method: the peers' dense mean
pseudo-gradient, error feedback on it, and its K largest values applied
(what top-k could do if every peer's values were pooled before selecting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "clients")]

import diloco_train as example  # noqa: E402
import torch  # noqa: E402
from collnet_client.sparse import TopK, chunked  # noqa: E402

F32 = npt.NDArray[np.float32]


def _flat(model: torch.nn.Module) -> F32:
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    out: F32 = vec.numpy().copy()
    return out


class Outer:
    """SGD, or Nesterov SGD with torch's update order, over the flat global weights."""

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr, self.mu = np.float32(lr), np.float32(momentum)
        self.buf: F32 | None = None

    def step(self, weights: F32, grad: F32) -> F32:
        if self.mu == 0:
            out: F32 = weights - self.lr * grad
            return out
        last = np.zeros_like(grad) if self.buf is None else self.buf
        # torch's first step starts the buffer at the gradient: 0 * mu + grad.
        self.buf = (self.mu * last + grad).astype(np.float32)
        out = weights - self.lr * (grad + self.mu * self.buf)
        return out


def replay(args: argparse.Namespace, lr: float, decay: float) -> dict[str, Any]:
    torch.set_num_threads(1)
    names = [f"trainer{i}" for i in range(args.peers)]
    problems = [example.Problem(n, args.hidden) for n in names]
    models = [example.build_model(args.hidden) for _ in names]
    inner = [torch.optim.AdamW(m.parameters(), lr=args.inner_lr, weight_decay=0.0) for m in models]
    weights = _flat(models[0])
    sizes = [p.numel() for p in models[0].parameters()]
    select = TopK(chunked(sizes, args.chunk), args.density, decay, args.bits)
    residuals = [np.zeros(weights.size, np.float32) for _ in names]
    pooled = np.zeros(weights.size, np.float32)
    dense = args.compression == "none"
    outer = Outer(lr, args.outer_momentum if dense else args.topk_momentum)
    curve = []
    for _ in range(args.outer_steps):
        grads = []
        for problem, model, opt in zip(problems, models, inner, strict=True):
            for _ in range(args.inner_steps):
                x, y = problem.batch()
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            grads.append(weights - _flat(model))
        avg = np.zeros(weights.size, np.float32)
        if dense:
            for g in grads:
                avg += g
            avg /= np.float32(len(grads))
        elif args.oracle:
            mean = np.mean(grads, axis=0).astype(np.float32)
            acc = mean + np.float32(decay) * pooled
            keep = np.argpartition(np.abs(acc), acc.size - args.oracle)[acc.size - args.oracle :]
            avg[keep] = acc[keep]
            pooled = acc - avg
        else:
            parts = [select.encode(g, r) for g, r in zip(grads, residuals, strict=True)]
            select.average(parts, avg)
        weights = outer.step(weights, avg).astype(np.float32)
        for model in models:  # every peer restarts from the new global weights
            new = torch.from_numpy(weights.copy())
            torch.nn.utils.vector_to_parameters(new, model.parameters())
        curve.append(problems[0].eval_loss(weights))
    return {"outer_lr": lr, "decay": decay, "final_loss": curve[-1], "curve": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compression", choices=["topk", "none"], default="topk")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--outer-steps", type=int, default=20)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--inner-lr", type=float, default=3e-3)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=example.HIDDEN, help="The MLP's width.")
    ap.add_argument("--ef-decay", type=float, default=0.7)
    ap.add_argument("--value-bits", dest="bits", type=int, default=4, choices=[2, 4, 8, 32])
    ap.add_argument("--topk-chunk", dest="chunk", type=int, default=4096)
    ap.add_argument("--outer-lr", type=float, default=None, help="topk 4.0 (SGD), none 0.7")
    ap.add_argument("--outer-momentum", type=float, default=0.9, help="none: Nesterov's.")
    ap.add_argument("--topk-momentum", type=float, default=0.0, help="topk: Nesterov's, 0: SGD.")
    ap.add_argument("--oracle", type=int, default=0, help="K: pooled top-K bound (see above).")
    ap.add_argument("--grid", action="store_true", help="Outer lr 1..6 x decay 0.7..1.")
    ap.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = ap.parse_args(argv)
    lr = args.outer_lr
    if lr is None:
        lr = 0.7 if args.compression == "none" else 4.0
    points = (
        [(g, d) for g in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0) for d in (0.7, 0.8, 0.9, 1.0)]
        if args.grid
        else [(lr, args.ef_decay)]
    )
    results = [replay(args, g, d) for g, d in points]
    if args.json:
        print(json.dumps({"settings": vars(args), "results": results}))
    else:
        print("| outer lr | decay | final loss |\n|---|---|---|")
        for r in results:
            decay = "-" if args.compression == "none" else r["decay"]
            print(f"| {r['outer_lr']} | {decay} | {r['final_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
