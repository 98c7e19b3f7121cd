"""A numpy stand-in for examples/diloco_train.py (same flags, same progress JSON).

Only for bringing up the container plumbing while the real example is not in
the tree: select it with COLLNET_TRAINER=/opt/collnet-examples/standin_train.py.
Each outer step: update_topology, sync_state (a joiner takes the shared
parameters), H local "inner steps" of noisy decay, an all-reduce (avg) of the
pseudo-gradient, apply, print one JSON line. PeerLost/Timeout/aborted
collectives are retried at the next outer step; a daemon that is gone ends the
trainer with exit code 1 and the typed error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import collnet_client
import numpy as np
from collnet_client import CollnetError, DaemonUnavailable


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--peer-name", default="")
    ap.add_argument("--outer-steps", type=int, default=20)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=1 << 16)
    ap.add_argument("--progress-json", action="store_true")
    args = ap.parse_args()

    def emit(**fields: object) -> None:
        if args.progress_json:
            print(json.dumps(fields), flush=True)

    try:
        comm = collnet_client.connect(args.daemon, timeout_s=120.0)
    except CollnetError as exc:
        print(f"trainer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    params = comm.zeros(args.size, np.float32)
    params[:] = np.random.default_rng(0).standard_normal(args.size, dtype=np.float32)
    rng = np.random.default_rng(abs(hash(comm.peer_id)) % (1 << 32))
    delta = comm.empty(args.size, np.float32)
    revision = 0
    try:
        while revision < args.outer_steps:
            try:
                world = comm.update_topology(timeout_s=120.0)
                revision = comm.sync_state({"params": params}, revision, timeout_s=120.0).revision
                if revision >= args.outer_steps:
                    break
                start = params.copy()
                for _ in range(args.inner_steps):
                    params *= np.float32(0.999)
                    params += rng.standard_normal(args.size, dtype=np.float32) * np.float32(1e-3)
                    time.sleep(0.02)
                np.subtract(start, params, out=delta)
                comm.all_reduce(delta, op="avg", timeout_s=120.0)
                np.subtract(start, delta, out=params)
                revision += 1
            except DaemonUnavailable:
                raise
            except CollnetError as exc:
                print(f"trainer: retrying outer step: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            emit(
                event="outer_step",
                peer=comm.peer_id,
                step=revision,
                epoch=comm.epoch,
                revision=revision,
                hash=hashlib.blake2b(params.tobytes(), digest_size=16).hexdigest(),
                loss=float(np.square(params).mean()),
                world=world.size,
            )
    except CollnetError as exc:
        print(f"trainer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    emit(event="done", peer=comm.peer_id, revision=revision)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
