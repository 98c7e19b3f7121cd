"""DiLoCo's loss against the bytes it sends: no compression, uint8, uint4 and top-k.

Runs ``examples/diloco_train.py`` (3 peers on a local cluster, the example's
MLP) once per mode with the same data and schedule, and records each run's
final eval loss, the bytes one peer sent (the example's ``bytes_sent``:
ring-modelled wire bytes, see ``collnet_client/torch/exchange.py``) and the
loss after every sync. Prints a table with ratios against the uncompressed
run, and with ``--plot`` draws loss against bytes (``docs/diloco_compression.png``).

    python bench/diloco_compression.py --plot docs/diloco_compression.png
    python bench/diloco_compression.py --json   # one JSON object
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diloco_train.py"

# (label, example flags): quantized modes with the SDK's error feedback, as top-k has its own.
MODES = [
    ("none", ["--compression", "none"]),
    ("uint8", ["--compression", "uint8", "--error-feedback"]),
    ("uint4", ["--compression", "uint4", "--error-feedback"]),
    ("topk 1%", ["--compression", "topk", "--density", "0.01"]),
]


def run(flags: list[str], common: list[str], timeout_s: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--json", *common, *flags],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"example failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        curve = r["curve"]
        ax.plot([c[2] for c in curve], [c[1] for c in curve], marker=".", label=r["mode"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes sent by one peer (ring-modelled, cumulative)")
    ax.set_ylabel("eval loss (MSE) of the global weights")
    ax.set_title("DiLoCo, 3 peers: loss against bytes sent")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--outer-steps", type=int, default=20)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--plot", type=Path, default=None, help="Write the figure here.")
    ap.add_argument("--json", action="store_true", help="Print one JSON object.")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="Per run.")
    args = ap.parse_args(argv)
    common = ["--peers", str(args.peers), "--outer-steps", str(args.outer_steps),
              "--inner-steps", str(args.inner_steps), "--step-ms", "0"]  # fmt: skip
    results = []
    for label, flags in MODES:
        out = run(flags, common, args.timeout_s)
        results.append({"mode": label, "flags": flags, "ok": out["ok"],
                        "hashes_equal": out["hashes_equal"], "final_loss": out["final_loss"],
                        "bytes_sent": out["bytes_sent"], "bytes_per_step": out["bytes_per_step"],
                        "curve": out["curve"]})  # fmt: skip
    base = results[0]
    for r in results:
        r["loss_vs_none"] = r["final_loss"] / base["final_loss"]
        r["bytes_reduction"] = base["bytes_sent"] / max(r["bytes_sent"], 1)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps({"peers": args.peers, "outer_steps": args.outer_steps,
                          "inner_steps": args.inner_steps, "results": results}))  # fmt: skip
    else:
        print(f"DiLoCo, {args.peers} peers, {args.outer_steps} x {args.inner_steps} steps")
        print("| mode | final loss | vs none | bytes sent / peer | fewer bytes | hashes equal |")
        print("|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['mode']} | {r['final_loss']:.4f} | {r['loss_vs_none']:.2f}x | "
                  f"{r['bytes_sent']:,.0f} | {r['bytes_reduction']:.1f}x | "
                  f"{r['hashes_equal']} |")  # fmt: skip
    return 0 if all(r["ok"] or r["hashes_equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
