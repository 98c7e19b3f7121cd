"""The lab's commands of the ``collnet`` CLI: ``collnet up`` and ``collnet chaos``.

They are subcommands of ``collnet_daemon.cli.main``, which loads this module
by name only when one of them is run or the command list is shown, so the
daemon never imports the lab. Like the daemon's own commands they read the
group's ``--log-level`` / ``--log-json`` from ``ctx.obj``. The heavy imports
(numpy, the SDK) stay inside the commands, so ``collnet --help`` stays fast.
"""

from __future__ import annotations

import sys

import click
from collnet_daemon.logs import setup_logging


def _lab_logging(ctx: click.Context, role: str) -> None:
    """The lab prints its own report: the default level "info" becomes "warning"."""
    setup_logging(
        "warning" if ctx.obj["log_level"] == "info" else ctx.obj["log_level"],
        ctx.obj["log_json"],
        role,
    )


@click.command()
@click.option("--peers", default=4, show_default=True, type=click.IntRange(1, 16))
@click.option("--size", default="32MiB", show_default=True, help="Tensor size per codec.")
@click.option("--codecs", default="none,fp16,bf16,uint8,uint4", show_default=True)
@click.option("--iters", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--connections", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--algo",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "ring", "star", "direct"]),
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def up(
    ctx: click.Context,
    peers: int,
    size: str,
    codecs: str,
    iters: int,
    connections: int,
    algo: str,
    as_json: bool,
) -> None:
    """Start a local cluster, all-reduce a tensor in every codec, check it, stop."""
    from collnet_lab.localcluster import parse_size
    from collnet_lab.up import run_demo

    _lab_logging(ctx, "up")
    ok = run_demo(
        peers=peers,
        nbytes=parse_size(size),
        codecs=codecs.split(","),
        iters=iters,
        connections=connections,
        algo=algo,
        as_json=as_json,
    )
    sys.exit(0 if ok else 1)


@click.command()
@click.option("--peers", default=6, show_default=True, type=click.IntRange(2, 16))
@click.option("--duration", default="60s", show_default=True, help="e.g. 60s, 2m, 500ms")
@click.option("--seed", default=None, type=int, help="Seed of the chaos driver (default: random).")
@click.option(
    "--kill-every", default="3s", show_default=True, help="Mean interval between disturbances."
)
@click.option("--size", default="1MiB", show_default=True, help="Tensor size per all-reduce.")
@click.option(
    "--state-size", default="4MiB", show_default=True, help="Shared state synced every round."
)
@click.option("--connections", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--call-timeout", default="20s", show_default=True, help="Deadline of every call (a hang)."
)
@click.option(
    "--quantized/--no-quantized", default=True, show_default=True, help="Every 4th round in uint8."
)
@click.option("--keep-logs", is_flag=True, help="Keep the cluster's logs (kept anyway on failure).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def chaos(
    ctx: click.Context,
    peers: int,
    duration: str,
    seed: int | None,
    kill_every: str,
    size: str,
    state_size: str,
    connections: int,
    call_timeout: str,
    quantized: bool,
    keep_logs: bool,
    as_json: bool,
) -> None:
    """Checked all-reduces on a local cluster while peers are killed, frozen, added."""
    from collnet_lab import chaos as chaos_mod
    from collnet_lab.localcluster import parse_size

    _lab_logging(ctx, "chaos")
    try:
        cfg = chaos_mod.ChaosConfig(
            peers=peers,
            duration_s=chaos_mod.parse_duration(duration),
            seed=seed,
            kill_every_s=chaos_mod.parse_duration(kill_every),
            nbytes=parse_size(size),
            state_bytes=parse_size(state_size),
            connections=connections,
            call_timeout_s=chaos_mod.parse_duration(call_timeout),
            quantized=quantized,
            keep_logs=keep_logs,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if cfg.nbytes < 64 or cfg.nbytes % 4:
        raise click.BadParameter(f"--size must be a multiple of 4 bytes, at least 64 ({size})")
    if cfg.kill_every_s <= 0:
        raise click.BadParameter("--kill-every must be positive")
    sys.exit(chaos_mod.main(cfg, as_json))
