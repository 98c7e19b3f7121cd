"""The ``collnet`` command: coordinator, daemon, status, and the lab's commands.

``coordinator``, ``daemon`` and ``status`` live here. ``up`` and ``chaos``
belong to the lab (``collnet_lab.cli``), which drives daemons through the SDK
and is not part of the daemon: ``main`` is a ``_LabGroup`` that names them in
``_LAB_COMMANDS`` as module-path strings and imports that module with
importlib only when one of them is run (``get_command``) or the command list
is shown (``collnet --help``). So importing ``collnet_daemon`` (or running a
daemon) loads neither ``collnet_lab`` nor ``collnet_client``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys

import click
import uvloop

from collnet.addresses import DEFAULT_IPC, DEFAULT_TCP_PORT, token_file_for
from collnet.errors import InvalidArgument
from collnet.membership.bounds import valid_peer_id
from collnet.membership.identity import COORDINATOR
from collnet_daemon import options
from collnet_daemon.certs import certs
from collnet_daemon.config import DaemonConfig, parse_hostport
from collnet_daemon.logs import setup_logging

log = logging.getLogger("collnet")


# The lab's subcommands: name -> "module:attribute" of its click command.
_LAB_COMMANDS = {"chaos": "collnet_lab.cli:chaos", "up": "collnet_lab.cli:up"}


class _LabGroup(click.Group):
    """A group that also offers the lab's commands, imported only when needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAB_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _LAB_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=_LabGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="collnet", prog_name="collnet", message="%(prog)s %(version)s")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option("--log-json", is_flag=True, help="One JSON object per log line.")
@click.pass_context
def main(ctx: click.Context, log_level: str, log_json: bool) -> None:
    """collnet: fault-tolerant collectives for training over the internet."""
    ctx.obj = {"log_level": log_level, "log_json": log_json}


@main.command()
@click.option("--listen", default="127.0.0.1:29400", show_default=True, help="HOST:PORT")
@options.heartbeat_options
@options.secret_option
@options.tls_options
@click.option(
    "--rejoin-grace-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="After a restart, how long members of the recovered world have to reconnect.",
)
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(1))
@click.option("--handshake-timeout-s", default=10.0, show_default=True, type=click.FloatRange(1))
@click.option(
    "--ring-order",
    default="planned",
    show_default=True,
    type=click.Choice(["planned", "join"]),
    help="planned: order the ring for the best bottleneck bandwidth of the measured links, "
    "re-planned at update_topology; join: the order peers joined in.",
)
@click.option(
    "--link-matrix-file",
    default=None,
    help="Plan the ring on the link figures in this JSON file (rows of src, dst, "
    "bandwidth_bps, rtt_s; re-read when it changes) instead of measured ones: for labs "
    "and tests.",
)
@options.metrics_options
@click.option("--ready-file", hidden=True, help="Write the bound address here once listening.")
@click.pass_context
def coordinator(
    ctx: click.Context,
    listen: str,
    metrics_host: str,
    metrics_port: int | None,
    secret_file: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    heartbeat_interval_s: float,
    heartbeat_floor_s: float,
    heartbeat_ceiling_s: float,
    rejoin_grace_s: float,
    max_connections: int,
    handshake_timeout_s: float,
    ring_order: str,
    link_matrix_file: str | None,
    ready_file: str | None,
) -> None:
    """Run the membership coordinator (sees no tensor data).

    Its state is soft: restarted (e.g. by a supervisor), it gets the world back
    from the daemons as they reconnect.
    At most --max-connections are open (fewer if the fd limit is lower); one not
    registered within --handshake-timeout-s is closed (docs/operations.md)."""
    from collnet.membership.liveness import Liveness
    from collnet_daemon.coordinator import CoordinatorService
    from collnet_daemon.metrics import CoordinatorMetrics

    setup_logging(ctx.obj["log_level"], ctx.obj["log_json"], "coordinator")

    def liveness() -> Liveness:
        return Liveness(heartbeat_interval_s, heartbeat_floor_s, heartbeat_ceiling_s)

    tls = options.load_tls(tls_ca, tls_cert, tls_key)
    if tls is not None and tls.name != COORDINATOR:
        raise click.BadParameter(
            f"the coordinator's certificate must be named {COORDINATOR!r}, not {tls.name!r}",
            param_hint="--tls-cert",
        )
    secret = options.read_secret(secret_file, "coordinator", tls)

    async def run() -> None:
        service = CoordinatorService(
            liveness,
            secret,
            rejoin_grace_s,
            max_connections,
            handshake_timeout_s,
            tls,
            ring_order,
            link_matrix_file,
        )
        host, port = await service.start(*parse_hostport(listen))
        metrics = CoordinatorMetrics(service)
        served = None if metrics_port is None else await metrics.serve(metrics_host, metrics_port)
        options.write_ready(ready_file, address=f"{host}:{port}", **options.metrics_address(served))
        await options.until_signalled()
        await service.close()
        await metrics.close()
        log.info("coordinator stopped")

    uvloop.run(run())


@main.command()
@click.option("--coordinator", "coordinator_addr", required=True, help="HOST:PORT")
@click.option(
    "--ipc",
    default=DEFAULT_IPC,
    show_default=True,
    envvar="COLLNET_IPC",
    help="Local API address for this node's trainers (ipc://PATH or tcp://127.0.0.1:PORT).",
)
@click.option(
    "--ipc-tcp-port",
    default=0,
    envvar="COLLNET_IPC_TCP_PORT",
    type=click.IntRange(0, 65535),
    help=f"Also serve trainers on tcp://127.0.0.1:PORT (their fallback; {DEFAULT_TCP_PORT} "
    "is where the SDK looks). Every request there must carry the token of "
    "--ipc-token-file. Default 0: off.",
)
@click.option(
    "--ipc-group",
    default=None,
    envvar="COLLNET_IPC_GROUP",
    help="Make the ipc socket 0660 and owned by GROUP, so its members' trainers may use "
    "this daemon too (default: 0600, this user only). Env: COLLNET_IPC_GROUP.",
)
@click.option(
    "--ipc-token-file",
    default=None,
    envvar="COLLNET_IPC_TOKEN_FILE",
    help="Where to write the token TCP clients must send (0600; 0640 with --ipc-group). "
    "Default: the ipc socket's path + '.token'. Env: COLLNET_IPC_TOKEN_FILE.",
)
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    help="HOST:PORT for data links from other daemons (port 0: any).",
)
@click.option("--advertise-host", default=None, help="Host other peers dial (default: --listen).")
@click.option(
    "--advertise-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="Port other peers dial, when a NAT or forwarder maps another one to --listen's "
    "(default: the port listened on).",
)
@click.option(
    "--connections",
    default="auto",
    show_default=True,
    callback=options.parse_connections,
    help="Parallel TCP connections per peer link this daemon dials: 1-64, or auto "
    "(from the link's bandwidth-delay product: 1 on loopback, up to 16 on a long fat "
    "link). Peers may differ: the dialler's choice holds.",
)
@click.option(
    "--chunk-bytes",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(4096),
    help="Pipelining chunk of the ring all-reduce.",
)
@click.option(
    "--connect-timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Deadline for dialling a peer and for an accepted connection's HELLO.",
)
@click.option(
    "--link-report-s",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.0),
    help="How often link figures go to the coordinator (and a new idle link may get a "
    "bandwidth probe); 0: no probes and no reports (the ring keeps its order).",
)
@options.heartbeat_options
@options.secret_option
@options.tls_options
@click.option(
    "--peer-id",
    default=None,
    help="Stable id of this peer (default: the TLS certificate's name, else random). "
    "With TLS it must be the certificate's name.",
)
@click.option(
    "--leave-when-trainers-exit",
    is_flag=True,
    help="Also stop once this node's trainers are gone (exited or killed). Without it the "
    "daemon leaves the world then and stays up; a trainer that joins again rejoins.",
)
@options.metrics_options
@click.option("--ready-file", hidden=True)
@click.pass_context
def daemon(
    ctx: click.Context,
    coordinator_addr: str,
    ipc: str,
    ipc_tcp_port: int,
    ipc_group: str | None,
    ipc_token_file: str | None,
    listen: str,
    advertise_host: str | None,
    advertise_port: int | None,
    connections: int | None,
    chunk_bytes: int,
    connect_timeout_s: float,
    link_report_s: float,
    heartbeat_interval_s: float,
    heartbeat_floor_s: float,
    heartbeat_ceiling_s: float,
    secret_file: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    peer_id: str | None,
    leave_when_trainers_exit: bool,
    metrics_host: str,
    metrics_port: int | None,
    ready_file: str | None,
) -> None:
    """Run the peer daemon of this node."""
    from collnet_daemon.localaccess import group_id
    from collnet_daemon.service import Daemon

    if ipc_group is not None:
        try:
            group_id(ipc_group)
        except InvalidArgument as exc:
            raise click.BadParameter(exc.message, param_hint="--ipc-group") from None
    options.raise_fd_limit()
    if (ipc_tcp_port or ipc.startswith("tcp://")) and not (ipc_token_file or token_file_for(ipc)):
        raise click.BadParameter(
            "a TCP endpoint for trainers needs a file for its token", param_hint="--ipc-token-file"
        )

    config = DaemonConfig(
        coordinator=parse_hostport(coordinator_addr),
        ipc=ipc,
        listen=parse_hostport(listen),
        advertise_host=advertise_host,
        advertise_port=advertise_port,
        connections=connections,
        chunk_bytes=chunk_bytes,
        connect_timeout_s=connect_timeout_s,
        link_report_s=link_report_s,
        heartbeat_interval_s=heartbeat_interval_s,
        heartbeat_floor_s=heartbeat_floor_s,
        heartbeat_ceiling_s=heartbeat_ceiling_s,
        leave_when_trainers_exit=leave_when_trainers_exit,
        ipc_tcp_port=ipc_tcp_port,
        ipc_group=ipc_group,
        ipc_token_file=ipc_token_file or token_file_for(ipc),
    )
    try:
        config.advertised(config.listen)  # refused now, not by a peer's failed dial later
    except InvalidArgument as exc:
        hint = "--advertise-host" if advertise_host else "--listen"
        raise click.BadParameter(exc.message, param_hint=hint) from None
    config.tls = options.load_tls(tls_ca, tls_cert, tls_key)
    if config.tls is not None:
        # With TLS the peer id is the certificate's name: what the others check.
        name = config.tls.name
        if name == COORDINATOR:
            raise click.BadParameter(
                "that is the coordinator's certificate, not a peer's", param_hint="--tls-cert"
            )
        if peer_id and peer_id != name:
            raise click.BadParameter(
                f"{peer_id!r} differs from the name on the TLS certificate ({name!r}); "
                "with TLS the peer id is the certificate's name",
                param_hint="--peer-id",
            )
        peer_id = name
    if peer_id:
        config.peer_id = peer_id
    if not valid_peer_id(config.peer_id):  # the coordinator would refuse it (bounds.py)
        msg = f"{config.peer_id!r}: 1-64 of A-Za-z0-9._- starting with a letter or digit"
        raise click.BadParameter(msg, param_hint="--peer-id")
    setup_logging(ctx.obj["log_level"], ctx.obj["log_json"], f"daemon[{config.peer_id}]")
    config.secret = options.read_secret(secret_file, f"daemon {config.peer_id}", config.tls)

    async def run() -> int:
        d = Daemon(config)
        await d.start()
        served = None
        if metrics_port is not None:
            served = await d.metrics.serve(metrics_host, metrics_port)
        options.write_ready(
            ready_file,
            peer=d.id,
            data=f"{d.data_addr[0]}:{d.data_addr[1]}",
            ipc=ipc,
            **options.metrics_address(served),
        )
        signalled = asyncio.ensure_future(options.until_signalled())
        stopped = asyncio.ensure_future(d.stopped.wait())
        await asyncio.wait([signalled, stopped], return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        await d.stop(leave=True)  # or wait for the stop a client's leave began
        await d.metrics.close()
        graceful = d.left
        log.info("daemon %s stopped", d.id)
        return 0 if graceful else 1

    sys.exit(uvloop.run(run()))


@main.command()
@click.option("--coordinator", "coordinator_addr", required=True, help="HOST:PORT")
@options.secret_option
@options.tls_options
@click.option("--timeout-s", default=10.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--json", "as_json", is_flag=True, help="Print the coordinator's answer as JSON.")
@click.pass_context
def status(
    ctx: click.Context,
    coordinator_addr: str,
    secret_file: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Show the world: peers, epoch, state revisions and control-link RTTs.

    Asks the coordinator without joining (it authenticates like a daemon, so it
    needs the same --secret-file, or with TLS a certificate of the same CA)."""
    from collnet.errors import CollnetError
    from collnet_daemon.status import fetch_status, render_table

    setup_logging(
        "warning" if ctx.obj["log_level"] == "info" else ctx.obj["log_level"],
        ctx.obj["log_json"],
        "status",
    )
    # Without a secret, a coordinator accepts loopback connections only.
    secret = options.read_secret(secret_file, "status") if secret_file else None
    tls = options.load_tls(tls_ca, tls_cert, tls_key)
    host, port = parse_hostport(coordinator_addr)
    try:
        answer = uvloop.run(fetch_status(host, port, secret, timeout_s, tls))
    except (CollnetError, OSError, TimeoutError, ValueError) as exc:
        click.echo(f"collnet status: {coordinator_addr}: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(answer, indent=2) if as_json else render_table(answer))


main.add_command(certs)
