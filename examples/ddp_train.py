"""DistributedDataParallel over ``init_process_group("collnet")``: a small MLP on CPU.

Two modes:

* **launcher** (default): starts a local cluster (a coordinator and
  ``--peers`` daemons, ``collnet_lab.localcluster.LocalCluster``) and
  ``--local-size`` trainer processes per daemon (one per GPU on a real node;
  default 1), reads their JSON lines and checks the run: the loss fell, and
  the parameters were bit-identical on every rank after every step.
  ``--kill K`` SIGKILLs the last K peers (daemon and trainers) a third of
  the way in: every survivor's ``loss.backward()`` raises collnet's typed
  error (a ``PeerLost`` that is also a ``torch.distributed.DistBackendError``),
  which must come within ``--failure-bound-s`` of the kill; the survivors
  then re-form the group (``collnet_client.torch.reinit()``), wrap the model
  in a new DDP and train on to the end.
* **trainer** (``--daemon ADDRESS``): one rank. It joins with
  ``dist.init_process_group("collnet", init_method="collnet://?daemon=...",
  world_size=N)`` (N: wait for that many trainers; rank and size are the
  agreed world's; ``--local-size L --local-rank l`` add ``local_size`` and
  ``local_rank`` to the URL: rank ``node * L + l``), registers
  ``collnet_client.torch.hooks.collnet_hook`` (unless ``--no-hook``: DDP's
  own all-reduce through the group) and prints one JSON line per event:
  ``start``, ``step`` (``step``, ``generation``, ``loss``, ``hash`` of the
  parameters, ``world``), ``error`` (the exception's class, whether it is a
  ``DistBackendError`` and a ``CollnetError``, the lost peer), ``reformed``
  and ``done``.

The launcher's ``--json`` prints one object: ``ok``, ``params_equal``,
``initial_loss``, ``final_loss``, ``loss_fell``, ``peers_final`` (ranks that
finished),
``world_final``, ``killed``, ``errors`` (per survivor: class, both isinstance
checks, seconds from the kill to the error as the launcher saw it),
``errors_within_bound`` and ``wall_s``.

    python examples/ddp_train.py --peers 3 --json
    python examples/ddp_train.py --peers 3 --kill 1 --json
    python examples/ddp_train.py --peers 2 --local-size 2 --kill 1 --json
    python examples/ddp_train.py --codec uint8 --error-feedback
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

IN_DIM, HIDDEN, BATCH, EVAL_SAMPLES = 16, 64, 64, 1024


# -- trainer ----------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
    import collnet_client.torch as collnet_torch
    import torch
    import torch.distributed as dist
    from collnet_client import CollnetError
    from collnet_client.torch.hooks import CollnetHookState, collnet_hook
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # several trainers share a small machine

    def emit(event: dict[str, Any]) -> None:
        print(json.dumps(event), flush=True)

    # A fixed random network to imitate; each rank draws its own batches.
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(IN_DIM, 32, generator=g) / 4, torch.randn(32, 1, generator=g) / 6

    def teacher(x: Any) -> Any:
        return torch.tanh(x @ w1) @ w2 * 2

    eval_x = torch.randn(EVAL_SAMPLES, IN_DIM, generator=torch.Generator().manual_seed(99))
    eval_y = teacher(eval_x)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{args.daemon}/{args.local_rank}".encode()))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(eval_x), eval_y))

    def params_hash() -> str:
        h = hashlib.blake2b(digest_size=16)
        for p in model.parameters():
            h.update(p.detach().numpy().tobytes())
        return h.hexdigest()

    def wrap() -> tuple[Any, CollnetHookState]:
        # DDP's constructor broadcasts rank 0's parameters: after a failed step
        # (applied on some survivors only) every rank starts again from the same.
        ddp = DistributedDataParallel(model)
        state = CollnetHookState(codec=args.codec, error_feedback=args.error_feedback)
        if not args.no_hook:
            ddp.register_comm_hook(state, collnet_hook)
        return ddp, state

    def resync(step: int) -> int:
        """Rank 0's step counter and momentum: the rest of the state DDP does not sync."""
        counter = torch.tensor([step], dtype=torch.int64)
        dist.broadcast(counter, 0)
        for p in model.parameters():
            state = opt.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)  # what SGD's first step implies
            dist.broadcast(state["momentum_buffer"], 0)
        return int(counter[0])

    init_method = f"collnet://?daemon={quote(args.daemon, safe='')}"
    if args.local_size > 1:
        init_method += f"&local_size={args.local_size}&local_rank={args.local_rank}"
    timeout = timedelta(seconds=args.timeout_s)
    dist.init_process_group(
        "collnet", init_method=init_method, world_size=args.min_peers, timeout=timeout
    )
    ddp, hook_state = wrap()
    generation = 0
    emit({"event": "start", "rank": dist.get_rank(), "world": dist.get_world_size(),
          "loss": eval_loss(), "hash": params_hash()})  # fmt: skip
    step = 0
    while step < args.steps:
        x = torch.randn(BATCH, IN_DIM, generator=gen)
        loss = torch.nn.functional.mse_loss(ddp(x), teacher(x))
        opt.zero_grad()
        try:
            loss.backward()  # type: ignore[no-untyped-call]
        except CollnetError as exc:
            emit({"event": "error", "step": step, "class": type(exc).__name__,
                  "dist_backend_error": isinstance(exc, dist.DistBackendError),
                  "collnet_error": isinstance(exc, CollnetError), "peer": exc.fields.get("peer"),
                  "message": exc.message})  # fmt: skip
            # The old DDP's autograd hooks must be gone before a new one wraps the model.
            del ddp, hook_state, loss
            gc.collect()
            collnet_torch.reinit()
            generation += 1
            ddp, hook_state = wrap()
            step = resync(step)
            emit({"event": "reformed", "step": step, "rank": dist.get_rank(),
                  "world": dist.get_world_size(), "hash": params_hash()})  # fmt: skip
            continue
        opt.step()
        step += 1
        emit({"event": "step", "step": step, "generation": generation, "loss": eval_loss(),
              "hash": params_hash(), "world": dist.get_world_size()})  # fmt: skip
        if args.step_ms:
            time.sleep(args.step_ms / 1000)  # a real model's compute, so a kill lands mid-run
    emit({"event": "done", "step": step, "world": dist.get_world_size(), "loss": eval_loss(),
          "hash": params_hash(), "generation": generation})  # fmt: skip
    dist.destroy_process_group()
    return 0


# -- launcher ---------------------------------------------------------------------


class Trainer:
    """One trainer process; a thread puts its JSON lines on the shared queue."""

    def __init__(self, index: int, ipc: str, argv: list[str], events: queue.Queue[Any]) -> None:
        self.index = index
        self.killed = False
        self.stderr_path = Path(ipc.removeprefix("ipc://") + f".trainer{index}.err")
        with self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--daemon", ipc, *argv],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        self._reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._reader.start()

    def _read(self, events: queue.Queue[Any]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                events.put((self.index, time.monotonic(), json.loads(line)))
            except json.JSONDecodeError:
                continue
        events.put((self.index, time.monotonic(), None))

    def finish(self, timeout_s: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(5)
        return rc, self.stderr_path.read_text(errors="replace")[-2000:]


def launch(args: argparse.Namespace) -> int:
    from collnet_lab.localcluster import LocalCluster

    local = args.local_size
    argv = ["--min-peers", str(args.peers * local), "--local-size", str(local),
            "--steps", str(args.steps), "--lr", str(args.lr), "--codec", args.codec,
            "--timeout-s", str(args.timeout_s), "--step-ms", str(args.step_ms)]  # fmt: skip
    argv += ["--error-feedback"] if args.error_feedback else []
    argv += ["--no-hook"] if args.no_hook else []
    kill_at = max(1, args.steps // 3)
    events: queue.Queue[tuple[int, float, dict[str, Any] | None]] = queue.Queue()
    hashes: dict[tuple[int, int], set[str]] = defaultdict(set)
    losses: dict[int, float] = {}
    done: dict[int, dict[str, Any]] = {}
    errors: dict[int, dict[str, Any]] = {}
    reformed: dict[int, dict[str, Any]] = {}
    initial: dict[int, dict[str, Any]] = {}
    killed: list[str] = []
    killed_at: float | None = None
    started = time.monotonic()
    deadline = started + args.run_timeout_s
    cluster = LocalCluster(peers=args.peers, connections=2)
    trainers: list[Trainer] = []
    try:
        cluster.start()
        trainers = [
            Trainer(i * local + k, d.ipc, [*argv, "--local-rank", str(k)], events)
            for i, d in enumerate(cluster.daemons)
            for k in range(local)
        ]
        open_streams = len(trainers)
        while open_streams and time.monotonic() < deadline:
            try:
                index, seen, event = events.get(timeout=1.0)
            except queue.Empty:
                continue
            if event is None:
                open_streams -= 1
                continue
            if not args.json:
                print(f"trainer{index}: {json.dumps(event)}", flush=True)
            kind = event["event"]
            if kind == "start":
                initial[index] = event
            elif kind == "step":
                hashes[(event["generation"], event["step"])].add(event["hash"])
                losses[event["step"]] = event["loss"]
                if args.kill and not killed and event["step"] >= kill_at:
                    for victim in range(args.peers - args.kill, args.peers):
                        for trainer in trainers[victim * local : (victim + 1) * local]:
                            trainer.proc.send_signal(signal.SIGKILL)
                            trainer.killed = True
                        cluster.kill(cluster.daemons[victim], signal.SIGKILL)
                        killed.append(cluster.daemons[victim].peer_id)
                    killed_at = time.monotonic()
            elif kind == "error" and index not in errors:
                after = None if killed_at is None else round(seen - killed_at, 3)
                errors[index] = {**event, "after_kill_s": after}
            elif kind == "reformed":
                reformed[index] = event
            elif kind == "done":
                done[index] = event
        outcomes = {t.index: t.finish(max(1.0, deadline - time.monotonic())) for t in trainers}
    finally:
        cluster.stop()
    survivors = [t.index for t in trainers if not t.killed]
    failed = {f"trainer{i}": outcomes[i] for i in survivors if outcomes[i][0] != 0}
    finals = {e["hash"] for e in done.values()}
    params_equal = bool(done) and len(finals) == 1 and all(len(h) == 1 for h in hashes.values())
    # The re-formed groups start from rank 0's parameters: identical there too.
    params_equal &= len({e["hash"] for e in reformed.values()}) <= 1
    initial_loss = next(iter(initial.values()), {}).get("loss", float("nan"))
    final_loss = next(iter(done.values()), {}).get("loss", float("nan"))
    within = all(
        e["after_kill_s"] is not None and e["after_kill_s"] <= args.failure_bound_s
        for e in errors.values()
    )
    typed = all(e["dist_backend_error"] and e["collnet_error"] for e in errors.values())
    world_final = next(iter(done.values()), {}).get("world")
    result = {
        "ok": False,
        "params_equal": params_equal,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "loss_fell": final_loss < initial_loss * args.loss_ratio,
        "losses": [round(losses[s], 5) for s in sorted(losses)],
        "peers": args.peers,
        "local_size": local,
        "peers_final": len(done),
        "world_final": world_final,
        "steps": args.steps,
        "codec": args.codec,
        "killed": killed,
        "killed_at_step": kill_at if killed else None,
        "errors": {f"trainer{i}": e for i, e in sorted(errors.items())},
        "errors_typed": typed,
        "failure_bound_s": args.failure_bound_s,
        "errors_within_bound": within,
        "reformed": len(reformed),
        "failed_trainers": failed,
        "wall_s": round(time.monotonic() - started, 2),
    }
    expected = (args.peers - args.kill) * local
    result["ok"] = bool(
        params_equal
        and result["loss_fell"]
        and not failed
        and len(done) == expected
        and world_final == expected
        and (not args.kill or (len(errors) == expected and typed and within))
    )
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"\nDDP over collnet: {args.peers} peers (killed {len(killed)}), {args.steps} steps: "
            f"loss {initial_loss:.4f} -> {final_loss:.4f}, parameters equal after every step: "
            f"{params_equal}, typed errors within {args.failure_bound_s}s: "
            f"{len(errors)}/{expected if args.kill else 0}, peers at the end: {len(done)} -> "
            f"{'OK' if result['ok'] else 'FAILED'}"
        )
        for name, (rc, err) in failed.items():
            print(f"{name} exited {rc}: {err}", file=sys.stderr)
    return 0 if result["ok"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--daemon", default=None, help="Trainer: attach to this daemon.")
    ap.add_argument("--peers", type=int, default=3, help="Launcher: daemons to start.")
    ap.add_argument("--kill", type=int, default=0, help="Launcher: peers to SIGKILL mid-run.")
    ap.add_argument(
        "--local-size", type=int, default=1, help="Trainers per daemon (launcher and trainer)."
    )
    ap.add_argument("--local-rank", type=int, default=0, help="Trainer: its place on its node.")
    ap.add_argument("--min-peers", type=int, default=1, help="Trainer: world_size to wait for.")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--codec", default="none", help="Codec of the gradient all-reduce.")
    ap.add_argument("--error-feedback", action="store_true", help="With a lossy --codec.")
    ap.add_argument(
        "--no-hook",
        action="store_true",
        help="DDP's own all-reduce (through ProcessGroupCollnet.allreduce), no codec; a "
        "failure then reaches backward() as torch's untyped RuntimeError.",
    )
    ap.add_argument("--timeout-s", type=float, default=60.0, help="Per collective.")
    ap.add_argument("--step-ms", type=float, default=20.0, help="Simulated compute per step.")
    ap.add_argument(
        "--failure-bound-s",
        type=float,
        default=10.0,
        help="Launcher: the longest a survivor may take to get the typed error after a kill "
        "(the daemons' heartbeat ceiling).",
    )
    ap.add_argument(
        "--loss-ratio", type=float, default=0.5, help="Launcher: final/initial loss to reach."
    )
    ap.add_argument("--run-timeout-s", type=float, default=300.0, help="Launcher: whole run.")
    ap.add_argument("--json", action="store_true", help="Launcher: one JSON object at the end.")
    args = ap.parse_args(argv)
    if args.daemon is None and not 0 <= args.kill < args.peers:
        ap.error("--kill must leave at least one of the --peers running")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return train(args) if args.daemon else launch(args)


if __name__ == "__main__":
    sys.exit(main())
