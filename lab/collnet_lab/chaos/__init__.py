"""``collnet chaos``: real daemons doing checked all-reduces while a driver kills them.

A ``LocalCluster`` (a coordinator and N daemon processes on loopback) and one
trainer per daemon, each a thread of this process with its own ``Comm``. A
trainer loops over rounds:

1. ``update_topology()``: the barrier among the active members that also
   admits pending joiners; it returns the world of the round.
2. ``sync_state()`` of the trainer's shared state (a few tensors in shared
   memory at a revision): a joiner or a restarted peer starts from zeros at
   revision 0, a member whose last round failed is one revision behind, and
   both must fetch the newest state from the holders. Checked: the sync says
   every member is in parity, the bytes the trainer now holds hash to the
   digest it reported, and every member of the round reports the same digest;
3. an all-reduce of a tensor that depends only on (the trainer's peer id, the
   epoch, the round number in that epoch), so the numpy reference over exactly
   the peers of that world can be computed anywhere;
4. checks: the result equals the reference (exactly for the integer-valued
   half, within a float32 bound for the rest, within the quantization bound in
   uint8 rounds), and every participant of the round got the same bytes; then
   the state moves to the next revision by a deterministic function of the
   (bit-identical) result, as an outer optimizer step would.

A round is named by ``(epoch, k)``: ``k`` counts the rounds a trainer started
in that epoch and restarts at 0 in a new one. Every member of an epoch runs
the same rounds in it, so ``k`` is also the collective's tag.

A driver thread disturbs the cluster every ``kill_every_s`` (jittered by the
seeded RNG): ``kill -9`` a daemon, freeze one with ``SIGSTOP`` (and a few
seconds later ``SIGKILL`` or ``SIGCONT`` it), start a new daemon, or restart a
killed one under its old peer id. At least ``min_live`` daemons stay
untouched.

Bookkeeping: collectives completed; typed failures with the time from the
disturbance that caused them (``max_detect_s``: kill -9; ``max_detect_freeze_s``:
SIGSTOP); divergent results (must be 0); hangs (a call that ran into its
timeout; must be 0); stalls (must be 0): a call of an undisturbed trainer that
took longer than ``stall_s``, or a split barrier (a member waits in
``update_topology`` for peers that already run the round's all-reduce and wait
for it), which the next membership change would otherwise end before any
timeout; any other exception is a bug. At the end the trainers
agree to stop through the all-reduce itself (element 0 carries a stop vote,
so everyone who completes a round sees the same decision), leave gracefully,
and the cluster is stopped.

Modules: ``config`` (ChaosConfig, the detection bounds), ``rounds`` (each
round's inputs, the numpy reference and the check of a result), ``recorder``
(the bookkeeping and blame), ``trainer`` (the trainer threads), ``driver``
(ChaosRun: the cluster, the disturbances, the split-barrier monitor) and
``summary`` (the summary's keys and the table).
"""

from __future__ import annotations

import json
from typing import Any

from collnet_lab.chaos.config import (
    FREEZE_DETECT_BOUND_S,
    KILL_DETECT_BOUND_S,
    ChaosConfig,
    parse_duration,
)
from collnet_lab.chaos.driver import ChaosRun
from collnet_lab.chaos.rounds import check_result, peer_input
from collnet_lab.chaos.summary import print_table


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """Run one chaos experiment; its summary (``summary["ok"]``: every invariant held)."""
    return ChaosRun(cfg).run()


def main(cfg: ChaosConfig, as_json: bool) -> int:
    """Run, print the summary (a table, or one JSON object); the exit status."""
    summary = run_chaos(cfg)
    if as_json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return 0 if summary["ok"] else 1


__all__ = [
    "FREEZE_DETECT_BOUND_S",
    "KILL_DETECT_BOUND_S",
    "ChaosConfig",
    "ChaosRun",
    "check_result",
    "main",
    "parse_duration",
    "peer_input",
    "print_table",
    "run_chaos",
]
